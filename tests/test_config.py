"""The deployment schema: shipped configs load, every bad value is a ConfigError naming its key."""
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import ConfigError, load_config, parse_config
from cluster.launch.deployment import engine_spec

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
BASE = {"models": {"target": {"path": "t"}, "draft": {"path": "d"}}}


def _cfg(**sections):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for name, body in sections.items():
        data.setdefault(name, {}).update(body)
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.models.target.path
    assert cfg.speculation.mode in ("ar", "sd", "ssd")


def test_local_cpu_is_embedded_ssd_on_two_cores():
    cfg = load_config("configs/local-cpu.yaml")
    assert cfg.cluster.address is None and cfg.cluster.num_cpus == 2
    assert cfg.speculation.mode == "ssd" and cfg.server.host == "127.0.0.1"
    assert cfg.models.target.path.startswith("demo:") and cfg.models.draft.path.startswith("demo:")


@pytest.mark.parametrize("sections, key", [
    ({"speculation": {"k": 0}}, "speculation.k"),
    ({"speculation": {"mode": "turbo"}}, "speculation.mode"),
    ({"speculation": {"fan_out": [1, 2]}}, "speculation.fan_out"),
    ({"speculation": {"k": 2, "fan_out": [1, -1, 0]}}, "speculation.fan_out"),
    ({"speculation": {"saguaro_c": 0}}, "speculation.saguaro_c"),
    ({"speculation": {"backup": "magic"}}, "speculation.backup"),
    ({"models": {"target": {"path": "t", "dtype": "int8"}}}, "models.target.dtype"),
    ({"models": {"target": {"path": "t", "device": "tpu"}}}, "models.target.device"),
    ({"models": {"target": {"path": "t", "tensor_parallel_size": 0}}}, "models.target.tensor_parallel_size"),
    ({"models": {"target": {"path": "t", "cpus": []}}}, "models.target.cpus"),
    ({"models": {"target": {"path": "t", "cpus": [0, 0]}}}, "models.target.cpus"),
    ({"models": {"target": {"path": "t", "num_threads": 2, "cpus": [0]}}}, "models.target.cpus"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"server": {"default_max_new_tokens": 900, "max_new_tokens_limit": 10}}, "server.default_max_new_tokens"),
    ({"server": {"tls": {"cert_file": "a"}}}, "server.tls.key_file"),
    ({"engine": {"max_batch": "lots"}}, "engine.max_batch"),
    ({"cluster": {"placement_strategy": "ANYWHERE"}}, "cluster.placement_strategy"),
    ({"metrics": {"enabled": "perhaps"}}, "metrics.enabled"),
    ({"models": {"target": {"path": "t", "resources": {"CPU": 1}}}}, "models.target.resources.CPU"),
    ({"models": {"target": {"path": "t", "resources": ["verifier_host"]}}}, "models.target.resources"),
    ({"models": {"target": {"path": "t", "resources": {"two words": 1}}}}, "models.target.resources.two words"),
    ({"models": {"target": {"path": "t", "resources": {"vh": 0}}}}, "models.target.resources.vh"),
    ({"models": {"target": {"path": "t", "resources": {"vh": -1}}}}, "models.target.resources.vh"),
    ({"models": {"target": {"path": "t"}, "draft": {"path": "d", "resources": {"drafter_host": 1.5}}}},
     "models.draft.resources.drafter_host"),
    ({"models": {"target": {"path": "t", "resources": {"verifier_host": "lots"}}}},
     "models.target.resources.verifier_host"),
    ({"models": {"target": {"path": "t", "resources": {"verifier_host": True}}}},
     "models.target.resources.verifier_host"),
    ({"models": {"target": {"path": "t", "resources": {"verifier_host": 0.00001}}}},
     "models.target.resources.verifier_host"),
])
def test_bad_values_name_the_key(sections, key):
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(**sections))
    assert key in str(e.value)


def test_draft_required_for_speculation():
    with pytest.raises(ConfigError, match="models.draft"):
        parse_config({"models": {"target": {"path": "t"}}})
    assert parse_config({"models": {"target": {"path": "t"}}, "speculation": {"mode": "ar"}}).models.draft is None


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_overrides_are_validated_too():
    cfg = parse_config(_cfg(), overrides={"speculation.k": 7, "cluster.address": "auto"})
    assert cfg.speculation.k == 7 and cfg.cluster.address == "auto"
    with pytest.raises(ConfigError, match="speculation.k"):
        parse_config(_cfg(), overrides={"speculation.k": -1})


