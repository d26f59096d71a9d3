"""The target's log-probabilities of emitted tokens, for requests that ask for them (OpenAI's
`logprobs` / `top_logprobs`, gRPC's `GenerateRequest.logprobs`).

Definition: raw. A token's logprob is log_softmax of the target's logits at the position that
emitted it, in float32, before temperature, top-k and top-p. It is the same number for a greedy
and a sampled request, and it does not depend on how the token was produced: an accepted draft
token, a correction, a bonus token or the prefill's first token all read the row of the one
verify (or prefill) forward that scored that position. So speculation cannot change it, and it
equals a teacher-forced forward of the target over prompt + output (tests/test_logprobs.py).
Processed values would be useless for greedy requests (a one-hot: 0 and -inf), which is why
vLLM defaults to raw as well.

An entry per token is [logprob, [[id, logprob], ...]] with the top `n` alternatives (n = 0..20,
most likely first); it travels in the verifier's events as JSON beside "tokens".
"""
from __future__ import annotations

import torch

MAX_TOP_LOGPROBS = 20   # OpenAI's limit for top_logprobs


def token_logprobs(rows: torch.Tensor, tokens: list[int], n_top: int) -> list[list]:
    """rows [len(tokens), V]: the logits that emitted `tokens` (row i emitted tokens[i]) -> one
    [logprob, top] entry per token. float32 whatever the model's dtype: the verification math."""
    lp = torch.log_softmax(rows.float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if n_top <= 0:
        return [[c, []] for c in chosen]
    vals, ids = lp.topk(min(n_top, lp.shape[-1]), dim=-1)
    return [[c, [list(p) for p in zip(i, v)]] for c, i, v in zip(chosen, ids.tolist(), vals.tolist())]
