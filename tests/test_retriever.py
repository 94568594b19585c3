import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.batching import IncrementalDecoder
from gpt.checkpoint import load_checkpoint
from gpt.config import UsageError
from gpt.model import GPT
from gpt.retriever import Retriever
from gpt.tokenizer import EOT, decode, token_bytes, train_tokenizer


@pytest.fixture(scope="module")
def retriever(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    return Retriever(checkpoint.tokenizer, checkpoint.predictor)


def test_generate_returns_prompt_plus_continuation(retriever):
    text = retriever.generate("what is your name?", max_new_tokens=20, seed=3)
    assert text.startswith("what is your name?") and len(text) > len("what is your name?")
    assert text == retriever.generate("what is your name?", max_new_tokens=20, seed=3)
    assert retriever.generate("", max_new_tokens=5, seed=3)  # empty prompt starts a new text


def test_stream_joins_to_the_same_text(retriever):
    pieces = list(retriever.stream("Alice", max_new_tokens=40, seed=7))
    assert len(pieces) > 1
    assert "Alice" + "".join(pieces) == retriever.generate("Alice", max_new_tokens=40, seed=7)


def test_greedy_is_deterministic_without_a_seed(retriever):
    assert retriever.generate("The Queen", temperature=0, max_new_tokens=15) == retriever.generate(
        "The Queen", temperature=0, max_new_tokens=15)


def test_batch_of_samples(retriever):
    texts = retriever.generate_batch("Alice", 4, max_new_tokens=15, seed=1)
    assert len(texts) == 4 and all(t.startswith("Alice") for t in texts)
    assert len(set(texts)) > 1
    assert texts == retriever.generate_batch("Alice", 4, max_new_tokens=15, seed=1)


def test_invalid_values(retriever):
    with pytest.raises(UsageError):
        retriever.generate("x", temperature=-0.5)
    with pytest.raises(UsageError):
        retriever.generate("x", top_p=2.0)


def test_stops_at_end_of_text():
    """A model that always prefers the end-of-text token produces no continuation."""
    tokenizer = train_tokenizer(["Alice and the Queen of Hearts. " * 20], vocab_size=300)
    model = GPT(vocab_size=tokenizer.get_vocab_size(), sequence_len=16, num_layers=1, embed_dim=16, num_heads=2,
                dropout=0.0)
    with torch.no_grad():
        model.token_embed.weight.zero_()
        model.token_embed.weight[tokenizer.token_to_id(EOT)] = 1.0
        model.blocks[0].ln_2.bias.fill_(1.0)  # final hidden state is all ones: the EOT logit wins
    assert Retriever(tokenizer, model).generate("Alice", temperature=0, max_new_tokens=10) == "Alice"


def test_streaming_never_prints_half_a_character():
    """Byte-level tokens may split an emoji; streamed pieces must never show a replacement character."""
    text = "Alice 🐇 met 白兔 and 🎩 tea. " * 30
    tokenizer = train_tokenizer([text], vocab_size=270)  # few merges: multi-byte characters span tokens
    model = GPT(vocab_size=tokenizer.get_vocab_size(), sequence_len=32, num_layers=1, embed_dim=16, num_heads=2)
    retriever = Retriever(tokenizer, model)
    for seed in range(8):
        pieces = list(retriever.stream("🐇", max_new_tokens=60, temperature=1.0, seed=seed))
        full = "".join(pieces)
        assert "🐇" + full == retriever.generate("🐇", max_new_tokens=60, temperature=1.0, seed=seed)
        shown = ""
        for piece in pieces:  # what was printed is never taken back: no half character was shown
            shown += piece
            assert full.startswith(shown)


def test_incremental_decoding_holds_back_split_characters():
    text = "Alice 🐇 met 白兔 and 🎩 tea. " * 30
    tokenizer = train_tokenizer([text], vocab_size=262)  # almost no merges: each emoji spans 4 tokens
    sample = "🐇白兔 tea 🎩🎩, é"
    ids = tokenizer.encode(sample).ids
    assert len(ids) > len(sample)  # some characters really are split across tokens
    decoder = IncrementalDecoder(token_bytes(tokenizer))
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == sample
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def emoji_tokenizer():
    return train_tokenizer(["Alice 🐇 met 白兔 and 🎩 tea. " * 30], vocab_size=262)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 261), max_size=40))
def test_incremental_decoding_equals_the_full_decode(emoji_tokenizer, ids):
    """Any id sequence, valid UTF-8 or not: the pieces join to the full decode, and a piece once shown
    is never taken back (no replacement character that the full decode does not have)."""
    decoder = IncrementalDecoder(token_bytes(emoji_tokenizer))
    full, shown = decode(emoji_tokenizer, ids), ""
    for token_id in ids:
        shown += decoder.push(token_id)
        assert full.startswith(shown)
    assert shown + decoder.flush() == full


def test_stop_strings_cut_the_text_and_never_stream_past_them(retriever):
    free = retriever.generate("Alice", temperature=0, max_new_tokens=60)[len("Alice"):]
    stop = free[10:13]  # a string the greedy continuation really produces
    expected = free[: free.index(stop)]
    stream = retriever.stream("Alice", temperature=0, max_new_tokens=60, stop=[stop, "never in the text"])
    pieces = list(stream)
    assert "".join(pieces) == expected and stream.finish_reason == "stop"
    [completion] = retriever.complete(["Alice"], temperature=0, max_new_tokens=60, stop=stop)
    assert completion.text == expected and completion.finish_reason == "stop"


def test_finish_reason_and_token_counts(retriever):
    [done] = retriever.complete(["The Queen"], max_new_tokens=7, temperature=0)
    assert done.finish_reason == "length" and done.completion_tokens == 7
    assert done.prompt_tokens == retriever.count_tokens("The Queen") > 1
    stream = retriever.stream("The Queen", max_new_tokens=7, temperature=0)
    assert "".join(stream) == done.text and stream.finish_reason == "length" and stream.completion_tokens == 7
    [nothing] = retriever.complete(["x"], max_new_tokens=0)
    assert nothing.text == "" and nothing.completion_tokens == 0 and nothing.finish_reason == "length"


def test_prompts_of_different_lengths_batch_like_single_prompts(retriever):
    prompts = ["Alice", "The Queen of Hearts said", "", "🐇 白兔"]
    together = retriever.complete(prompts, max_new_tokens=25, temperature=0)
    for prompt, completion in zip(prompts, together):
        assert completion == retriever.complete([prompt], max_new_tokens=25, temperature=0)[0]


def test_closing_a_stream_stops_generation(retriever):
    stream = retriever.stream("Alice", max_new_tokens=10_000, temperature=1.0, seed=0)
    next(stream)
    stream.close()
    assert list(stream) == [] and stream.completion_tokens < 100


def test_min_p_and_repetition_penalty_reach_the_model(retriever):
    plain = retriever.generate("Alice", temperature=0, max_new_tokens=40)
    assert retriever.generate("Alice", temperature=0, max_new_tokens=40, repetition_penalty=1.0) == plain
    assert retriever.generate("Alice", temperature=0, max_new_tokens=40, repetition_penalty=3.0) != plain
    assert retriever.generate("Alice", max_new_tokens=20, min_p=1.0, seed=5) == retriever.generate(
        "Alice", max_new_tokens=20, temperature=0)
    with pytest.raises(UsageError, match="min-p"):
        retriever.stream("x", min_p=2.0)
