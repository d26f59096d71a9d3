"""The training corpus (the standard library's source) and the held-out prompt sets.

Held-out modules are chosen by a fixed hash of their relative path, so every machine with the
same Python minor version gets the same split; prompts are cut from them deterministically.
"""
from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
HELD_OUT_EVERY = 25


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def source_files() -> list[tuple[str, Path]]:
    root = stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        out.append((rel, p))
    return out


def split() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files)."""
    train, held = [], []
    for rel, p in source_files():
        (held if _held_out(rel) else train).append(p)
    return train, held


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def _code_prompts(files: list[Path]) -> list[str]:
    out = []
    for p in files:
        lines = read(p).splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.lstrip().startswith(("def ", "class ")) and i > 0:
                text, j = "", i
                while j < len(lines) and len(text) + len(lines[j]) <= 300:
                    text += lines[j]
                    j += 1
                # End inside the next line (its indentation and first word): a prompt that ends
                # at a newline invites a weak model to answer with nothing but newlines.
                head = re.match(r"\s*\S+", lines[j]) if j < len(lines) else None
                if len(text) >= 120 and head:
                    out.append(text + head.group(0))
    return out


def _text_prompts(files: list[Path]) -> list[str]:
    out = []
    for p in files:
        try:
            tree = ast.parse(read(p))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    out.append(doc[:240].rsplit(" ", 1)[0])
    return out


def prompts(kind: str = "code", n: int = 20, seed: int = 0) -> list[str]:
    """`n` deterministic prompts from held-out modules: "code" (source from a def/class line)
    or "text" (docstrings)."""
    if kind not in ("code", "text"):
        raise ValueError(f"prompt kind must be 'code' or 'text', got {kind!r}")
    _, held = split()
    pool = _code_prompts(held) if kind == "code" else _text_prompts(held)
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:n]
