"""deploy/: the `ray up` YAMLs pass Ray's own cluster-config checks and point at real configs, and the
single-host path they automate (`ray start --head`, then `outrider serve --address`) serves and stops."""
from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS, _get_node_provider_cls
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.protocol.ports import free_port
from cluster.cli import build_parser
from cluster.config import load_config

REPO = Path(__file__).resolve().parents[1]
YAMLS = {"local": REPO / "deploy" / "ray-local-hosts.yaml", "aws": REPO / "deploy" / "ray-aws.yaml",
         "8gpu": REPO / "deploy" / "ray-8gpu-host.yaml"}
RAY = str(Path(sys.executable).with_name("ray"))


def _load(name: str) -> dict:
    return yaml.safe_load(YAMLS[name].read_text())


def ray_up_offline(cfg: dict) -> dict:
    """What `ray up` does to a cluster YAML before it reaches any host (ray/autoscaler/_private/commands.py:
    create_or_update_cluster -> _bootstrap_config), less the AWS provider's steps, which call EC2."""
    assert cfg["provider"]["type"] in _NODE_PROVIDERS, f"unknown provider type {cfg['provider']['type']!r}"
    cfg = prepare_config(copy.deepcopy(cfg))
    if cfg["provider"]["type"] != "local":
        validate_config(cfg)  # the YAML names its resources, so nothing is left to look up from AWS
        return cfg
    provider_cls = _get_node_provider_cls(cfg["provider"])
    cfg = provider_cls.fillout_available_node_types_resources(cfg)
    validate_config(cfg)
    return provider_cls.bootstrap_config(cfg)


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_ray_up_accepts(name):
    raw = _load(name)
    cfg = ray_up_offline(raw)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    if raw["provider"]["type"] == "local":
        node = types["local.cluster.node"]
        n = len(raw["provider"]["worker_ips"])
        assert (node["min_workers"], node["max_workers"]) == (n, n), node
    else:
        gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 2]
        assert gpu, "two-gpu.yaml packs both models on one node (STRICT_PACK): a node type needs >= 2 GPUs"
        assert all(t["min_workers"] <= t["max_workers"] for t in types.values()), types
    for key, want in {"head_start_ray_commands": "--head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml",
                      "worker_start_ray_commands": "--address=$RAY_HEAD_IP:6379"}.items():
        starts = [c for c in cfg[key] if "ray start" in c]
        assert len(starts) == 1 and want in starts[0], f"{key}: {starts}"
        for env in ("RAY_worker_niceness=0", "RAY_AUTH_MODE=token"):
            assert env in starts[0], f"{key}: {env} missing from {starts[0]!r}"


def test_8gpu_host_places_a_tp4_verifier_and_a_drafter():
    """The 8-GPU example's bundles: four target ranks then the drafter, one GPU each, all on the one
    host (STRICT_PACK; STRICT_SPREAD with TP > 1 is a config error)."""
    from actors.engine_spec import EngineSpec
    from cluster.launch.placement import drafter_bundle, placement_bundles

    cfg = load_config(REPO / "configs" / "llama70b-8gpu.yaml")
    assert cfg.cluster.placement_strategy == "STRICT_PACK" and "llama70b-8gpu.yaml" in YAMLS["8gpu"].read_text()
    m = cfg.models
    spec = EngineSpec(target=m.target.path, draft=m.draft.path, target_device=m.target.device,
                      draft_device=m.draft.device, tensor_parallel_size=m.target.tensor_parallel_size)
    bundles = placement_bundles(spec)
    assert [b["GPU"] for b in bundles] == [1] * 5 and drafter_bundle(spec) == 4, bundles


def _set(path: str, value):
    """A mutation of a loaded YAML: set the dotted key, or delete it (value None)."""
    *parents, last = path.split(".")

    def mutate(cfg):
        for p in parents:
            cfg = cfg[p]
        if value is None:
            del cfg[last]
        else:
            cfg[last] = value
    return mutate


BROKEN = [  # (yaml, mutation, the error `ray up` stops with, and what it says)
    ("local", _set("max_worker", 2), jsonschema.ValidationError, "'max_worker' was unexpected"),
    ("aws", _set("max_worker", 2), jsonschema.ValidationError, "'max_worker' was unexpected"),
    ("local", _set("head_start_ray_commands", "ray start --head"), jsonschema.ValidationError, "not of type 'array'"),
    ("aws", _set("auth.ssh_user", 22), jsonschema.ValidationError, "not of type 'string'"),
    ("local", _set("provider.worker_ips", None), click.ClickException, "list of `worker_ips`"),
    ("aws", _set("available_node_types.gpu.resources", None), jsonschema.ValidationError, "'resources' is a required"),
    ("aws", _set("head_node_type", "nope"), ValueError, "must be one of `available_node_types`"),
]


