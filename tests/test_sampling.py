"""Sampling rules on hand-made logits: each filter, the repetition penalty's sign rule, seeds, validation."""

from __future__ import annotations

import math

import pytest
import torch

from nanogemma.decoding import SamplingParams
from nanogemma.errors import NanogemmaError
from nanogemma.sampling import Sampler, apply_repetition_penalty, filter_logits, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))  # probabilities, as logits


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_greedy_ignores_filters():
    assert sample(LOGITS, 0.0, top_k=3, top_p=0.1, min_p=0.9).item() == 0
    assert sample(-LOGITS).item() == 4


@pytest.mark.parametrize("k, expected", [(1, [0]), (3, [0, 1, 2]), (5, [0, 1, 2, 3, 4]), (99, [0, 1, 2, 3, 4])])
def test_top_k(k, expected):
    assert kept(filter_logits(LOGITS, top_k=k)) == expected


@pytest.mark.parametrize("p, expected", [(0.4, [0]), (0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]),
                                         (0.8, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(filter_logits(LOGITS, top_p=p)) == expected


@pytest.mark.parametrize("m, expected", [(0.0, [0, 1, 2, 3, 4]), (0.1, [0, 1, 2, 3]), (0.3, [0, 1, 2]),
                                         (0.5, [0, 1]), (1.0, [0])])
def test_min_p_is_relative_to_the_top_token(m, expected):
    assert kept(filter_logits(LOGITS, min_p=m)) == expected


def test_filters_compose_and_keep_order_of_vocab():
    shuffled = LOGITS[:, [3, 0, 4, 2, 1]]
    assert kept(filter_logits(shuffled, top_k=3, top_p=0.7)) == [1, 4]


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]  # positive divided, negative multiplied: both less likely
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_sampler_penalises_prompt_and_generated_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=10.0), 1, 5)
    sampler.observe([[0]])
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]])
    assert sampler(logits).item() == 1  # token 0 (seen in the prompt) is pushed below token 1
    assert sampler(logits).item() == 2  # and now token 1 has been generated, so it is penalised too


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), 1, 5)
    draws = torch.stack([sampler(LOGITS.expand(1000, -1).contiguous()) for _ in range(8)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.02)


def test_temperature_sharpens_and_flattens():
    draws = {t: Sampler(SamplingParams(temperature=t, seed=1), 4000, 5)(LOGITS.expand(4000, -1).contiguous())
             for t in (0.3, 3.0)}
    assert (draws[0.3] == 0).float().mean() > 0.8
    assert (draws[3.0] == 0).float().mean() < 0.4


def test_seed_reproduces_and_differs():
    logits = torch.randn(4, 1000)
    params = SamplingParams(temperature=1.0, top_k=50, seed=7)
    a = [Sampler(params, 4, 1000)(logits) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = Sampler(SamplingParams(temperature=1.0, top_k=50, seed=8), 4, 1000)(logits)
    assert not torch.equal(a[0], b)


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": -0.5}, "--temperature"), ({"top_k": 0}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"), ({"min_p": -0.1}, "--min-p"), ({"min_p": 2.0}, "--min-p"),
    ({"repetition_penalty": 0.0}, "--repetition-penalty"),
])
def test_validation_names_the_flag(kwargs, flag):
    with pytest.raises(NanogemmaError, match=flag):
        SamplingParams(**kwargs).validate()


def test_min_p_floor_in_logit_space():
    # p_i >= min_p * p_max is the same as logit_i >= logit_max + log(min_p), for any temperature-scaled logits.
    logits = torch.randn(3, 50)
    out = filter_logits(logits, min_p=0.2)
    probs = logits.softmax(-1)
    assert torch.equal(torch.isfinite(out), probs >= 0.2 * probs.max(-1, keepdim=True).values - 1e-7)
    assert math.isclose(float(out.max()), float(logits.max()))
