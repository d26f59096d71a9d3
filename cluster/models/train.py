"""Training pieces for the demo pair: BPE tokenizer, pretraining, distillation, HF-format save.

Everything is seeded and step-budgeted (not time-budgeted) so a build is reproducible. The
drafter is distilled on the target's own logits: what speculative decoding rewards is agreement
with the target, not language-model quality, and distillation buys far more of it per step.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from actors.model.config import ModelArgs
from cluster.models.progress import Progress
from actors.model.model import Transformer

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate: int


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_corpus(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def hf_config(shape: Shape, vocab: int, eos_id: int, max_pos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": shape.dim, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads, "head_dim": shape.dim // shape.n_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "torch_dtype": "float32",
    }


def new_model(cfg: dict, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf(cfg))
    for _name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
        yield x[:, :-1], x[:, 1:]


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))) + peak * 0.05


def _optimise(model: Transformer, loss_fn, data, steps, batch, seq, lr, seed, desc) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    loss_ema = None
    # a bar on a terminal, and a log line every 30 s either way
    bar = Progress(_batches(data, steps, batch, seq, seed), total=steps, desc=f"training the {desc}", unit="step",
                   log=log)
    for step, (x, y) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    return loss_ema


def pretrain(model: Transformer, data, steps, batch, seq, lr, seed) -> float:
    def loss_fn(x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return _optimise(model, loss_fn, data, steps, batch, seq, lr, seed, "target")


def distill(student: Transformer, teacher: Transformer, data, steps, batch, seq, lr, seed) -> float:
    """Minimise KL(teacher || student) on the teacher's next-token distributions."""
    def loss_fn(x, y):
        with torch.no_grad():
            t = F.log_softmax(teacher(x).float(), -1)
        s = F.log_softmax(student(x).float(), -1)
        return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    return _optimise(student, loss_fn, data, steps, batch, seq, lr, seed, "draft")


@torch.inference_mode()
def agreement(target: Transformer, draft: Transformer, data: torch.Tensor, n_windows: int, seq: int) -> float:
    """Teacher-forced greedy top-1 agreement of draft and target on held-out tokens."""
    hits = total = 0
    for x, _ in _batches(data, n_windows, 1, seq, seed=1234):
        a, b = target(x).argmax(-1), draft(x).argmax(-1)
        hits += int((a == b).sum())
        total += a.numel()
    return hits / max(1, total)


def save_hf(model: Transformer, cfg: dict, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "pad_token": EOS, "unk_token": None, "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"]}, indent=2))
