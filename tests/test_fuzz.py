"""Property-based tests and a short fuzz of the loaders.

Properties: the tokenizer's round trip through long-text pieces, the sampler's parameters, the
training windows and the evaluation's bits per character. Fuzz: config files, TOML files and
every file of a checkpoint folder, mutated byte by byte, must load or fail with a UsageError:
never another exception, which would reach the user as a traceback.
"""

import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.checkpoint import CONFIG_FILE, STATE_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_checkpoint, load_training_state
from gpt.config import UsageError, apply_overrides, load_toml, preset
from gpt.dataset import WindowSampler, encode_documents
from gpt.evaluate import evaluate_documents
from gpt.model import GPT
from gpt.sampling import SamplingParams, sample_next
from gpt.tokenizer import EOT, decode, encode, special_id, text_chunks, train_tokenizer

SLOW_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def tokenizer(alice_text):
    return train_tokenizer([alice_text[:60_000]], vocab_size=320)


# ------------------------------------------------------------------------------------------ tokenizer


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.sampled_from("ab é😀\n\t.") | st.characters(codec="utf-8"), max_size=400),
       size=st.integers(1, 60))
def test_text_chunks_cover_the_text_and_stay_short(text, size):
    pieces = list(text_chunks(text, size))
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 2 * size for p in pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_FIXTURES)
@given(text=st.text(st.sampled_from("Alice was  the\n\t,.'é中😀") | st.characters(codec="utf-8"), max_size=600),
       size=st.integers(1, 80))
def test_pieces_round_trip_and_cuts_at_spaces_keep_the_ids(tokenizer, text, size):
    pieces = list(text_chunks(text, size))
    ids = [i for piece in pieces for i in encode(tokenizer, piece)]
    assert decode(tokenizer, ids) == text
    cuts = np.cumsum([len(p) for p in pieces])[:-1]
    if all(text[c] == " " and not text[c + 1 : c + 2].isspace() for c in cuts):
        assert ids == encode(tokenizer, text)


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_FIXTURES)
@given(documents=st.lists(st.text(max_size=200), min_size=1, max_size=5))
def test_encode_documents_round_trips_each_document(tokenizer, documents):
    ids = encode_documents(tokenizer, documents)
    eot = special_id(tokenizer, EOT)
    starts = np.flatnonzero(ids == eot).tolist() + [len(ids)]
    assert len(starts) == len(documents) + 1  # literal "<|endoftext|>" in a text stays text
    decoded = [decode(tokenizer, ids[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]
    assert decoded == documents


# -------------------------------------------------------------------------------------------- sampler

FLOATS = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(temperature=FLOATS, top_k=st.none() | st.integers(-5, 50), top_p=st.none() | FLOATS)
def test_sampling_params_validate_exactly_the_documented_ranges(temperature, top_k, top_p):
    valid = temperature >= 0 and (top_k is None or top_k >= 0) and (top_p is None or 0 < top_p <= 1)
    params = SamplingParams(temperature, top_k, top_p)
    if valid:
        params.validate()
    else:
        with pytest.raises(UsageError):
            params.validate()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), temperature=st.floats(1e-3, 1e3), top_k=st.none() | st.integers(0, 25),
       top_p=st.none() | st.floats(1e-6, 1.0), vocab=st.integers(1, 20))
def test_sampled_tokens_lie_in_the_kept_set(seed, temperature, top_k, top_p, vocab):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, vocab, generator=generator) * 4
    params = SamplingParams(temperature, top_k, top_p)
    params.validate()
    chosen = sample_next(logits, params, generator)
    assert chosen.shape == (3,) and bool(((chosen >= 0) & (chosen < vocab)).all())
    for row, token in enumerate(chosen.tolist()):
        scaled = logits[row] / temperature
        rank = int((scaled > scaled[token]).sum())  # tokens strictly more likely than the chosen one
        if top_k:
            assert rank < top_k
        if top_p is not None:
            probs = scaled.softmax(-1)
            assert float(probs[probs > probs[token]].sum()) < top_p + 1e-6  # mass before it is below p


# -------------------------------------------------------------------------------------------- windows


