"""Paged KV: a pool of fixed-size blocks, a block table per sequence (blocks.py), and attention
reads/writes through those tables (paged.py). See docs/paged-kv.md."""
from actors.kv.blocks import PagedKVCache, blocks_for
from actors.kv.pool import BlockPool

__all__ = ["BlockPool", "PagedKVCache", "blocks_for"]
