"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeding, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.config import UsageError
from gpt.sampling import SamplingParams, sample_next

VOCAB = 20


def random_logits(batch: int = 4, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 400, seed: int = 0) -> torch.Tensor:
    """n samples for every row, (n, B): one call on the rows repeated n times."""
    generator = torch.Generator().manual_seed(seed)
    return sample_next(logits.repeat(n, 1), params, generator).view(n, logits.size(0))


def support(samples: torch.Tensor, row: int) -> set[int]:
    return set(samples[:, row].tolist())


def test_output_shape_and_dtype():
    out = sample_next(random_logits(batch=3), SamplingParams(), torch.Generator().manual_seed(0))
    assert out.shape == (3,)
    assert out.dtype == torch.int64
    assert ((out >= 0) & (out < VOCAB)).all()


def test_temperature_zero_is_argmax():
    logits = random_logits(batch=6)
    out = sample_next(logits, SamplingParams(temperature=0.0))
    assert torch.equal(out, logits.argmax(-1))


def test_temperature_zero_ignores_top_k_and_top_p():
    logits = random_logits(batch=6, seed=1)
    out = sample_next(logits, SamplingParams(temperature=0.0, top_k=5, top_p=0.5))
    assert torch.equal(out, logits.argmax(-1))


def test_temperature_zero_on_half_precision():
    logits = random_logits(batch=3, seed=2).to(torch.bfloat16)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.float().argmax(-1))


@settings(max_examples=50, deadline=None)
@given(temperature=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000))
def test_top_k_one_is_argmax_whatever_the_temperature(temperature, seed):
    logits = random_logits(batch=5, seed=seed)
    samples = draws(logits, SamplingParams(temperature=temperature, top_k=1), n=20, seed=seed)
    assert (samples == logits.argmax(-1)).all()


@pytest.mark.parametrize("top_p", [1e-6, 0.01])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_tiny_top_p_is_argmax(top_p, temperature):
    logits = random_logits(batch=5, seed=3)
    samples = draws(logits, SamplingParams(temperature=temperature, top_p=top_p), n=100)
    assert (samples == logits.argmax(-1)).all()


@pytest.mark.parametrize("k", [2, 3, 7])
def test_top_k_keeps_only_k_tokens(k):
    logits = random_logits(batch=3, seed=4)
    samples = draws(logits, SamplingParams(temperature=5.0, top_k=k), n=600)  # hot: spread over all kept
    for row in range(3):
        allowed = set(torch.topk(logits[row], k).indices.tolist())
        assert support(samples, row) == allowed


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.zeros(1, 5)
    samples = draws(logits, SamplingParams(top_k=100), n=300)
    assert support(samples, 0) == set(range(5))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 >= 0.7 so the third is not
    samples = draws(logits, SamplingParams(top_p=0.7), n=500)
    assert support(samples, 0) == {0, 1}
    samples = draws(logits, SamplingParams(top_p=0.9), n=800)
    assert support(samples, 0) == {0, 1, 2}
    samples = draws(logits, SamplingParams(top_p=0.5), n=300)
    assert support(samples, 0) == {0}


def test_top_p_works_on_unsorted_rows():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.05, 0.15, 0.5]]).log()
    samples = draws(logits, SamplingParams(top_p=0.7), n=500)
    assert support(samples, 0) == {1, 3}
    assert support(samples, 1) == {3, 0}


def test_top_k_and_top_p_together():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    samples = draws(probs.log(), SamplingParams(top_k=3, top_p=0.99), n=800)
    assert support(samples, 0) == {0, 1, 2}
    samples = draws(probs.log(), SamplingParams(top_k=3, top_p=0.5), n=400)
    assert support(samples, 0) == {0, 1}  # renormalised over the 3 kept: 0.44 < 0.5 needs a second


@pytest.mark.parametrize("params", [SamplingParams(top_p=1.0), SamplingParams(top_k=0), SamplingParams()])
def test_neutral_settings_change_nothing(params):
    logits = random_logits(batch=4, seed=5)
    plain = draws(logits, SamplingParams(temperature=1.0), n=200, seed=9)
    assert torch.equal(draws(logits, params, n=200, seed=9), plain)


