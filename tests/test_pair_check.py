"""A drafter must share the target's tokenizer: a pair that does not is a config error naming
models.draft.path, before any process starts."""
from __future__ import annotations

import json
import shutil

import pytest

from cluster.config import ConfigError, load_config
from cluster.launch.deployment import engine_spec


def _draft_copy(tiny_pair, tmp_path, edit):
    d = tmp_path / "draft"
    shutil.copytree(tiny_pair / "draft", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    edit(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


def _swap_two(tj):
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _add_token(tj):
    n = max(t["id"] for t in tj["added_tokens"]) + 1 + len(tj["model"]["vocab"])
    tj["added_tokens"].append({"id": n, "content": "<|extra|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})


@pytest.mark.parametrize("edit,why", [(_swap_two, "token id 30[01] is"),
                                      (_add_token, "the draft tokenizer has 513 tokens, the target.s 512")])
def test_mismatched_draft_tokenizer_is_a_config_error(tiny_pair, tmp_path, edit, why):
    d = _draft_copy(tiny_pair, tmp_path, edit)
    cfg = load_config("configs/local-cpu.yaml", {"models.draft.path": str(d)})
    with pytest.raises(ConfigError, match=f"models.draft.path: .*does not share the target's tokenizer: {why}"):
        engine_spec(cfg)


def test_same_tokenizer_passes_and_ar_skips_the_check(tiny_pair, tmp_path):
    assert engine_spec(load_config("configs/local-cpu.yaml")).draft is not None
    d = _draft_copy(tiny_pair, tmp_path, _swap_two)
    cfg = load_config("configs/local-cpu.yaml", {"models.draft.path": str(d), "speculation.mode": "ar"})
    assert engine_spec(cfg).draft is None