@pytest.mark.parametrize("name, mutate, error, match", BROKEN, ids=[f"{b[0]}-{b[3]}" for b in BROKEN])
def test_ray_up_rejects(name, mutate, error, match):
    cfg = _load(name)
    mutate(cfg)
    with pytest.raises(error, match=re.escape(match)):
        ray_up_offline(cfg)


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_serves_a_shipped_config(name):
    text, cfg = YAMLS[name].read_text(), _load(name)
    refs = set(re.findall(r"configs/[\w.-]+\.yaml", text))
    assert refs, "the YAML names no deployment config"
    for ref in refs:
        assert (REPO / ref).is_file(), f"{YAMLS[name].name} names {ref}, which does not exist"
    assert cfg["file_mounts"].get("~/outrider") == ".", "the repository must be mounted at ~/outrider"
    serves = [m for c in cfg["head_start_ray_commands"] for m in re.findall(r"outrider serve ([^>&;|'\"]*)", c)]
    assert len(serves) == 1, f"expected one `outrider serve` in head_start_ray_commands, got {serves}"
    args = build_parser().parse_args(["serve", *shlex.split(serves[0])])
    assert args.address == "auto", "the head's server must join the cluster `ray start --head` started"
    assert args.config.startswith("~/outrider/"), f"{args.config}: not inside the mounted repository"
    served = load_config(REPO / args.config.removeprefix("~/outrider/"))
    env = served.server.auth_token_env
    assert env is None or f"{env}=" in text, f"the config reads its token from ${env}, which the YAML never sets"


def _end_session(proc: subprocess.Popen) -> None:
    """Stop exactly the processes one Popen(start_new_session=True) started, by their session id: `ray stop`
    would end every Ray on this host, including other test sessions' clusters."""
    def alive() -> list[int]:
        proc.poll()  # reap our own child, or it lingers in the session as a zombie
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):  # gone meanwhile
                pids += [int(entry)] if os.getsid(int(entry)) == proc.pid else []
        return pids

    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.25)
    assert not alive(), f"processes of session {proc.pid} survived SIGKILL: {alive()}"


def test_serve_on_ray_start_head(tiny_pair, tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.serving.client import OutriderClient

    # `ray start` is another program: its ports can only be picked free here. Ours bind port 0.
    gcs = free_port()
    env = dict(os.environ, RAY_worker_niceness="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    local = yaml.safe_load((REPO / "configs" / "local-cpu.yaml").read_text())
    local["metrics"]["port"] = 0  # the shipped 9464 may be taken by another run on this host
    local.setdefault("http", {})["port"] = 0   # and the HTTP API's 8000
    local["http"] = {"port": 0}
    (config := tmp_path / "local-cpu.yaml").write_text(yaml.safe_dump(local))
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats", f"--dashboard-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    serve = None
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, f"ray start --head failed:\n{out[-3000:]}"
        log = tmp_path / "serve.log"
        with open(log, "w") as f:
            serve = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "serve", "-c", str(config),
                 "--address", f"127.0.0.1:{gcs}", "--port", "0"],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        grpc_port, deadline = None, time.monotonic() + 180
        while grpc_port is None:   # the port it bound, as logged once the port is open
            assert serve.poll() is None, f"outrider serve exited {serve.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no listening port logged after 180 s:\n{log.read_text()[-4000:]}"
            found = re.findall(r"listening on [\d.]+:(\d+)", log.read_text())
            grpc_port = int(found[0]) if found else None
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health, status, deadline = health_pb2_grpc.HealthStub(channel), None, time.monotonic() + 180
            while status != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                assert serve.poll() is None, f"outrider serve exited {serve.returncode}:\n{log.read_text()[-4000:]}"
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.5)
            assert status == health_pb2.HealthCheckResponse.SERVING, f"not SERVING after 180 s:\n{log.read_text()}"
        with OutriderClient(f"127.0.0.1:{grpc_port}") as client:
            text, final = client.generate_text("def main():", max_new_tokens=16)
        assert final.usage.completion_tokens == 16, f"{final.usage} finish={final.finish_reason}"
        assert isinstance(text, str) and text, f"empty completion: {text!r}"
        serve.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(timeout=60)
        assert serve.returncode == 0, (f"outrider serve after SIGTERM: exit {serve.returncode} (None: still "
                                       f"running after 60 s):\n{log.read_text()[-4000:]}")
    finally:
        if serve is not None:
            _end_session(serve)
        _end_session(head)  # also ends `ray start` itself if it is still starting