def test_temperature_one_matches_softmax_frequencies():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    samples = draws(probs.log(), SamplingParams(temperature=1.0), n=4000)
    counts = torch.bincount(samples[:, 0], minlength=3).double() / 4000
    assert torch.allclose(counts, probs[0].double(), atol=0.04)


def test_low_temperature_sharpens():
    probs = torch.tensor([[0.4, 0.35, 0.25]])
    cold = draws(probs.log(), SamplingParams(temperature=0.05), n=500)
    hot = draws(probs.log(), SamplingParams(temperature=1.0), n=500)
    assert (cold[:, 0] == 0).float().mean() > 0.95
    assert (hot[:, 0] == 0).float().mean() < 0.6


def test_seeded_generator_is_reproducible():
    logits = random_logits(batch=4, seed=6)
    params = SamplingParams(temperature=1.3, top_k=10, top_p=0.9)
    a = draws(logits, params, n=50, seed=123)
    b = draws(logits, params, n=50, seed=123)
    c = draws(logits, params, n=50, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_k=0, top_p=1.0),
        SamplingParams(top_k=1, top_p=1e-9),
        SamplingParams(min_p=0.0, repetition_penalty=1.0),
        SamplingParams(min_p=1.0, repetition_penalty=0.5),
    ],
)
def test_valid_params(params):
    params.validate()


@pytest.mark.parametrize(
    "params, needle",
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=-math.inf), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(top_p=0.0), "top-p"),
        (SamplingParams(top_p=1.01), "top-p"),
        (SamplingParams(top_p=-0.5), "top-p"),
        (SamplingParams(top_p=math.nan), "top-p"),
        (SamplingParams(top_k=-1), "top-k"),
        (SamplingParams(min_p=-0.1), "min-p"),
        (SamplingParams(min_p=1.5), "min-p"),
        (SamplingParams(min_p=math.nan), "min-p"),
        (SamplingParams(repetition_penalty=0.0), "repetition penalty"),
        (SamplingParams(repetition_penalty=-1.0), "repetition penalty"),
        (SamplingParams(repetition_penalty=math.inf), "repetition penalty"),
        (SamplingParams(repetition_penalty=math.nan), "repetition penalty"),
    ],
)
def test_invalid_params(params, needle):
    with pytest.raises(UsageError, match=needle):
        params.validate()


# ------------------------------------------------------------------------------------ min-p, repetition


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_tokens_near_the_most_likely(min_p):
    logits = random_logits()
    probs = logits.softmax(-1)
    samples = draws(logits, SamplingParams(min_p=min_p), n=2000)
    for row in range(logits.size(0)):
        allowed = set(torch.nonzero(probs[row] >= min_p * probs[row].max()).flatten().tolist())
        assert support(samples, row) <= allowed
        assert int(probs[row].argmax()) in support(samples, row)


def test_min_p_one_is_argmax():
    logits = random_logits()
    assert torch.equal(draws(logits, SamplingParams(min_p=1.0), n=50)[0], logits.argmax(-1))


def test_min_p_applies_after_temperature():
    """Tempering flattens the distribution, so more tokens pass the same min-p bar."""
    logits = random_logits(batch=1)
    cold = support(draws(logits, SamplingParams(temperature=0.5, min_p=0.2), n=3000), 0)
    hot = support(draws(logits, SamplingParams(temperature=2.0, min_p=0.2), n=3000), 0)
    assert cold < hot


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    params = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert sample_next(logits, params, seen=seen).item() == 2  # 2.0 / 4 = 0.5 < 1.0; -2 * 4 = -8
    assert sample_next(logits, params).item() == 0  # nothing seen: nothing penalized
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=1.0), seen=seen).item() == 0


def test_repetition_penalty_below_one_favours_seen_tokens():
    logits = torch.tensor([[1.0, 0.9, -3.0]])
    seen = torch.tensor([[False, True, False]])
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=0.5), seen=seen).item() == 1
