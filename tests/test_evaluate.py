"""Scoring: sliding windows cover every token once, and the numbers are the right functions of the nats."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.config import UsageError
from gpt.dataset import encode_documents, windows
from gpt.evaluate import Score, evaluate_documents, make_score, total_nats, unigram_score
from gpt.model import GPT
from gpt.tokenizer import EOT, special_id, train_tokenizer

VOCAB, T = 50, 16
IGNORE = 0


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, sequence_len=T, num_layers=1, embed_dim=16, num_heads=2, dropout=0.0)


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, n).astype(np.uint16)  # never the ignore id


def direct_nats(model: GPT, ids: np.ndarray, ignore_id: int) -> tuple[float, int]:
    """Scores of a text that fits one window, computed the plain way."""
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        logits = model(x[None, :-1])[0]
    losses = F.cross_entropy(logits.double(), x[1:], reduction="none")
    keep = x[1:] != ignore_id
    return float(losses[keep].sum()), int(keep.sum())


# ----------------------------------------------------------------------------------------------- windows


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_tokens=st.integers(0, 300), sequence_len=st.integers(1, 40))
def test_windows_score_every_target_once(data, num_tokens, sequence_len):
    stride = data.draw(st.integers(1, sequence_len), label="stride")
    spans = windows(num_tokens, sequence_len, stride)
    scored = []
    for begin, end, new in spans:
        assert 0 <= begin < end <= num_tokens - 1  # targets ids[begin+1:end+1] exist
        assert end - begin <= sequence_len
        assert 1 <= new <= end - begin
        for target in range(end - new + 1, end + 1):
            context = target - begin  # inputs ids[begin:target] precede this target
            assert context >= min(target, sequence_len - stride)
            scored.append(target)
    assert sorted(scored) == list(range(1, max(num_tokens, 1)))
    assert len(scored) == len(set(scored))


def test_windows_examples():
    assert windows(0, 8, 4) == []
    assert windows(1, 8, 4) == []
    assert windows(5, 8, 4) == [(0, 4, 4)]
    assert windows(9, 8, 8) == [(0, 8, 8)]
    assert windows(20, 8, 4) == [(0, 8, 8), (4, 12, 4), (8, 16, 4), (12, 19, 3)]
    assert windows(20, 8, 8) == [(0, 8, 8), (8, 16, 8), (16, 19, 3)]


# ------------------------------------------------------------------------------------------------ scores


@settings(max_examples=200, deadline=None)
@given(
    nats=st.floats(0.0, 1e6, allow_nan=False),
    tokens=st.integers(1, 10**6),
    documents=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5),
)
def test_make_score_relations(nats, tokens, documents):
    score = make_score(nats, tokens, documents)
    chars = sum(len(d) for d in documents)
    utf8 = sum(len(d.encode("utf-8")) for d in documents)
    assert score.tokens == tokens and score.chars == chars
    assert score.loss == pytest.approx(nats / tokens)
    assert score.bits_per_char == pytest.approx(score.loss * tokens / (chars * math.log(2)))
    assert score.bits_per_byte == pytest.approx(score.loss * tokens / (utf8 * math.log(2)))
    assert score.bits_per_byte <= score.bits_per_char + 1e-12  # a character is at least one byte
    if score.loss < 700:
        assert score.perplexity == pytest.approx(math.exp(score.loss))
    assert math.isfinite(score.perplexity)


def test_make_score_known_values():
    score = make_score(total_nats=10 * math.log(2), tokens=5, documents=["abcd", "é"])
    assert score.loss == pytest.approx(2 * math.log(2))
    assert score.perplexity == pytest.approx(4.0)
    assert score.bits_per_char == pytest.approx(2.0)  # 10 bits over 5 characters
    assert score.bits_per_byte == pytest.approx(10 / 6)  # é is two bytes
    assert score.as_dict() == {
        "loss": score.loss, "perplexity": score.perplexity, "bits_per_char": score.bits_per_char,
        "bits_per_byte": score.bits_per_byte, "tokens": 5, "chars": 5,
    }


# -------------------------------------------------------------------------------------------- total_nats


def test_one_window_equals_direct_cross_entropy(model):
    for n in (2, 9, T + 1):
        ids = random_ids(n, seed=n)
        nats, count = total_nats(model, ids, IGNORE)
        expected, expected_count = direct_nats(model, ids, IGNORE)
        assert count == expected_count == n - 1
        assert nats == pytest.approx(expected, rel=1e-5)


def test_strides_score_the_same_tokens(model):
    ids = random_ids(5 * T + 7, seed=1)
    full_nats, full_count = total_nats(model, ids, IGNORE, stride=T)
    half_nats, half_count = total_nats(model, ids, IGNORE, stride=T // 2)
    one_nats, one_count = total_nats(model, ids, IGNORE, stride=1, batch_size=7)
    assert full_count == half_count == one_count == len(ids) - 1
    for nats in (full_nats, half_nats, one_nats):
        assert math.isfinite(nats) and nats > 0
    # more context per token changes the numbers, but not wildly for an untrained model
    assert half_nats / half_count == pytest.approx(full_nats / full_count, rel=0.1)


def test_default_stride_is_half_the_context(model):
    ids = random_ids(4 * T + 3, seed=2)
    assert total_nats(model, ids, IGNORE) == pytest.approx(total_nats(model, ids, IGNORE, stride=T // 2))


def test_first_window_matches_direct_computation(model):
    """With stride == T, the first window's targets are scored exactly as a direct pass over them."""
    ids = random_ids(3 * T, seed=3)
    whole, _ = total_nats(model, ids, IGNORE, stride=T)
    first, _ = direct_nats(model, ids[: T + 1], IGNORE)
    rest, _ = total_nats(model, ids[T:], IGNORE, stride=T)  # the next windows start where the first ended
    assert whole == pytest.approx(first + rest, rel=1e-5)


