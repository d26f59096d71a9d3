"""Where each role runs: one Ray placement group, one bundle per device.

The bundle list is the target's ranks first (one bundle each: `tensor_parallel_size` of them,
indices 0..N-1, rank 0 being the verifier), then the drafters' (indices N..N+M-1, one per
drafter: `models.draft.replicas`). Every bundle of a role
carries that role's custom resources (`models.<role>.resources`), so a role lands only on nodes
started with them (`ray start --resources '{"verifier_host": 1}'`; a node hosting a TP-4 target
declares 4 units). `cluster.placement_strategy` then decides how the bundles share nodes: PACK
(the default) keeps them together where the resources allow, STRICT_SPREAD gives every bundle a
node of its own (so it cannot serve a tensor-parallel target: its ranks must share one).
"""
from __future__ import annotations

from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.engine_spec import EngineSpec
from cluster.config import BUILTIN_RESOURCES


def role_bundle(device: str, num_threads: int, resources: dict[str, float]) -> dict[str, float]:
    """One device's worth of a role: its CPUs (torch threads), its GPU, its custom resources."""
    bundle = {"CPU": num_threads, **resources}
    if device.startswith("cuda"):
        bundle["GPU"] = 1
    return bundle


def placement_bundles(spec: EngineSpec) -> list[dict[str, float]]:
    """The target's ranks, then the drafters (when there are any)."""
    target = role_bundle(spec.target_device, spec.num_threads, spec.target_resources)
    bundles = [dict(target) for _ in range(spec.tensor_parallel_size)]
    if spec.speculative:
        draft = role_bundle(spec.draft_device, spec.draft_num_threads, spec.draft_resources)
        bundles += [dict(draft) for _ in range(spec.draft_replicas)]
    return bundles


def drafter_bundle(spec: EngineSpec, i: int = 0) -> int:
    """Drafter i's bundle index: after the target's ranks."""
    return spec.tensor_parallel_size + i


def actor_options(bundle: dict[str, float], pg, index: int, **kw) -> dict:
    """Ray options that run an actor in bundle `index` of `pg`. The bundle already sits on a node
    with the role's custom resources; the actor claims its CPUs and GPU from it."""
    return dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index), **kw)


def missing_resources(bundles: list[dict[str, float]], available: dict[str, float]) -> dict[str, float]:
    """Custom resources the bundles need in total beyond what the cluster's nodes declare in total
    (`ray.cluster_resources()`): a placement group asking for them waits until such nodes join."""
    need: dict[str, float] = {}
    for b in bundles:
        for name, amount in b.items():
            if name not in BUILTIN_RESOURCES:
                need[name] = need.get(name, 0) + amount
    return {name: amount for name, amount in need.items() if available.get(name, 0) < amount}
