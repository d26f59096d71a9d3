"""The deployment schema: one typed YAML file per deployment.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored
setting. `load_config` turns every problem (unreadable file, bad YAML, wrong type, out of range)
into one `ConfigError` whose message names the dotted key and the value that was given.
Secrets never live in YAML: the file names the environment variable that holds them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from actors.engine_spec import BACKUPS, MODES, fan_out_error
from cluster.errors import ConfigError  # noqa: F401 (defined without pydantic, re-exported)


# Resources Ray itself accounts for: a role's CPUs and GPU follow from num_threads and device.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]*")   # also Ray's node:<ip> and accelerator_type:<x>


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConfig(_Section):
    # ray: the verifier and drafter as Ray actors; local: plain processes on this machine, no Ray
    # (the verifier in the serving process, the drafter in a child; actors/launch.py)
    launcher: Literal["ray", "local"] = "ray"
    address: str | None = None          # None: embedded local cluster; "auto": join `ray start`
    num_cpus: int | None = Field(None, ge=1)   # embedded cluster only
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    namespace: str = "outrider"
    # Engine replicas behind the one endpoint (docs/replicas.md): each a verifier with its
    # tensor-parallel ranks and its drafter, in a placement group of its own; requests are routed
    # to one by prefix affinity and load (cluster/serving/router.py).
    replicas: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _local_has_no_cluster(self):
        if self.launcher == "local" and self.address is not None:
            raise ValueError(f"address: {self.address!r} joins a Ray cluster, but launcher: local runs without Ray "
                             f"on this machine; remove one of them")
        if self.launcher == "local" and self.replicas > 1:
            raise ValueError(f"replicas: {self.replicas} engine replicas are placed by Ray, but launcher: local runs "
                             "one engine without Ray; use launcher: ray or replicas: 1")
        return self


class ModelConfig(_Section):
    path: str = Field(min_length=1)     # checkpoint directory, or demo:<size>/<target|draft|draft-LxD>
    # auto: bfloat16 where the device computes it natively (a CPU with AMX-BF16 or AVX512-BF16, as
    # torch reports it; CUDA), float32 elsewhere; resolved once by the engine spec (actors/model/loader.py)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"                 # cpu | cuda | cuda:N
    tensor_parallel_size: int = Field(1, ge=1)
    num_threads: int = Field(1, ge=1)   # torch threads (and Ray CPUs) for this actor
    # Pin this role's compute thread (and its torch threads) to these CPU ids (Linux); None: the
    # OS places it. Keeps other threads from preempting the critical path (actors/affinity.py).
    cpus: list[int] | None = None
    # Custom Ray resources added to each of this role's placement bundles (one per tensor-parallel
    # rank), e.g. {verifier_host: 1}: the role runs only on nodes started with
    # `ray start --resources '{"verifier_host": 1}'` (cluster/launch/placement.py). CPUs and GPUs come
    # from num_threads and device, not from here.
    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"must map custom Ray resource names to amounts, e.g. {{verifier_host: 1}}, got {v!r}")
        for name, amount in v.items():   # messages start with the name: the error reads resources.<name>
            if not isinstance(name, str) or not _RESOURCE_NAME.fullmatch(name):
                raise ValueError(f"{name}: not a resource name (letters, digits and _ - . : / only)")
            if name in BUILTIN_RESOURCES:
                raise ValueError(f"{name}: set by num_threads and device; resources names custom resources only")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount <= 1e12:
                raise ValueError(f"{name}: the amount must be a number > 0 (and at most 1e12), got {amount!r}")
            if amount > 1 and amount != int(amount):
                raise ValueError(f"{name}: amounts above 1 must be whole numbers (nodes declare whole units), "
                                 f"got {amount}")
            if amount < 1 and round(amount * 10_000) != amount * 10_000:
                raise ValueError(f"{name}: Ray counts fractions of a unit in steps of 0.0001, got {amount}")
        return v

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return v
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"must be a non-empty list of distinct CPU ids >= 0, got {v!r}")
        if len(v) < info.data.get("num_threads", 1):
            raise ValueError(f"lists {len(v)} CPU(s) for num_threads={info.data['num_threads']}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"must be cpu, cuda or cuda:N, got {v!r}")


class DraftConfig(ModelConfig):
    # Drafter processes per verifier (docs/replicas.md): each owns the sequences admitted to it and
    # runs on a device (a placement bundle) of its own; with `cpus`, each pins its own share of them.
    replicas: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _cpus_per_drafter(self):
        if self.cpus is not None and len(self.cpus) < self.replicas * self.num_threads:
            raise ValueError(f"cpus: lists {len(self.cpus)} CPU(s), but replicas: {self.replicas} drafters of "
                             f"num_threads={self.num_threads} each pin CPUs of their own "
                             f"({self.replicas * self.num_threads} needed)")
        return self


class ModelsConfig(_Section):
    target: ModelConfig
    draft: DraftConfig | None = None


class OnlineLearningConfig(_Section):
    """The drafter keeps learning from the committed tokens (the target's own outputs) it already
    receives, in the gaps of its loop (actors/spec/online.py, docs/online-learning.md). Off by default."""
    enabled: bool = False
    lr: float = Field(1e-4, gt=0, le=1.0)                 # AdamW learning rate
    max_steps_per_s: float = Field(20.0, gt=0, le=10_000)  # optimizer steps per second at most
    buffer_tokens: int = Field(65536, ge=16)             # replay buffer bound (tokens)
    batch_size: int = Field(8, ge=1, le=1024)            # windows per optimizer step
    window_tokens: int = Field(128, ge=2, le=65536)      # tokens per training window
    save_path: str | None = None                         # HF checkpoint dir: at intervals and on shutdown
    save_every_s: float = Field(300.0, gt=0)
    # After optimizer steps, recompute the drafter's KV of active sequences before their next
    # draft (false: keep the KV computed with older weights; docs/online-learning.md measures both)
    recompute_kv: bool = False

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window_tokens > self.buffer_tokens:
            raise ValueError(f"window_tokens: {self.window_tokens} exceeds buffer_tokens ({self.buffer_tokens})")
        return self


class SpeculationConfig(_Section):
    mode: Literal[MODES] = "ssd"
    k: int = Field(4, ge=1, le=16)      # the largest K (with adaptive: each sequence's K is in 0..k)
    adaptive: bool = True               # K per sequence and round from live measurements; false: always k
    fan_out: list[int] | None = None    # per depth 0..k; None = geometric from measured acceptance
    fan_out_budget: int = Field(16, ge=1, le=256)
    backup: Literal[BACKUPS] = "jit"
    saguaro_c: float = Field(1.0, gt=0.0, le=1.0)
    online_learning: OnlineLearningConfig = OnlineLearningConfig()

    @model_validator(mode="after")
    def _fan_out_len(self):
        if why := fan_out_error(self.fan_out, self.k):
            raise ValueError(why)
        return self


class EngineConfig(_Section):
    max_batch: int = Field(8, ge=1, le=1024)
    max_seq_len: int = Field(1024, ge=16)
    data_plane_timeout_s: float = Field(30.0, gt=0)
    master_port: int | None = Field(None, ge=1, le=65535)
    # The verifier's KV budget (the drafter's pool follows from it): bytes, a size such as "12GiB"
    # or "512MiB", or a fraction 0 < f <= 1 of the target device's memory. None: max_batch
    # sequences of max_seq_len, capped on a GPU at 90 % of what weights and workspaces leave.
    # Requests are admitted by free KV (cluster/launch/memory_plan.py, actors/kv/).
    kv_cache_memory: int | float | str | None = None
    kv_block_size: int = Field(16, ge=1, le=1024)   # positions per KV block
    prefill_chunk: int = Field(512, ge=16)          # prompt positions per prefill forward
    # Keep full KV blocks of running and finished sequences by the digest of their token prefix
    # and reuse them for later requests that start the same way, on the verifier and the drafter
    # (actors/kv/prefix.py, docs/prefix-caching.md). Cached blocks nobody holds are evicted LRU.
    prefix_caching: bool = True
    # torch.compile the decode/verify forwards. Opt-in: on CPU it measured slower than eager
    # (docs/compiled.md); the compile itself takes seconds to minutes. On CUDA the forwards run at
    # padded bucket shapes and are captured as CUDA graphs (actors/model/buckets.py); elsewhere dynamic.
    compile: bool = False
    # Testing/CPU knob: pad decode/verify forwards to the fixed bucket shapes CUDA graphs use even
    # off CUDA (with compile: static shapes, one graph per bucket, no CUDA graphs).
    pad_shapes: bool = False

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_memory(cls, v):
        if v is not None:
            from cluster.launch.memory_plan import parse_memory

            parse_memory(v)
        return v


class TLSConfig(_Section):
    cert_file: str
    key_file: str


class ServerConfig(_Section):
    host: str = "127.0.0.1"             # loopback unless a deployment opens it on purpose
    port: int = Field(50051, ge=0, le=65535)   # 0 = any free port
    max_queue: int = Field(64, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)
    default_max_new_tokens: int = Field(128, ge=1)
    drain_grace_s: float = Field(10.0, ge=0)
    stream_interval_s: float = Field(0.02, ge=0, le=1)  # how often committed tokens are collected
    workers: int = Field(64, ge=1)
    auth_token_env: str | None = None   # name of the env var holding the bearer token
    tls: TLSConfig | None = None

    @model_validator(mode="after")
    def _defaults_fit(self):
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens: {self.default_max_new_tokens} exceeds "
                             f"max_new_tokens_limit ({self.max_new_tokens_limit})")
        return self

    def auth_token(self) -> str | None:
        if self.auth_token_env is None:
            return None
        token = os.environ.get(self.auth_token_env)
        if not token:
            raise ConfigError(f"server.auth_token_env: environment variable {self.auth_token_env!r} is not set "
                              "or empty")
        return token


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class HTTPConfig(_Section):
    """The OpenAI-compatible HTTP API beside gRPC (same engine, limits and bearer token)."""
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)    # 0 = any free port
    model_name: str | None = None              # the id /v1/models lists; None: models.target.path
    max_body_bytes: int = Field(1 << 20, ge=1024)


class DeploymentConfig(_Section):
    cluster: ClusterConfig = ClusterConfig()
    models: ModelsConfig
    speculation: SpeculationConfig = SpeculationConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    http: HTTPConfig = HTTPConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _draft_needed(self):
        if self.speculation.mode != "ar" and self.models.draft is None:
            raise ValueError(f"models.draft: required by speculation.mode={self.speculation.mode}")
        return self

    @model_validator(mode="after")
    def _placement(self):
        """Placements Ray could never make, or would wait for forever, are refused here."""
        c, tp = self.cluster, self.models.target.tensor_parallel_size
        if c.placement_strategy == "STRICT_SPREAD" and tp > 1:
            raise ValueError(f"cluster.placement_strategy: STRICT_SPREAD puts every bundle on a node of its own, but "
                             f"the target's {tp} tensor-parallel ranks (models.target.tensor_parallel_size) must "
                             "share one; keep PACK and separate the roles with models.target.resources and "
                             "models.draft.resources")
        embedded = c.launcher == "ray" and c.address is None
        t, d = self.models.target, self.models.draft
        drafters = d.replicas if d is not None and self.speculation.mode != "ar" else 0
        if c.launcher == "local" and drafters > 1:
            raise ValueError(f"models.draft.replicas: {drafters} drafters are placed by Ray, but cluster.launcher: "
                             "local runs one drafter process; use launcher: ray or replicas: 1")
        if embedded and c.num_cpus is not None and (c.replicas > 1 or drafters > 1):
            per = tp * t.num_threads + (drafters * d.num_threads if drafters else 0)
            if per * c.replicas > c.num_cpus:
                key = "cluster.replicas" if c.replicas > 1 else "models.draft.replicas"
                raise ValueError(f"{key}: {c.replicas} replica(s) of {per} CPU(s) each (a verifier and "
                                 f"{drafters} drafter(s)) need {per * c.replicas}, but the embedded cluster has "
                                 f"cluster.num_cpus={c.num_cpus}; raise num_cpus or lower {key}")
        if c.placement_strategy == "STRICT_SPREAD" and embedded and self.speculation.mode != "ar":
            raise ValueError("cluster.placement_strategy: STRICT_SPREAD needs a node per role, and the embedded "
                             "cluster (cluster.address: null) is one node; join a cluster (cluster.address: auto)")
        for role, m in (("target", self.models.target), ("draft", self.models.draft)):
            if m is None or not m.resources:
                continue
            if c.launcher == "local":
                raise ValueError(f"models.{role}.resources: custom Ray resources place a Ray actor, but "
                                 "cluster.launcher: local runs without Ray; remove one of them")
            if embedded:
                raise ValueError(f"models.{role}.resources: the embedded cluster (cluster.address: null) declares no "
                                 "custom resources; join a cluster whose nodes were started with "
                                 "`ray start --resources ...` (cluster.address: auto)")
        return self

    def warnings(self) -> list[str]:
        """Settings that are valid but do nothing here: said out loud, never silently ignored."""
        out = []
        sp = self.speculation
        if sp.mode == "ar" and self.models.draft is not None:
            out.append("speculation.mode=ar: models.draft is not loaded")
        if sp.mode != "ssd" and (sp.fan_out is not None):
            out.append(f"speculation.fan_out only applies to mode ssd (mode is {sp.mode})")
        if sp.mode == "ar" and sp.online_learning.enabled:
            out.append("speculation.online_learning only applies with a drafter (mode is ar)")
        if self.cluster.replicas > 1 and (self.models.target.cpus or (self.models.draft and self.models.draft.cpus)):
            out.append(f"cluster.replicas={self.cluster.replicas}: every replica pins the same models.*.cpus; two "
                       "replicas on one node then share those CPUs")
        if self.cluster.address is not None and self.cluster.num_cpus is not None:
            out.append("cluster.num_cpus only applies to the embedded cluster (cluster.address is set)")
        return out


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after",))


def _value_at(data: Any, loc: tuple) -> Any:
    for p in loc:
        if isinstance(data, dict) and p in data or isinstance(data, list) and isinstance(p, int) and p < len(data):
            data = data[p]
        else:
            return None
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def parse_config(data: Any, source: str = "config", overrides: dict[str, Any] | None = None) -> DeploymentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = _loc(err["loc"])
            value = err.get("input") if err["type"] != "missing" else None
            shown = "" if err["type"] == "missing" else f" (got {value!r})"[:200]
            if err["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key")
            elif err["type"] == "value_error" and isinstance(value, dict):
                # A cross-field check: its message starts with the field it is about.
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"{key}.{msg}" if key else msg)
            elif err["type"] == "value_error":
                lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"{key}: {err['msg']}{shown}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> DeploymentConfig:
    """Read and validate a deployment YAML; `overrides` maps dotted keys to values (CLI flags)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path), overrides)
