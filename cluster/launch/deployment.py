"""From a validated deployment config to running parts: model paths, EngineSpec, engine."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from actors.affinity import check_cpus
from actors.model.config import ModelArgs
from actors.engine_api import Engine
from actors.engine_spec import EngineSpec, OnlineLearningSpec
from actors.model.tokenizer import Tokenizer, vocab_mismatch
from actors.model.tp.shard import rank_args, rank_device, split_error
from cluster.config import ConfigError, DeploymentConfig

log = logging.getLogger(__name__)


def resolve_model(path: str) -> str:
    """Checkpoint directory for a YAML `path`; `demo:<size>/<role>` builds the demo pair once."""
    if path.startswith("demo:"):
        from cluster.models.build import resolve_demo

        return str(resolve_demo(path))
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    return str(p)


def _online_spec(ol) -> OnlineLearningSpec | None:
    if not ol.enabled:
        return None
    return OnlineLearningSpec(lr=ol.lr, max_steps_per_s=ol.max_steps_per_s, buffer_tokens=ol.buffer_tokens,
                              batch_size=ol.batch_size, window_tokens=ol.window_tokens,
                              save_path=str(Path(ol.save_path).expanduser()) if ol.save_path else None,
                              save_every_s=ol.save_every_s, recompute_kv=ol.recompute_kv)


def _dtype(mc) -> str:
    """A role's dtype; `auto` resolved here, once, on the host that reads the config, so the memory
    plan and the actors see the same concrete dtype."""
    if mc.dtype != "auto":
        return mc.dtype
    from actors.model.loader import auto_dtype

    name = str(auto_dtype(mc.device)).removeprefix("torch.")
    log.info("dtype auto on %s: %s", mc.device, name)
    return name


# How the engine's spec follows from the deployment schema, in one place. An EngineSpec field named
# like a key of `speculation:` or `engine:` takes that key's value; `target_<key>` and `draft_<key>`
# take `models.<role>.<key>`; the few whose names differ are listed here. Fields computed from the
# config (resolved paths, dtype auto, the head's layers, online learning) are set by engine_spec;
# the rest (the memory plan's block counts, addresses) keep their defaults.
RENAMED = {"timeout_s": "engine.data_plane_timeout_s", "num_threads": "models.target.num_threads",
           "draft_num_threads": "models.draft.num_threads",
           "tensor_parallel_size": "models.target.tensor_parallel_size"}
COMPUTED = {"target", "draft", "target_dtype", "draft_dtype", "draft_head_layers", "online_learning"}


def spec_fields(cfg: DeploymentConfig) -> dict:
    """The EngineSpec fields the config sets directly (see RENAMED)."""
    from dataclasses import fields

    draft = cfg.models.draft if cfg.speculation.mode != "ar" else None
    out = {}
    for f in fields(EngineSpec):
        if f.name in COMPUTED or (f.name.startswith("draft_") and draft is None):
            continue
        role, _, key = f.name.partition("_")
        if f.name in RENAMED:
            value = _at(cfg, RENAMED[f.name])
        elif f.name in type(cfg.speculation).model_fields:
            value = getattr(cfg.speculation, f.name)
        elif f.name in type(cfg.engine).model_fields:
            value = getattr(cfg.engine, f.name)
        elif role in ("target", "draft") and key in type(getattr(cfg.models, role)).model_fields:
            value = getattr(getattr(cfg.models, role), key)
        else:
            continue
        if value is not None:   # unset (or no drafter): the spec's own default
            out[f.name] = tuple(value) if f.name.endswith("_cpus") else _plain(value)
    return out


def _at(cfg: DeploymentConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None) if node is not None else None
    return node


def _plain(value):
    """A config value as the plain spec holds it (lists and dicts, not pydantic's own)."""
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def engine_spec(cfg: DeploymentConfig) -> EngineSpec:
    m, sp, en = cfg.models, cfg.speculation, cfg.engine
    for w in cfg.warnings():
        log.warning("config: %s", w)
    if m.draft is not None and m.draft.tensor_parallel_size > 1:
        raise ConfigError(f"models.draft.tensor_parallel_size={m.draft.tensor_parallel_size}: the drafter runs on "
                          "one device (only the target is split); use 1")
    draft = m.draft if sp.mode != "ar" else None
    target_path, draft_path = resolve_model(m.target.path), resolve_model(draft.path) if draft else None
    head_layers = _head_layers(draft_path, target_path) if draft else None
    if head_layers is not None and sp.online_learning is not None and sp.online_learning.enabled:
        raise ConfigError("speculation.online_learning: trains a draft model; models.draft.path is a draft head")
    spec = EngineSpec(
        target=target_path, draft=draft_path, draft_head_layers=head_layers,
        target_dtype=_dtype(m.target), draft_dtype=_dtype(draft) if draft else "float32",
        online_learning=_online_spec(sp.online_learning) if draft else None,
        **spec_fields(cfg),
    )
    from cluster.launch.memory_plan import plan_memory  # KV pools sized by the budget; a plan that cannot fit fails

    plan = plan_memory(spec, en.kv_cache_memory, target_args=_target_rank_args(cfg, spec.target),
                       launcher=cfg.cluster.launcher)
    spec = plan.apply(spec)
    spec.extra["memory_plan"] = plan.table()
    if spec.draft is not None and head_layers is None:   # (a head's vocabulary was checked against the target's)
        why = vocab_mismatch(Tokenizer(spec.target), Tokenizer(spec.draft))
        if why:
            raise ConfigError(f"models.draft.path: {draft.path!r} does not share the target's tokenizer: {why}")
    if cfg.cluster.address is None:  # embedded or local: every role runs here, so its CPUs and GPUs are known
        for key, cpus in (("models.target.cpus", spec.target_cpus), ("models.draft.cpus", spec.draft_cpus)):
            try:
                check_cpus(cpus, key)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _check_device(spec.target_device, "models.target.device")
        if cfg.cluster.launcher == "local" and spec.tensor_parallel_size > 1:   # rank r on the r-th GPU after it
            _check_device(rank_device(spec.target_device, spec.tensor_parallel_size - 1), "models.target.device")
        if draft:
            _check_device(spec.draft_device, "models.draft.device")
    return spec


def _head_layers(draft_path: str, target_path: str) -> tuple[int, ...] | None:
    """The target layers a draft head reads, when models.draft.path is one (actors/eagle/)."""
    import json

    from actors.model.config import CheckpointError
    from actors.eagle.checkpoint import head_args, is_head_dir

    if not is_head_dir(draft_path):
        return None
    cfg_file = Path(draft_path) / "config.json"
    try:
        return head_args(json.loads(cfg_file.read_text()), ModelArgs.from_dir(target_path), str(cfg_file)).aux_layers
    except CheckpointError as e:
        raise ConfigError(f"models.draft.path: {e}") from None


def _target_rank_args(cfg: DeploymentConfig, path: str):
    """The shapes one tensor-parallel rank of the target holds (the memory plan is per device);
    a checkpoint whose heads or MLP features do not split N ways is refused here, not at load."""
    n = cfg.models.target.tensor_parallel_size
    args = ModelArgs.from_dir(path)
    why = split_error(args, n)
    if why:
        raise ConfigError(f"models.target.tensor_parallel_size={n}: the target cannot be split {n} ways: "
                          f"{Path(path) / 'config.json'} has {why}")
    return rank_args(args, n)


def _check_device(device: str, key: str) -> None:
    """A CUDA device this machine lacks is a config error here, not a failure inside torch (or a
    placement group that waits for a GPU forever)."""
    if not device.startswith("cuda"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= n:
        raise ConfigError(f"{key}: {device!r}, but this machine has {n} CUDA device(s) that torch "
                          f"{torch.__version__} can use")


def tokenizer_for(spec: EngineSpec) -> Tokenizer:
    return Tokenizer(spec.target)


def start_engine(cfg: DeploymentConfig, spec: EngineSpec | None = None) -> Engine:
    """Bring the verifier and drafter up: as plain processes (`cluster.launcher: local`), or as
    Ray actors on an embedded or joined cluster (Ray is initialised here if need be)."""
    spec = spec or engine_spec(cfg)
    if cfg.cluster.launcher == "local":
        from actors.launch import LocalEngine

        return LocalEngine(spec).start()
    from cluster.launch.engine import RayEngine, init_ray

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.namespace)
    return RayEngine(spec, cfg.cluster.placement_strategy).start()


def shutdown_ray() -> None:
    """Shut down the Ray this process started, if any (a `launcher: local` run never imports Ray,
    so a machine without it serves too)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
