"""The start-up memory plan: what each role allocates, per device, from config.json shapes only.

No weights are read. Per role (target = verifier, draft = drafter):

  * weights: the model's parameters (counted on the meta device, tied embeddings once) x dtype;
  * KV: the role's block pool, [2, n_layers, n_blocks, block_size, n_kv_heads, head_dim] x dtype
    (actors/kv/blocks.py). The verifier's pool is the KV budget (`engine.kv_cache_memory`) and
    admits requests by reservation; the drafter's pool follows from it (EngineSpec.draft_blocks:
    the verifier's blocks, plus per sequence a draft's overhang and max_branches branches of a
    few blocks each; branches share their sequence's committed blocks);
  * workspace: the largest transient buffers of one step, as the code allocates them: logits
    in the model dtype plus their float32 copy, the K/V gathered for attention (the CPU path,
    actors/kv/paged.py), attention scores and mask, MLP activations; for the drafter also the
    [rows, K, V] float32 distributions and q rows of one round of branches (plus the adopted
    ones of the round before). The verifier's prefill runs in chunks of `prefill_chunk`.

`engine.kv_cache_memory`: bytes (int), a string ("12GiB", "512MiB", "20GB"), or a fraction
0 < f <= 1 of the target device's memory. Default: enough for max_batch sequences of
max_seq_len, capped on a GPU at 0.9 of what the weights, the drafter and the workspaces leave.
A plan that cannot hold one sequence of max_seq_len, or that does not fit its device, is a
ConfigError naming the keys and the figures.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from actors.spec import EngineSpec
from cluster.config import ConfigError

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
HEADROOM = 0.9     # the share of a GPU's memory the default KV budget may bring the total to


def parse_memory(value) -> tuple[str, float]:
    """("bytes", n) or ("fraction", f) from an int, a float in (0, 1] or a string with a unit."""
    if isinstance(value, bool):
        raise ValueError(f"must be bytes, a size like '12GiB' or a fraction in (0, 1], got {value!r}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a fraction of device memory must be in (0, 1], got {value!r}")
        return "fraction", value
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        return "bytes", value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n <= 0:
                raise ValueError(f"must be positive, got {value!r}")
            if m.group(2) == "" and "." in m.group(1):
                return parse_memory(float(m.group(1)))
            return "bytes", int(n)
    raise ValueError(f"must be bytes, a size like '12GiB'/'512MiB' or a fraction in (0, 1], got {value!r}")


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def device_key(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def device_memory(device: str) -> int | None:
    """Total memory of a device this process can see (CPU: physical RAM); None if unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_properties(int(device.partition(":")[2] or 0)).total_memory
        except Exception:
            return None
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


@dataclass
class RolePlan:
    role: str
    device: str
    dtype: str
    weights: int
    kv: int
    workspace: int
    kv_blocks: int
    block_bytes: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace


