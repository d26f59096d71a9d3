"""Sampling settings: temperature, top-k, top-p, validation, and Saguaro rescaling."""

from __future__ import annotations

import math

import pytest
import torch

from actors.spec.sampling import SamplingParams, probs_from_logits, saguaro_scale, sample

from tests.test_verify import N, _assert_distributed_as, _dist, _random_rows


def _support(probs: torch.Tensor) -> set[int]:
    return set(probs.nonzero().flatten().tolist())


def test_temperature_only_is_softmax() -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(51))
    probs = probs_from_logits(logits, SamplingParams(temperature=0.7))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, -1))


def test_greedy_is_one_hot_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    probs = probs_from_logits(logits, SamplingParams(top_k=2, top_p=0.5))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]  # ties go to the first index
    assert sample(probs, None).tolist() == [1, 0]


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, 2.5])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    assert _support(probs) == {1, 3, 5}
    torch.testing.assert_close(probs[[1, 3, 5]], torch.softmax(logits[[1, 3, 5]], -1))
    # Ties at the cut still give exactly k tokens.
    tied = probs_from_logits(torch.tensor([1.0, 1.0, 1.0, 0.0]), SamplingParams(temperature=1.0, top_k=2))
    assert len(_support(tied)) == 2
    # k >= V is a no-op.
    torch.testing.assert_close(probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=50)),
                               torch.softmax(logits, -1))


@pytest.mark.parametrize("top_p, expected", [
    (1e-6, {0}), (0.4, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    base = torch.tensor([0.5, 0.25, 0.15, 0.1])
    # Shuffle the vocabulary so the kept set is found by probability, not by position.
    perm = torch.tensor([2, 0, 3, 1])
    probs = probs_from_logits(base.log()[perm], SamplingParams(temperature=1.0, top_p=top_p))
    assert _support(probs) == {int(perm.argsort()[i]) for i in expected}
    kept = [int(perm.argsort()[i]) for i in sorted(expected)]
    torch.testing.assert_close(probs[kept], base[sorted(expected)] / base[sorted(expected)].sum())


def test_top_k_then_top_p_and_batch_dims() -> None:
    logits = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(52))
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.7)
    probs = probs_from_logits(logits, params)
    assert probs.shape == logits.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    for row, out in zip(logits.reshape(-1, 12), probs.reshape(-1, 12)):
        top5 = torch.softmax(row / 0.8, -1).topk(5)
        renorm = top5.values / top5.values.sum()
        n_keep = int((renorm.cumsum(0) - renorm < 0.7).sum())
        assert _support(out) == set(top5.indices[:n_keep].tolist())
        torch.testing.assert_close(out, probs_from_logits(row, params))


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 0, 0.99), (0.8, 20, 0.8), (1.0, 5, 1.0), (0.5, 3, 0.3), (2.0, 0, 0.05),
])
def test_same_distribution_as_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    """Temperature, top-k and top-p follow transformers' own logits warpers (generate()'s order:
    temperature, top-k, top-p; top-p keeps the smallest set whose mass reaches top_p): the same
    support and the same probabilities, row by row, on many random rows of several sharpnesses."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(53)
    logits = torch.randn(600, 64, generator=g) * torch.tensor([0.5, 2.0, 5.0]).repeat_interleave(200)[:, None]
    warp = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warp.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warp.append(TopPLogitsWarper(top_p))
    ref = torch.softmax(LogitsProcessorList(warp)(None, logits.clone()), -1)
    ours = probs_from_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(ours > 0, ref > 0), f"support differs in {int(((ours > 0) != (ref > 0)).any(-1).sum())} rows"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    if top_p < 1:  # the cut really bites
        assert (ref > 0).sum(-1).float().mean() < 64 - 1


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("seed", 1.5),
])
def test_validate_names_the_bad_field(field: str, value: float) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        probs_from_logits(torch.zeros(4), params)


def test_validate_accepts_good_values() -> None:
    assert SamplingParams().validate().greedy
    assert not SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=3).validate().greedy


# -- sample -----------------------------------------------------------------------------------
def test_sample_shapes_and_distribution() -> None:
    g = torch.Generator().manual_seed(61)
    probs = _dist(0.1, 0.0, 0.4, 0.2, 0.3)
    draws = sample(probs.expand(N, 5), g)
    assert draws.shape == (N,) and draws.dtype == torch.long
    _assert_distributed_as(draws.numpy(), probs)
    assert sample(torch.softmax(torch.randn(2, 3, 7), -1), g).shape == (2, 3)
    assert sample(probs, g).shape == ()


# -- Saguaro ----------------------------------------------------------------------------------
def test_saguaro_scales_top_f_mass_by_c() -> None:
    q = _random_rows(1, 8, 71)[0]
    c, F = 0.4, 3
    out = saguaro_scale(q, F, c)
    top = set(q.topk(F).indices.tolist())
    factor = torch.tensor([c if i in top else 1.0 for i in range(8)])
    torch.testing.assert_close(out, q * factor / (q * factor).sum())
    # Equivalently, ratios between a top-F token and any other token shrink by exactly c.
    i, j = max(top), min(set(range(8)) - top)
    torch.testing.assert_close(out[i] / out[j], c * q[i] / q[j])


def test_saguaro_per_row_fan_out_and_identity() -> None:
    q = _random_rows(3, 8, 72)
    assert saguaro_scale(q, 2, 1.0) is q
    out = saguaro_scale(q, torch.tensor([0, 1, 8]), 0.5)
    torch.testing.assert_close(out[0], q[0])  # fan-out 0: untouched
    torch.testing.assert_close(out[2], q[2])  # every token scaled alike: renormalises back
    top1 = int(q[1].argmax())
    others = [i for i in range(8) if i != top1]
    ratio = out[1, others] / q[1, others]
    torch.testing.assert_close(ratio, ratio[0].expand(7))
    torch.testing.assert_close(out[1, top1] / q[1, top1], 0.5 * ratio[0])


def test_saguaro_rejects_bad_arguments() -> None:
    q = _random_rows(2, 8, 73)
    for c in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="c must be"):
            saguaro_scale(q, 2, c)
    with pytest.raises(ValueError, match="fan_out"):
        saguaro_scale(q, torch.tensor([1, 2, 3]), 0.5)


