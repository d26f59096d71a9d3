"""The two-host deployment of engine replicas (configs/llama70b-2x8gpu.yaml, brought up by
deploy/ray-2x8gpu-hosts.yaml): Ray's own `ray up` checks accept the YAML, it serves the config,
the config validates, each replica's memory plan fits an 80 GB GPU, and the replicas' placement
groups fit two hosts of 8 GPUs under the config's strategy (and four replicas would not)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from actors.engine_spec import EngineSpec
from cluster.cli import build_parser
from cluster.config import load_config
from cluster.launch.placement import placement_bundles
from tests.test_deploy import ray_up_offline
from tests.test_memory_plan import H100, _yaml_plan

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/llama70b-2x8gpu.yaml"
UP = REPO / "deploy" / "ray-2x8gpu-hosts.yaml"
HOSTS = [8, 8]


def place_strict_pack(groups: list[list[dict]], hosts: list[int]) -> list[int] | None:
    """Each group's GPU bundles all on one host (STRICT_PACK), first fit in order: the host index
    per group, or None when one does not fit."""
    free, out = list(hosts), []
    for g in groups:
        need = sum(b.get("GPU", 0) for b in g)
        host = next((h for h, f in enumerate(free) if f >= need), None)
        if host is None:
            return None
        free[host] -= need
        out.append(host)
    return out


def _replica_bundles(cfg) -> list[dict]:
    m = cfg.models
    d = m.draft
    spec = EngineSpec(target=m.target.path, draft=d.path if d else None, target_device=m.target.device,
                      draft_device=d.device if d else "cpu", tensor_parallel_size=m.target.tensor_parallel_size,
                      mode=cfg.speculation.mode)
    return placement_bundles(spec)


def test_ray_up_accepts_two_hosts_and_serves_the_replica_config():
    raw = yaml.safe_load(UP.read_text())
    cfg = ray_up_offline(raw)
    node = cfg["available_node_types"]["local.cluster.node"]
    assert (node["min_workers"], node["max_workers"]) == (1, 1) and len(raw["provider"]["worker_ips"]) == 1
    serves = [m for c in raw["head_start_ray_commands"] for m in re.findall(r"outrider serve ([^>&;|'\"]*)", c)]
    assert len(serves) == 1
    args = build_parser().parse_args(["serve", *shlex.split(serves[0])])
    assert args.address == "auto" and args.config == f"~/outrider/{CONFIG}"
    assert "OUTRIDER_TOKEN=" in UP.read_text()


def test_the_replica_config_validates_plans_and_fits_two_hosts(tmp_path):
    cfg = load_config(REPO / CONFIG)
    assert cfg.cluster.replicas == 2 and cfg.cluster.placement_strategy == "STRICT_PACK"
    assert cfg.models.target.tensor_parallel_size == 4 and cfg.warnings() == []
    # every replica gets the memory plan one engine gets: 32 full 8192-token sequences per verifier
    spec, plan = _yaml_plan(CONFIG, tmp_path)
    assert plan.target_blocks == 16_416 and all(plan.fits().values()) and plan.notes == []
    assert all(r.total < 0.9 * H100 for r in plan.roles)
    # placement: five one-GPU bundles per replica, one replica per host
    bundles = _replica_bundles(cfg)
    assert [b["GPU"] for b in bundles] == [1] * 5
    assert place_strict_pack([bundles] * cfg.cluster.replicas, HOSTS) == [0, 1]
    # why not two per host: four replicas with drafters need 20 GPUs; without drafters four fit
    assert place_strict_pack([bundles] * 4, HOSTS) is None
    ar = load_config(REPO / CONFIG, {"speculation.mode": "ar", "models.draft": None, "cluster.replicas": 4})
    assert place_strict_pack([_replica_bundles(ar)] * 4, HOSTS) == [0, 0, 1, 1]
