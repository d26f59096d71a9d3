"""The KV cache: a pool of fixed-size blocks, a block table per sequence (blocks.py), and
attention reads/writes through those tables (paged.py); what the model shares with it
(common.py). See docs/paged-kv.md."""
from actors.kv.blocks import PagedKVCache, blocks_for
from actors.kv.common import KEY_BLOCK, CacheFullError, read_len, rows_aligned
from actors.kv.pool import BlockPool

__all__ = ["KEY_BLOCK", "BlockPool", "CacheFullError", "PagedKVCache", "blocks_for", "read_len", "rows_aligned"]
