"""The plain settings an engine process needs. cluster/ builds this from the YAML deployment;
actors never read YAML or import Ray, so the same classes also run as bare processes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class OnlineLearningSpec:
    """Online drafter adaptation (actors/spec/online.py): the drafter trains on the committed tokens it
    already receives, in the gaps of its own loop. None on EngineSpec (the default): off."""
    lr: float = 1e-4
    max_steps_per_s: float = 20.0   # optimizer steps per second at most (the duty bound)
    buffer_tokens: int = 65536      # replay buffer bound (tokens of committed context)
    batch_size: int = 8             # windows per optimizer step
    window_tokens: int = 128        # a window's length (context + the target's tokens it scores)
    save_path: str | None = None    # HF checkpoint directory written at intervals and on shutdown
    save_every_s: float = 300.0
    recompute_kv: bool = False      # after steps, active sequences' drafter KV is recomputed (else kept)

    def __post_init__(self):
        if not (self.lr > 0 and self.max_steps_per_s > 0 and self.buffer_tokens >= self.window_tokens >= 2
                and self.batch_size >= 1 and self.save_every_s > 0):
            raise ValueError(f"online learning settings out of range: {self}")


MODES = ("ar", "sd", "ssd")
BACKUPS = ("jit", "ngram", "none")   # what a miss in the speculation table drafts


def fan_out_error(fan_out: list[int] | None, k: int) -> str | None:
    """The one rule for an explicit fan-out (the YAML schema and the spec both apply it)."""
    if fan_out is None:
        return None
    if len(fan_out) != k + 1:
        return f"fan_out: needs k+1 = {k + 1} entries (depth 0..k), got {list(fan_out)}"
    if any(f < 0 for f in fan_out):
        return f"fan_out: entries must be >= 0, got {list(fan_out)}"
    return None


@dataclass
class EngineSpec:
    target: str                     # checkpoint directory (already resolved)
    draft: str | None = None
    target_dtype: str = "float32"
    draft_dtype: str = "float32"
    target_device: str = "cpu"
    draft_device: str = "cpu"
    mode: str = "ssd"               # ar | sd | ssd
    k: int = 4                      # the largest K; adaptive picks each sequence's K in 0..k
    adaptive: bool = True           # K per sequence and round from live measurements (actors/spec/adaptive.py)
    fan_out: list[int] | None = None  # explicit per-depth list (length k+1), else geometric
    fan_out_budget: int = 16
    backup: str = "jit"             # jit | ngram | none
    saguaro_c: float = 1.0
    max_batch: int = 8
    max_seq_len: int = 1024
    kv_block_size: int = 16         # positions per KV block (actors/kv/blocks.py)
    target_kv_blocks: int | None = None   # the verifier's block pool; None: max_batch full-length sequences
    draft_kv_blocks: int | None = None    # the drafter's; None: derived from the verifier's (draft_blocks)
    prefill_chunk: int = 512        # prompt positions per prefill forward (bounds the logits buffer)
    prefix_caching: bool = True     # keep full KV blocks by prefix digest and reuse them (actors/kv/prefix.py)
    compile: bool = False           # torch.compile the cached forwards (actors/model/compiled.py)
    pad_shapes: bool = False        # pad decode/verify forwards to fixed buckets even off CUDA (testing knob)
    timeout_s: float = 30.0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    backend: str = "auto"
    num_threads: int = 1            # the verifier's torch threads (and Ray CPUs)
    draft_num_threads: int = 1      # the drafter's
    target_cpus: tuple[int, ...] | None = None  # pin the verifier's loop thread to these CPUs (Linux)
    draft_cpus: tuple[int, ...] | None = None   # the drafter's (with several drafters: theirs, split evenly)
    draft_replicas: int = 1         # drafter processes per verifier, each owning some sequences
    tensor_parallel_size: int = 1   # the target's ranks: one placement bundle (device) each
    # Custom Ray resources on each of a role's placement bundles: they pin the role to the nodes
    # that declare them (cluster/placement.py). Empty: any node with the CPUs/GPUs will do.
    target_resources: dict[str, float] = field(default_factory=dict)
    draft_resources: dict[str, float] = field(default_factory=dict)
    online_learning: OnlineLearningSpec | None = None   # None: the drafter never trains
    # `draft` is a feature-conditioned draft head (actors/eagle/) reading the target's features at
    # these layers; None: a draft model
    draft_head_layers: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "ar" and not self.draft:
            raise ValueError(f"mode {self.mode} needs a draft model")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if why := fan_out_error(self.fan_out, self.k):
            raise ValueError(why)
        if self.backup not in BACKUPS:
            raise ValueError(f"backup must be one of {BACKUPS}, got {self.backup!r}")
        if self.kv_block_size < 1 or self.prefill_chunk < 1:
            raise ValueError(f"kv_block_size and prefill_chunk must be >= 1, got {self.kv_block_size}, "
                             f"{self.prefill_chunk}")
        if not 0.0 < self.saguaro_c <= 1.0:
            raise ValueError(f"saguaro_c must be in (0, 1], got {self.saguaro_c}")
        if self.draft_replicas < 1:
            raise ValueError(f"draft_replicas must be >= 1, got {self.draft_replicas}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.draft_head_layers is not None and self.online_learning is not None:
            raise ValueError("online learning trains a draft model; the draft is a draft head")

    @property
    def speculative(self) -> bool:
        return self.mode != "ar"

    @property
    def max_branches(self) -> int:
        """Upper bound on pre-drafted branches per sequence (sizes the drafter's cache)."""
        return sum(self.fan_out) if self.fan_out is not None else self.fan_out_budget

    @property
    def target_max_len(self) -> int:
        """Positions a verifier table may reach: max_seq_len plus a padded verify row."""
        return self.max_seq_len + self.k + 2

    @property
    def draft_max_len(self) -> int:
        """Positions a drafter table may reach: a branch drafts K past a K-token draft."""
        return self.max_seq_len + 2 * self.k + 2

    @property
    def branch_blocks(self) -> int:
        """The most blocks one branch owns: its K positions may straddle one more block than
        they fill, and the first may be a copy of the shared block it forked in."""
        return -(-self.k // self.kv_block_size) + 1

    def pads(self, device: str) -> bool:
        """Whether a role on `device` pads its decode/verify forwards to fixed shapes
        (actors/model/buckets.py): always for CUDA-graph capture (compile on CUDA), else if forced."""
        return self.pad_shapes or (self.compile and str(device).startswith("cuda"))

    def target_blocks(self) -> int:
        """The verifier's pool, plus the scratch block when it pads (reservations never count it)."""
        return self._target_blocks() + self.pads(self.target_device)

    def _target_blocks(self) -> int:
        if self.target_kv_blocks is not None:
            return self.target_kv_blocks
        return self.max_batch * -(-self.target_max_len // self.kv_block_size)

    def draft_blocks(self) -> int:
        """Enough that the drafter never runs out while the verifier admits by reservation: the
        verifier's blocks (every committed position), per sequence a draft's overhang, and
        per sequence max_branches branches of branch_blocks each."""
        scratch = self.pads(self.draft_device)
        if self.draft_kv_blocks is not None:
            return self.draft_kv_blocks + scratch
        return self._target_blocks() + self.draft_extra_blocks() + scratch

    def draft_extra_blocks(self) -> int:
        """The drafter's blocks beyond the verifier's: per sequence a draft's overhang and, in SSD,
        max_branches branches (the one formula: the memory plan sizes the drafter's pool with it)."""
        return self.max_batch * (1 + (self.max_branches if self.mode == "ssd" else 0)) * self.branch_blocks

    @property
    def draft_prefix_caching(self) -> bool:
        """The drafter caches prefixes too, unless it learns online: keys/values computed with
        older weights would then serve new requests."""
        return self.prefix_caching and self.online_learning is None and self.draft_head_layers is None

    @property
    def target_prefix_caching(self) -> bool:
        """The verifier caches prefixes, unless a draft head drafts: it needs the target's features
        at every prompt position, which a cached prefix skips computing (FEATS records)."""
        return self.prefix_caching and self.draft_head_layers is None

    def draft_rows(self) -> int:
        """The most rows one drafter forward batches: every sequence's branches and its own row."""
        return self.max_batch * (1 + self.max_branches)

    def for_drafter(self, i: int) -> EngineSpec:
        """Drafter i's spec: its own share of draft_cpus, so several drafters never pin one core."""
        if self.draft_cpus is None or self.draft_replicas == 1:
            return self
        n = len(self.draft_cpus) // self.draft_replicas
        return replace(self, draft_cpus=self.draft_cpus[i * n:(i + 1) * n])

    def reserve_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """Positions a verifier sequence can ever write: prompt + max_new_tokens + a padded K."""
        return min(prompt_len + max_new_tokens + self.k + 1, self.target_max_len)

    def to_dict(self) -> dict:
        return asdict(self)