@dataclass
class MemoryPlan:
    roles: list[RolePlan]
    devices: dict[str, int | None]     # device -> total memory (None: unknown here)
    block_size: int
    target_blocks: int
    draft_blocks: int | None
    notes: list[str]

    def used(self, device: str) -> int:
        return sum(r.total for r in self.roles if device_key(r.device) == device)

    def apply(self, spec: EngineSpec) -> EngineSpec:
        return dataclasses.replace(spec, target_kv_blocks=self.target_blocks, draft_kv_blocks=self.draft_blocks)

    def table(self) -> str:
        rows = [("role", "device", "weights", "KV", "workspace", "total", "KV blocks")]
        for r in self.roles:
            rows.append((r.role, r.device, fmt(r.weights), fmt(r.kv), fmt(r.workspace), fmt(r.total),
                         f"{r.kv_blocks} x {self.block_size}"))
        for d, cap in self.devices.items():
            rows.append(("= " + d, "", "", "", "", fmt(self.used(d)), "of " + (fmt(cap) if cap else "unknown")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines + self.notes)


def _weights(args, dtype: str) -> int:
    import torch

    from actors.model import Transformer

    with torch.device("meta"):
        m = Transformer(args)
    n = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    return n * DTYPE_BYTES[dtype]


def _block_bytes(args, block_size: int, dtype: str) -> int:
    return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * DTYPE_BYTES[dtype]


def _step_bytes(args, dtype: str, rows: int, T: int, kv_len: int) -> int:
    """One forward of `rows` x T tokens attending to kv_len keys: its largest live buffers."""
    s = DTYPE_BYTES[dtype]
    logits = rows * T * args.vocab_size * (s + 4)                       # model dtype + .float() copy
    gathered = 2 * rows * args.n_kv_heads * kv_len * args.head_dim * s  # one layer's K and V
    scores = rows * args.n_heads * T * kv_len * s + rows * T * kv_len   # scores + bool mask
    mlp = 3 * rows * T * args.intermediate_size * s
    return logits + gathered + scores + mlp


def plan_memory(spec: EngineSpec, kv_cache_memory=None, memory: dict[str, int | None] | None = None,
                target_args=None, draft_args=None) -> MemoryPlan:
    """The plan for `spec` (its model directories are read for config.json only). `memory` gives
    device totals (by device name, "cuda" = "cuda:0"); missing ones are looked up here."""
    from actors.config import ModelArgs

    ta = target_args or ModelArgs.from_dir(spec.target)
    da = draft_args if draft_args is not None else (ModelArgs.from_dir(spec.draft) if spec.draft and spec.speculative
                                                    else None)
    bs, K = spec.kv_block_size, spec.k
    tdev, ddev = device_key(spec.target_device), device_key(spec.draft_device)
    devices = {tdev: None} | ({ddev: None} if da is not None else {})
    for d in devices:
        devices[d] = (memory or {}).get(d, (memory or {}).get(d.split(":")[0])) if memory else device_memory(d)
    notes: list[str] = []

    t_w = _weights(ta, spec.target_dtype)
    t_bb = _block_bytes(ta, bs, spec.target_dtype)
    chunk = min(spec.prefill_chunk, spec.max_seq_len)
    t_ws = max(_step_bytes(ta, spec.target_dtype, spec.max_batch, K + 1, spec.target_max_len),
               _step_bytes(ta, spec.target_dtype, 1, chunk, spec.target_max_len))
    per_seq = -(-spec.target_max_len // bs)
    full = spec.max_batch * per_seq
    if da is not None:
        d_w = _weights(da, spec.draft_dtype)
        d_bb = _block_bytes(da, bs, spec.draft_dtype)
        branch_rows = spec.max_batch * spec.max_branches if spec.mode == "ssd" else spec.max_batch
        V = da.vocab_size
        d_ws = (max(_step_bytes(da, spec.draft_dtype, branch_rows, 1, spec.draft_max_len),
                    _step_bytes(da, spec.draft_dtype, 1, chunk, spec.draft_max_len))
                + 2 * branch_rows * K * V * 4 + 2 * spec.max_batch * K * V * 4)   # dists + q rows
        extra = spec.max_batch * (1 + (spec.max_branches if spec.mode == "ssd" else 0)) * spec.branch_blocks
    else:
        d_w = d_bb = d_ws = extra = 0
    same = da is not None and tdev == ddev
    fixed = t_w + t_ws + ((d_w + d_ws + extra * d_bb) if same else 0)
    per_block = t_bb + (d_bb if same else 0)   # a verifier block costs a drafter block too on a shared device

    keys = "engine.kv_cache_memory"
    if kv_cache_memory is None:
        blocks = full
        cap = devices[tdev]
        if tdev.startswith("cuda") and cap:
            room = int(HEADROOM * cap) - fixed
            if room // per_block < full:
                blocks = max(0, room // per_block)
                notes.append(f"default {keys}: {HEADROOM:.0%} of {tdev} less weights, workspace"
                             + (" and the drafter" if same else "")
                             + f" holds {blocks} blocks (max_batch needs {full})")
    else:
        kind, n = parse_memory(kv_cache_memory)
        if kind == "fraction":
            if not devices[tdev]:
                raise ConfigError(f"{keys}: {kv_cache_memory!r} is a fraction of {tdev}'s memory, which is not "
                                  "known here; give bytes (e.g. '12GiB')")
            n = int(n * devices[tdev])
        blocks = int(n) // t_bb
        if blocks > full:
            notes.append(f"{keys}: {fmt(n)} is more than max_batch x max_seq_len needs; using {fmt(full * t_bb)}")
            blocks = full
    if blocks < per_seq:
        raise ConfigError(
            f"{keys}: the verifier's KV budget holds {blocks} blocks of {bs} positions ({fmt(blocks * t_bb)}), "
            f"fewer than one sequence of engine.max_seq_len={spec.max_seq_len} needs ({per_seq} blocks, "
            f"{fmt(per_seq * t_bb)}); raise {keys}, lower engine.max_seq_len"
            + (f", or free {tdev}: weights {fmt(t_w)}, workspace {fmt(t_ws)}" if kv_cache_memory is None else ""))
    d_blocks = blocks + extra if da is not None else None
    roles = [RolePlan("target", spec.target_device, spec.target_dtype, t_w, blocks * t_bb, t_ws, blocks, t_bb)]
    if da is not None:
        roles.append(RolePlan("draft", spec.draft_device, spec.draft_dtype, d_w, d_blocks * d_bb, d_ws, d_blocks, d_bb))
    plan = MemoryPlan(roles, devices, bs, blocks, d_blocks, notes)
    for d, cap in devices.items():
        if cap and plan.used(d) > cap:
            parts = "; ".join(f"{r.role}: weights {fmt(r.weights)} + KV {fmt(r.kv)} + workspace {fmt(r.workspace)}"
                              for r in roles if device_key(r.device) == d)
            raise ConfigError(
                f"the memory plan does not fit {d}: needs {fmt(plan.used(d))} of {fmt(cap)} ({parts}). "
                f"Lower engine.kv_cache_memory, engine.max_batch, engine.max_seq_len or speculation.fan_out_budget "
                f"(max_batch={spec.max_batch}, max_seq_len={spec.max_seq_len}, fan_out_budget={spec.max_branches}, "
                f"k={K}), or use a smaller dtype")
    return plan