def test_batch_size_does_not_change_the_result(model):
    ids = random_ids(6 * T, seed=4)
    a = total_nats(model, ids, IGNORE, stride=4, batch_size=1)
    b = total_nats(model, ids, IGNORE, stride=4, batch_size=64)
    assert a[1] == b[1]
    assert a[0] == pytest.approx(b[0], rel=1e-6)


def test_ignore_id_is_not_scored(model):
    ids = random_ids(3 * T + 5, seed=5)
    ignore_at = [0, 1, T, T + 1, 2 * T + 3, len(ids) - 1]
    ids[ignore_at] = IGNORE
    for stride in (T, T // 2):
        nats, count = total_nats(model, ids, IGNORE, stride=stride)
        assert count == len(ids) - 1 - (len(ignore_at) - 1)  # position 0 is never a target anyway
    short = random_ids(10, seed=6)
    short[[0, 4, 7]] = IGNORE
    nats, count = total_nats(model, short, IGNORE)
    expected, expected_count = direct_nats(model, short, IGNORE)
    assert count == expected_count == 7
    assert nats == pytest.approx(expected, rel=1e-5)


def test_too_short_ids_score_nothing(model):
    assert total_nats(model, random_ids(1), IGNORE) == (0.0, 0)
    assert total_nats(model, random_ids(0), IGNORE) == (0.0, 0)


def test_total_nats_restores_training_mode(model):
    model.train()
    total_nats(model, random_ids(40), IGNORE)
    assert model.training
    model.eval()
    total_nats(model, random_ids(40), IGNORE)
    assert not model.training


def test_stride_longer_than_the_context_still_scores_every_token(model):
    """`gpt evaluate --stride` only checks that the stride is positive. A stride beyond sequence_len
    must either be refused or still score every token once, never silently skip tokens."""
    ids = random_ids(6 * T, seed=7)
    try:
        _, count = total_nats(model, ids, IGNORE, stride=T + T // 2)
    except (UsageError, ValueError):
        return
    assert count == len(ids) - 1


# -------------------------------------------------------------------------------- evaluate_documents


def test_evaluate_documents_matches_total_nats():
    documents = ["the cat sat on the mat. " * 12, "a dog ran after the cat. " * 9]
    tokenizer = train_tokenizer(documents, vocab_size=300)
    torch.manual_seed(1)
    model = GPT(vocab_size=tokenizer.get_vocab_size(), sequence_len=T, num_layers=1, embed_dim=16, num_heads=2,
                dropout=0.0)
    score = evaluate_documents(model, tokenizer, documents)
    ids = encode_documents(tokenizer, documents)
    nats, count = total_nats(model, ids, special_id(tokenizer, EOT))
    assert isinstance(score, Score)
    assert score.tokens == count == len(ids) - len(documents)  # every token but the EOT markers
    assert score.chars == sum(len(d) for d in documents)
    assert score.bits_per_char == pytest.approx(nats / (score.chars * math.log(2)))


# ---------------------------------------------------------------------------------------------- unigram


def test_unigram_score():
    rng = np.random.default_rng(0)
    eot = 1
    train_ids = np.concatenate([[eot], rng.integers(2, 40, 2000)]).astype(np.uint16)
    val_ids = np.concatenate([[eot], rng.integers(2, 40, 300), [eot], rng.integers(2, 40, 100)]).astype(np.uint16)
    documents = ["x" * 250, "y" * 150]
    score = unigram_score(train_ids, val_ids, documents, eot=eot, vocab_size=50)
    for value in (score.loss, score.perplexity, score.bits_per_char, score.bits_per_byte):
        assert math.isfinite(value) and value > 0
    assert score.tokens == 400  # EOT markers are not scored
    assert score.chars == 400
    # about uniform over 38 tokens, never better than the entropy of the frequencies it learned
    assert math.log(38) * 0.9 < score.loss < math.log(50)


def test_unigram_unseen_token_is_finite():
    train_ids = np.array([1, 2, 2, 2, 3], dtype=np.uint16)
    val_ids = np.array([1, 4, 4], dtype=np.uint16)  # 4 never seen in training
    score = unigram_score(train_ids, val_ids, ["ab"], eot=1, vocab_size=8)
    assert math.isfinite(score.loss) and score.loss > 0
    # add-one smoothing: p(4) = 1 / (4 train tokens + 8)
    assert score.loss == pytest.approx(math.log(12))


# ------------------------------------------------------------------------------------ dynamic evaluation


def test_adaptive_scoring_scores_every_token_once_and_leaves_the_model(model):
    ids = random_ids(5 * T + 3, seed=8)
    ids[[7, 2 * T]] = IGNORE
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = total_nats(model, ids, IGNORE, stride=4)
    barely = total_nats(model, ids, IGNORE, stride=4, adapt_lr=1e-12)  # steps too small to change a score
    assert barely[1] == plain[1] == len(ids) - 1 - 2
    assert barely[0] == pytest.approx(plain[0], rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adaptive_scoring_learns_a_repeated_pattern(model):
    """Text that repeats is predicted better once the model has read it: the point of dynamic evaluation."""
    ids = np.tile(random_ids(12, seed=9), 20)
    plain, count = total_nats(model, ids, IGNORE)
    adapted, adapted_count = total_nats(model, ids, IGNORE, adapt_lr=0.5)
    assert adapted_count == count
    assert adapted < 0.7 * plain


def test_adaptive_learning_rate_must_be_positive(model):
    with pytest.raises(UsageError, match="learning rate must be positive"):
        total_nats(model, random_ids(40), IGNORE, adapt_lr=0.0)