@settings(max_examples=100, deadline=None)
@given(num_ids=st.integers(2, 300), data=st.data(), seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**6),
       wide=st.booleans())
def test_windows_are_slices_and_targets_are_shifted_inputs(num_ids, data, seed, step, wide):
    sequence_len = data.draw(st.integers(1, num_ids - 1), label="sequence_len")
    batch_size = data.draw(st.integers(1, 8), label="batch_size")
    dtype = np.uint32 if wide else np.uint16
    ids = np.random.default_rng(seed).integers(0, 2**32 - 1 if wide else 2**16 - 1, num_ids).astype(dtype)
    sampler = WindowSampler(ids, sequence_len, batch_size, seed)
    x, y = sampler.batch(step)
    assert x.shape == y.shape == (batch_size, sequence_len) and x.dtype == torch.int64
    for row, start in enumerate(sampler.starts(step).tolist()):
        assert x[row].tolist() == ids[start : start + sequence_len].tolist()
        assert y[row].tolist() == ids[start + 1 : start + sequence_len + 1].tolist()
    again = WindowSampler(ids, sequence_len, batch_size, seed).batch(step)  # a function of (seed, step) alone
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


# --------------------------------------------------------------------------------------- eval metrics


@pytest.fixture(scope="module")
def small_model(tokenizer):
    torch.manual_seed(0)
    return GPT(vocab_size=tokenizer.get_vocab_size(), sequence_len=12, num_layers=1, embed_dim=16, num_heads=2,
               dropout=0.0).eval()


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_FIXTURES)
@given(documents=st.lists(st.text(min_size=1, max_size=120), min_size=1, max_size=4),
       stride=st.none() | st.integers(1, 12))
def test_bits_per_char_is_loss_times_tokens_over_chars_ln2(tokenizer, small_model, documents, stride):
    score = evaluate_documents(small_model, tokenizer, documents, stride)
    ids = encode_documents(tokenizer, documents)
    assert score.chars == sum(len(d) for d in documents)
    assert score.tokens == len(ids) - len(documents)  # every token but the documents' leading EOT
    assert score.bits_per_char == pytest.approx(score.loss * score.tokens / (score.chars * math.log(2)), rel=1e-9)
    assert math.isfinite(score.loss) and score.loss > 0


# ------------------------------------------------------------------------------------ loader fuzzing

MUTATIONS = st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.floats(0, 1),
                               st.integers(0, 255)), min_size=1, max_size=6)


def mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, where, value in mutations:
        at = int(where * len(data))
        if kind == "set" and at < len(data):
            data[at] = value
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete":
            del data[at : at + 1 + value % 8]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def pristine(tiny_run, tmp_path_factory):
    return {name: (tiny_run / name).read_bytes() for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, STATE_FILE)}


@pytest.mark.parametrize("name", [CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, STATE_FILE])
def test_mutated_checkpoint_files_load_or_fail_with_a_usage_error(tiny_run, tmp_path, pristine, name):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_run, folder)
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=SLOW_FIXTURES)
    @given(mutations=MUTATIONS)
    def fuzz(mutations):
        (folder / name).write_bytes(mutate(pristine[name], mutations))
        try:
            load_training_state(folder) if name == STATE_FILE else load_checkpoint(folder)
            outcomes["loaded"] += 1
        except UsageError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1

    fuzz()
    assert outcomes["refused"] > 0  # the mutations do reach the checks


TOML = ("[model]\nembed_dim = 64\nnum_heads = 4\ndropout = 0.1\narch = \"gpt2\"\n"
        "[train]\nlearning_rate = 0.001\nmax_steps = 100\nmax_time = \"none\"\nseed = 3\n")


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_FIXTURES)
@given(mutations=MUTATIONS)
def test_mutated_toml_configs_apply_or_fail_with_a_usage_error(tmp_path, mutations):
    path = tmp_path / "config.toml"
    path.write_bytes(mutate(TOML.encode(), mutations))
    model_config, train_config = preset("tiny")
    try:
        apply_overrides(model_config, train_config, load_toml(path))
        model_config.validate()
        train_config.validate()
    except UsageError as err:
        assert "\n" not in str(err)
