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

Prefix caching (engine.prefix_caching, actors/kv/prefix.py) adds no memory: cached blocks live in
these pools. Those no sequence holds are parked and reclaimable (evicted LRU on demand), so the
plan, the verifier's reservations and the drafter's sizing count them as free.

  * reserve (GPUs only): what a process holds beyond its tensors (Reserve): the CUDA context
    and its loaded kernels, cuBLAS workspaces, NCCL's buffers per communicator it joins (the
    TP group, the drafter channel's bulk group), and with engine.compile on CUDA the CUDA-graph
    pool (the captured buckets' activations: one workspace more). Padded shapes add the scratch
    block; their rows, T and kv_len never exceed the unpadded maxima (actors/model/buckets.py).

Devices. Under the Ray launcher every role (and every TP rank) gets a GPU bundle of its own and
sees it as "cuda" (Ray narrows CUDA_VISIBLE_DEVICES), so two roles on "cuda" are two GPUs; they
share one only when both name the same explicit index. Under `launcher: local` both run on this
host, where "cuda" is "cuda:0": equal devices share. Several drafters (models.draft.replicas: M)
are M drafter rows, each with the whole pool (all sequences move to one when the others die): on
devices of their own (a bundle each, "<device> #i") or, where the drafter shares the target's
device (the CPU, or an explicit index under Ray), all M on that one.

`engine.kv_cache_memory`: bytes (int), a string ("12GiB", "512MiB", "20GB"), or a fraction
0 < f <= 1 of the target device's memory. Default: enough for max_batch sequences of
max_seq_len, capped on a GPU at FIT (0.9) of the device less what the weights, the drafter, the
workspaces and the reserve take. A plan that cannot hold one sequence of max_seq_len, or whose
total exceeds FIT of its device, is a ConfigError naming the keys and the figures.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from actors.engine_spec import EngineSpec
from cluster.errors import ConfigError

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
MiB = 1 << 20
FIT = 0.9          # the share of a device a plan may fill: the caching allocator's fragmentation and
                   # whatever the Reserve misses live in the rest
HEADROOM = FIT     # the default KV budget fills a GPU up to the same share


@dataclass(frozen=True)
class Reserve:
    """Per-process device memory outside the plan's tensors (a GPU's; a CPU process has none that
    matters). Figures from public measurements of torch on H100s, to be checked by the GPU check
    (cluster/gpu_check/), which prints measured peak memory against the plan."""
    context: int = 768 * MiB   # CUDA context, torch's and inductor's kernels loaded lazily
    cublas: int = 64 * MiB     # cuBLAS + cuBLASLt workspaces (CUBLAS_WORKSPACE_CONFIG :4096:8 = 32 MiB a stream)
    nccl: int = 1024 * MiB     # per NCCL communicator joined: NCCL_BUFFSIZE (4 MiB) x channels x peers, proxies

    def bytes(self, nccl_groups: int) -> int:
        return self.context + self.cublas + nccl_groups * self.nccl


RESERVE = Reserve()


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


def shares_device(target: str, draft: str, launcher: str) -> bool:
    """Whether the two roles' devices are one device. Under Ray each role's GPU bundle is its own
    GPU, so only an explicit equal index declares sharing; locally "cuda" is "cuda:0"."""
    if launcher == "local" or not (target.startswith("cuda") and draft.startswith("cuda")):
        return device_key(target) == device_key(draft)
    return ":" in target and target == draft


def role_devices(target: str, draft: str, launcher: str) -> tuple[str, str]:
    """The plan's names for the two roles' devices: equal iff they share one; two Ray bundles on
    "cuda" are told apart by their role."""
    t, d = device_key(target), device_key(draft)
    if t == d and not shares_device(target, draft, launcher):
        return f"{target} (target bundle)", f"{draft} (draft bundle)"
    return t, d


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
    reserve: int = 0
    key: str = ""          # the plan's device name (role_devices)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace + self.reserve


@dataclass
class MemoryPlan:
    roles: list[RolePlan]
    devices: dict[str, int | None]     # device -> total memory (None: unknown here)
    block_size: int
    target_blocks: int
    draft_blocks: int | None
    notes: list[str]

    def used(self, device: str) -> int:
        return sum(r.total for r in self.roles if r.key == device)

    def fits(self) -> dict[str, bool]:
        """Per device: does the plan stay within FIT of it (unknown totals count as fitting)."""
        return {d: not cap or self.used(d) <= FIT * cap for d, cap in self.devices.items()}

    def apply(self, spec: EngineSpec) -> EngineSpec:
        return dataclasses.replace(spec, target_kv_blocks=self.target_blocks, draft_kv_blocks=self.draft_blocks)

    def table(self) -> str:
        rows = [("role", "device", "weights", "KV", "workspace", "reserve", "total", "KV blocks")]
        for r in self.roles:
            rows.append((r.role, r.key, fmt(r.weights), fmt(r.kv), fmt(r.workspace), fmt(r.reserve), fmt(r.total),
                         f"{r.kv_blocks} x {self.block_size}"))
        for d, cap in self.devices.items():
            rows.append(("= " + d, "", "", "", "", "", fmt(self.used(d)),
                         f"of {fmt(cap)} (fit: {FIT:.0%})" if cap else "of unknown"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines + self.notes)


def _weights(args, dtype: str) -> int:
    import torch

    from actors.model.model import Transformer

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


def _draft_args(spec: EngineSpec):
    """The drafter's shapes: a draft model's, or a draft head's one layer (with the target's
    vocabulary: its embedding is the one tensor of the target the drafter holds)."""
    from actors.model.config import ModelArgs

    if spec.draft_head_layers is not None:
        import json
        from pathlib import Path

        from actors.eagle.checkpoint import head_args

        return head_args(json.loads((Path(spec.draft) / "config.json").read_text()),
                         ModelArgs.from_dir(spec.target)).layer
    return ModelArgs.from_dir(spec.draft)


def plan_memory(spec: EngineSpec, kv_cache_memory=None, memory: dict[str, int | None] | None = None,
                target_args=None, draft_args=None, launcher: str = "ray", reserve: Reserve = RESERVE) -> MemoryPlan:
    """The plan for `spec` (its model directories are read for config.json only). `memory` gives
    device totals (by device name, or by its type: "cuda"); missing ones are looked up here.
    `launcher` ("ray" | "local") decides whether two roles on "cuda" share a GPU (role_devices)."""
    from actors.model.config import ModelArgs

    ta = target_args or ModelArgs.from_dir(spec.target)
    da = draft_args if draft_args is not None else (_draft_args(spec) if spec.draft and spec.speculative else None)
    bs, K = spec.kv_block_size, spec.k
    tdev, ddev = role_devices(spec.target_device, spec.draft_device, launcher)
    n_d = spec.draft_replicas if da is not None else 0
    dkeys = [ddev if n_d == 1 or tdev == ddev else f"{ddev} #{i}" for i in range(n_d)]
    raw = {tdev: spec.target_device} | {k: spec.draft_device for k in dkeys}
    devices: dict[str, int | None] = {}
    for d, name in raw.items():
        devices[d] = ((memory or {}).get(name, (memory or {}).get(device_key(name), (memory or {}).get(
            name.split(":")[0]))) if memory else device_memory(name))
    notes: list[str] = []
    same = da is not None and tdev == ddev
    # NCCL communicators per process: the TP group; the drafter channel's bulk group when the
    # roles are on two GPUs (on one, the channel is gloo: NCCL refuses two ranks on one device).
    nccl_channel = int(da is not None and not same and spec.target_device.startswith("cuda")
                       and spec.draft_device.startswith("cuda"))

    def role_reserve(device: str, groups: int, workspace: int) -> int:
        if not device.startswith("cuda"):
            return 0
        graphs = workspace if spec.compile else 0   # the CUDA-graph pool holds the captured buckets' activations
        return reserve.bytes(groups) + graphs

    t_w = _weights(ta, spec.target_dtype)
    t_bb = _block_bytes(ta, bs, spec.target_dtype)
    chunk = min(spec.prefill_chunk, spec.max_seq_len)
    t_ws = max(_step_bytes(ta, spec.target_dtype, spec.max_batch, K + 1, spec.target_max_len),
               _step_bytes(ta, spec.target_dtype, 1, chunk, spec.target_max_len))
    # (the verifier joins one channel per drafter)
    t_res = role_reserve(spec.target_device, int(spec.tensor_parallel_size > 1) + n_d * nccl_channel, t_ws)
    t_scratch = int(spec.pads(spec.target_device))   # padded shapes' scratch block
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
        extra = spec.draft_extra_blocks()
        d_scratch = int(spec.pads(spec.draft_device))
        d_res = role_reserve(spec.draft_device, nccl_channel, d_ws)   # its own process (both launchers)
    else:
        d_w = d_bb = d_ws = extra = d_res = d_scratch = 0
    fixed = t_w + t_ws + t_res + t_scratch * t_bb + (n_d * (d_w + d_ws + d_res + (extra + d_scratch) * d_bb)
                                                     if same else 0)
    per_block = t_bb + (n_d * d_bb if same else 0)   # a verifier block costs each drafter a block on a shared device

    keys = "engine.kv_cache_memory"
    if kv_cache_memory is None:
        blocks = full
        cap = devices[tdev]
        if spec.target_device.startswith("cuda") and cap:
            room = int(HEADROOM * cap) - fixed
            if room // per_block < full:
                blocks = max(0, room // per_block)
                notes.append(f"default {keys}: {HEADROOM:.0%} of {tdev} less weights, workspace, reserve"
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
            + (f", or free {tdev}: weights {fmt(t_w)}, workspace {fmt(t_ws)}, reserve {fmt(t_res)}"
               if kv_cache_memory is None else ""))
    d_blocks = blocks + extra if da is not None else None
    roles = [RolePlan("target", spec.target_device, spec.target_dtype, t_w, (blocks + t_scratch) * t_bb, t_ws,
                      blocks, t_bb, t_res, tdev)]
    for i, key in enumerate(dkeys):
        roles.append(RolePlan("draft" if n_d == 1 else f"draft {i}", spec.draft_device, spec.draft_dtype, d_w,
                              (d_blocks + d_scratch) * d_bb, d_ws, d_blocks, d_bb, d_res, key))
    plan = MemoryPlan(roles, devices, bs, blocks, d_blocks, notes)
    for d, ok in plan.fits().items():
        if not ok:
            cap = devices[d]
            parts = "; ".join(f"{r.role}: weights {fmt(r.weights)} + KV {fmt(r.kv)} + workspace {fmt(r.workspace)}"
                              f" + reserve {fmt(r.reserve)}" for r in roles if r.key == d)
            raise ConfigError(
                f"the memory plan does not fit {d}: needs {fmt(plan.used(d))}, more than {FIT:.0%} of its "
                f"{fmt(cap)} ({parts}). "
                f"Lower engine.kv_cache_memory, engine.max_batch, engine.max_seq_len or speculation.fan_out_budget "
                f"(max_batch={spec.max_batch}, max_seq_len={spec.max_seq_len}, fan_out_budget={spec.max_branches}, "
                f"k={K}), or use a smaller dtype")
    return plan
