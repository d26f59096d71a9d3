"""`outrider bench`: a quick smoke run on the tiny pair, and the full bench (slow) on the bench pair."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cluster.bench.run import run_bench

SUMMARY = re.compile(r"^SSD/AR=\d+\.\d\d SSD/SD=\d+\.\d\d SSD/SD-ideal=\d+\.\d\d SSD/HF=\d+\.\d\d SSD/bound=\d+\.\d\d"
                     r"( SSD/ssd-k\d+=\d+\.\d\d)?$")
MODES = {"ar", "sd-k4", "ssd", "hf", "hf-assisted", "ar-2t"}


def _check_report(out: Path, stdout: str, modes: set[str]) -> dict:
    for name in ("report.json", "report.md", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert modes <= set(rep["modes"])
    for name, m in {**rep["modes"], **rep["saguaro"]}.items():
        assert m["tokens_per_s"] > 0, name
    assert rep["outrider_mismatches"] == 0, rep["greedy_check"]
    ssd = rep["modes"]["ssd"]
    assert ssd["spec"]["drafts"] > 0 and ssd["breakdown_per_round"]["rounds"] > 0
    assert len(ssd["hit_rate_by_depth"]) == rep["settings"]["k"] + 1
    assert rep["derived"]["bound_tok_s"] > 0
    # The bound's t_verify was sampled once per prompt (and main phase) between the timed generations.
    n_probe, n_prompts = rep["kernels"]["t_verify_interleaved_n"], rep["settings"]["prompts"]
    assert n_probe >= n_prompts and n_probe % n_prompts == 0
    # the bound takes the faster of the interleaved and the quiet t_verify (never flattered)
    d = rep["derived"]
    assert d["t_verify_interleaved_ms"] == round(1e3 * rep["kernels"]["t_verify_interleaved_s"], 3)
    assert d["t_verify_quiet_ms"] > 0
    assert d["t_verify_ms"] == min(d["t_verify_interleaved_ms"], d["t_verify_quiet_ms"])
    assert 0 < ssd["breakdown_per_round"]["transport_plus_control_frac"] < 1
    assert 0 < ssd["breakdown_per_round"]["prefill_frac"] < 1
    # the end-to-end ceilings only add costs to the bound, so each sits below it
    ceilings = rep["derived"]["ceilings_tok_s"]
    assert ceilings and all(0 < c < rep["derived"]["bound_tok_s"] for c in ceilings.values()), ceilings
    lines = stdout.strip().splitlines()
    assert SUMMARY.match(lines[-1]), lines[-1]
    assert lines[-1] == rep["summary_line"]
    return rep


@pytest.mark.slow   # a bench run (36 s), as every run of `outrider bench` here: `pytest -m slow`
@pytest.mark.timeout(300)
def test_bench_quick_tiny(ray_local, tiny_pair, tmp_path, capsys):
    cfg = yaml.safe_load(Path("configs/local-cpu.yaml").read_text())
    cfg["models"]["target"]["path"], cfg["models"]["draft"]["path"] = "demo:tiny/target", "demo:tiny/draft"
    cfg["metrics"]["enabled"] = False
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert run_bench(str(path), str(out), quick=True) == 0
    rep = _check_report(out, capsys.readouterr().out, MODES)
    assert rep["settings"]["new_tokens"] == 24 and rep["settings"]["prompts"] == 2
    for name in MODES:
        assert rep["modes"][name]["tokens"] == 2 * 24, name  # EOS ignored: a fixed length everywhere
    assert ray_local.is_initialized()  # a cluster run_bench did not start stays up


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_full(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_bench("configs/bench-cpu.yaml", str(out), quick=False) == 0
    rep = _check_report(out, capsys.readouterr().out, {"ar", "ssd", "hf", "hf-assisted", "ar-2t", "sd-k5"})
    assert rep["wall_s"] < 600


@pytest.mark.slow   # a bench run (23 s)
@pytest.mark.timeout(400)
def test_explore_grid_with_a_drafter_variant(ray_local, tiny_pair, tmp_path, capsys):
    from cluster.bench.explore import run_explore

    cfg = yaml.safe_load(Path("configs/local-cpu.yaml").read_text())
    cfg["metrics"]["enabled"] = False
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    drafts = ["demo:tiny/draft", "demo:tiny/draft-1x64"]
    assert run_explore(str(path), str(out), drafts, ks=[3], budgets=[4], quick=True) == 0
    rep = json.loads((out / "explore.json").read_text())
    assert [r["mode"] for r in rep["rows"]] == ["ssd draft k=3 budget=4", "ssd draft-1x64 k=3 budget=4"]
    for r in rep["rows"]:
        assert r["mismatches"] == 0 and r["tok_s"] > 0 and r["e_acc_plus_1"] > 1, r
    assert rep["rows"][1]["overrides"]["models.draft.path"] == "demo:tiny/draft-1x64"
    # the variant was distilled on the pair's own target, into the pair's directory
    info = json.loads((tiny_pair / "draft-1x64" / "build.json").read_text())
    assert info["draft"]["dim"] == 64 and 0 < info["greedy_agreement"] <= 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == rep["summary_line"] and lines[-1].startswith("best: ssd ")
    assert (out / "explore.md").read_text().count("| ssd ") == 2


@pytest.mark.parametrize("name", ["draft-0x64", "draft-1x100", "draft-2x1024", "draft-two"])
def test_drafter_variant_names_are_checked(name):
    from cluster.models.build import resolve_demo

    with pytest.raises(ValueError, match=name):
        resolve_demo(f"demo:tiny/{name}")


def test_idle_engines_run_in_the_background_class_only_while_another_is_timed():
    """cluster.bench.quiet.in_background: every thread of the given processes is SCHED_IDLE inside the
    block (threads started before it included) and SCHED_OTHER again after it, even on error."""
    import os
    import subprocess
    import sys

    from cluster.bench.quiet import in_background

    code = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print('up', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"

        def policies() -> set[int]:
            return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{child.pid}/task")}

        assert len(os.listdir(f"/proc/{child.pid}/task")) >= 4 and policies() == {os.SCHED_OTHER}
        # a pid that does not exist is skipped
        with pytest.raises(RuntimeError), in_background([child.pid, 2**22 + 12345]):
            assert policies() == {os.SCHED_IDLE}
            raise RuntimeError("the timed run failed")
        assert policies() == {os.SCHED_OTHER}
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow   # a bench run of four fresh engines (33 s)
def test_concurrency_sweep_reports_every_point(tiny_pair, tmp_path):
    """`outrider bench --concurrency`: each mode at each stream count, from a fresh engine."""
    from cluster.bench.paged import run_concurrency

    assert run_concurrency("configs/local-cpu.yaml", str(tmp_path), [1, 3], ["ar", "ssd"], new=8, runs=1) == 0
    rep = json.loads((tmp_path / "concurrency.json").read_text())
    assert [(p["mode"], p["streams"]) for p in rep["points"]] == [("ar", 1), ("ar", 3), ("ssd", 1), ("ssd", 3)]
    assert all(p["tok_s"] > 0 and p["latency_s"] > 0 for p in rep["points"])


def test_modes_put_ssd_as_configured_beside_ssd_at_its_best_fixed_k():
    from cluster.bench.run import build_modes, sweep_modes

    sweep = {m.name: m.overrides for m in sweep_modes(5, (3, 4))}
    assert set(sweep) == {"sd-k3", "sd-k4", "sd-k5", "ssd-k3", "ssd-k4", "ssd-k5"}
    assert all(ov["speculation.adaptive"] is False for ov in sweep.values())   # the sweep is fixed K
    modes = {m.name: m.overrides for m in build_modes(5, [3, 5], 4)}
    assert "speculation.adaptive" not in modes["ssd"]                         # as the config ships it
    assert modes["ssd-k4"]["speculation.adaptive"] is False and modes["ssd-k4"]["speculation.k"] == 4
    assert modes["sd-k3"]["speculation.adaptive"] is False
    assert "ssd-k5" not in {m.name for m in build_modes(5, [5], None)}