def test_token_comes_from_the_environment(monkeypatch):
    cfg = parse_config(_cfg(server={"auth_token_env": "OUTRIDER_TEST_TOKEN"}))
    monkeypatch.delenv("OUTRIDER_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="OUTRIDER_TEST_TOKEN"):
        cfg.server.auth_token()
    monkeypatch.setenv("OUTRIDER_TEST_TOKEN", "s3cret")
    assert cfg.server.auth_token() == "s3cret"


def test_ignored_settings_are_reported():
    cfg = parse_config(_cfg(speculation={"mode": "ar"}))
    assert any("models.draft" in w for w in cfg.warnings())


def test_per_role_resources_and_strategies():
    joined = {"cluster": {"address": "auto"}}
    cfg = parse_config(_cfg(**joined, models={"target": {"path": "t", "resources": {"verifier_host": 1}},
                                              "draft": {"path": "d", "resources": {"drafter_host": 0.5,
                                                                                    "node:10.0.0.2": 0.01}}}))
    assert cfg.models.target.resources == {"verifier_host": 1} and cfg.models.draft.resources["drafter_host"] == 0.5
    assert parse_config(_cfg(cluster={"address": "auto", "placement_strategy": "STRICT_SPREAD"})).cluster.address
    refused = [  # (sections, the key the error must name, a phrase of its reason)
        ({"cluster": {"address": "auto", "placement_strategy": "STRICT_SPREAD"},
          "models": {"target": {"path": "t", "tensor_parallel_size": 4}}}, "cluster.placement_strategy", "share one"),
        ({"cluster": {"placement_strategy": "STRICT_SPREAD"}}, "cluster.placement_strategy", "embedded"),
        ({"models": {"target": {"path": "t", "resources": {"verifier_host": 1}}}}, "models.target.resources",
         "embedded"),
        ({"cluster": {"launcher": "local"}, "models": {"draft": {"path": "d", "resources": {"drafter_host": 1}}}},
         "models.draft.resources", "launcher: local"),
    ]
    for sections, key, why in refused:
        with pytest.raises(ConfigError) as e:
            parse_config(_cfg(**sections))
        assert key in str(e.value) and why in str(e.value), str(e.value)
    # one role only on the embedded cluster (mode ar): nothing to spread
    assert parse_config(_cfg(cluster={"placement_strategy": "STRICT_SPREAD"}, speculation={"mode": "ar"}))


def test_the_70b_example_passes_the_config_checks():
    """Its TP-4 target is accepted (tests/test_tp.py has the splits that are refused): engine_spec
    stops only at the checkpoint, absent here."""
    with pytest.raises(FileNotFoundError, match="Llama-3.1-70B"):
        engine_spec(load_config("configs/llama70b-5gpu.yaml"))


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=20))
_yaml_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["cluster", "models", "target", "draft", "path", "speculation", "k", "fan_out", "mode", "server", "port",
         "tls", "engine", "metrics", "dtype", "device", "junk"]), inner, max_size=5)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yaml_values)
def test_fuzzed_configs_error_cleanly(data):
    """Adversarial structures: valid or ConfigError, never another exception."""
    try:
        parse_config(data)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_yaml_bytes_error_cleanly(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(blob)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


def test_the_engine_spec_is_derived_from_the_schema_by_name():
    """One schema: every key of speculation:, engine: and models.<role>: reaches the engine's spec
    (by its own name, as target_<key>/draft_<key>, or as listed in RENAMED) unless it is one the
    host resolves itself; a key added to the schema fails here until it is one or the other."""
    from dataclasses import fields

    from actors.engine_spec import EngineSpec
    from cluster.config import DraftConfig, EngineConfig, ModelConfig, SpeculationConfig
    from cluster.launch.deployment import COMPUTED, RENAMED, spec_fields

    names = {f.name for f in fields(EngineSpec)}
    assert names >= set(RENAMED) | COMPUTED
    host = {"engine.kv_cache_memory",                    # the memory plan's budget: block counts reach the spec
            "models.target.path", "models.draft.path",   # resolved checkpoint directories (target, draft)
            "models.draft.tensor_parallel_size"}        # refused above 1 (only the target is split)
    reached = set(RENAMED.values())
    for section, model in (("speculation", SpeculationConfig), ("engine", EngineConfig)):
        reached |= {f"{section}.{k}" for k in model.model_fields if k in names}
    roles = {"target": ModelConfig, "draft": DraftConfig}
    for role, model in roles.items():
        reached |= {f"models.{role}.{k}" for k in model.model_fields if f"{role}_{k}" in names}
    keys = ({f"speculation.{k}" for k in SpeculationConfig.model_fields}
            | {f"engine.{k}" for k in EngineConfig.model_fields}
            | {f"models.{r}.{k}" for r, model in roles.items() for k in model.model_fields})
    assert keys - reached == host

    cfg = load_config("configs/local-cpu.yaml", {
        "speculation.k": 3, "speculation.fan_out_budget": 5, "speculation.backup": "ngram", "engine.prefill_chunk": 64,
        "engine.data_plane_timeout_s": 7.5, "engine.master_port": 29123,
        "models.target.resources": {"verifier_host": 1}, "speculation.adaptive": False, "cluster.address": "auto",
        "models.draft.replicas": 2, "models.draft.cpus": [0, 1]})
    got = spec_fields(cfg)
    assert (got["k"], got["fan_out_budget"], got["backup"], got["prefill_chunk"], got["timeout_s"], got["master_port"],
            got["draft_cpus"], got["target_resources"], got["adaptive"], got["draft_replicas"]) == (
        3, 5, "ngram", 64, 7.5, 29123, (0, 1), {"verifier_host": 1}, False, 2)
    ar = spec_fields(load_config("configs/local-cpu.yaml", {"speculation.mode": "ar", "models.draft.cpus": [1]}))
    assert not any(k.startswith("draft_") for k in ar)   # no drafter: its fields keep the spec's defaults
