import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.config import UsageError
from gpt.model import GPT
from gpt.retriever import IncrementalDecoder, Retriever
from gpt.tokenizer import EOT, train_tokenizer


@pytest.fixture(scope="module")
def retriever(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    return Retriever(checkpoint.tokenizer, checkpoint.model)


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
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == sample
    assert not any("\ufffd" in p for p in pieces)
