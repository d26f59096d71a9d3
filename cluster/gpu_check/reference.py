"""transformers on the same weights: greedy continuations with their logits (for near-ties), and
the exact law of a short sampled continuation (for the chi-square)."""
from __future__ import annotations

import math

import torch


def load_hf(path, dtype: str, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    # the GPU machine's transformers may predate `dtype=` (4.56), where an unknown keyword is ignored
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": getattr(torch, dtype)}
    hf = AutoModelForCausalLM.from_pretrained(str(path), **kw).to(device).eval()
    assert hf.dtype == getattr(torch, dtype), (hf.dtype, dtype)
    hf.generation_config.eos_token_id = None   # random weights: run every prompt to its length
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def greedy(hf, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """(continuations, per prompt the float32 logits [new, V] on the CPU that chose each token)."""
    dev = hf.device
    refs, logits = [], []
    for p in prompts:
        out = hf.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                          device=dev), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
        refs.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.stack([x[0].float().cpu() for x in out.logits]))
    return refs, logits


def compare(outs: list[list[int]], refs: list[list[int]], logits: list[torch.Tensor], tie_gap: float) -> dict:
    """Identity per prompt; at the first difference, a near-tie when both tokens' logits lie within
    `tie_gap` of the reference's top logit there (after it the two continuations differ anyway)."""
    same, ties, bad = 0, [], []
    for i, (o, r, lg) in enumerate(zip(outs, refs, logits)):
        if o == r:
            same += 1
            continue
        j = next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
        if j >= min(len(o), len(r)):
            bad.append(f"prompt {i}: {len(o)} tokens, reference {len(r)}")
            continue
        top = float(lg[j].max())
        gap = max(top - float(lg[j][o[j]]), top - float(lg[j][r[j]]))
        (ties if gap < tie_gap else bad).append(f"prompt {i} pos {j}: {o[j]} vs {r[j]} gap {gap:.2g}")
    return {"same": same, "n": len(outs), "near_ties": ties, "mismatches": bad}


def warp(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The sampling law by hand (float64): temperature, then top-k, then softmax."""
    x = logits.double() / temperature
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    return torch.softmax(x, dim=-1)


@torch.inference_mode()
def exact_law(hf, prompt: list[int], depth: int, temperature: float, top_k: int) -> dict[tuple, float]:
    """P(t1..t_depth) under the target for every outcome in the top-k tree (k^depth of them),
    from one batched forward per depth."""
    dev = hf.device
    law: dict[tuple, float] = {(): 1.0}
    for _ in range(depth):
        prefixes = list(law)
        x = torch.tensor([prompt + list(p) for p in prefixes], device=dev)
        p = warp(hf(x).logits[:, -1].float().cpu(), temperature, top_k)
        top = torch.topk(p, top_k, dim=-1)
        law = {pre + (int(t),): law[pre] * float(q) for pre, ts, qs in zip(prefixes, top.indices, top.values)
               for t, q in zip(ts, qs)}
    return law


def chi_square(law: dict[tuple, float], samples: list[tuple], min_expected: float = 5.0) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of `samples` against `law`; outcomes expected
    fewer than min_expected times are pooled with everything outside the law."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    bins = [(counts.get(o, 0), n * p) for o, p in law.items() if n * p >= min_expected]
    rest_obs = n - sum(o for o, _ in bins)
    rest_exp = n - sum(e for _, e in bins)
    if rest_exp >= min_expected or rest_obs:
        bins.append((rest_obs, max(rest_exp, 1e-9)))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    df = len(bins) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64))) if df > 0 else 1.0
    return stat, df, p


def outcomes(tokens: list[list[int]], depth: int) -> list[tuple]:
    return [tuple(t[:depth]) for t in tokens]


