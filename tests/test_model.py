import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig, UsageError
from gpt.decoding import DecodePlan, decode_step, linear
from gpt.model import GPT, KVCache
from gpt.predictor import Decoder, Predictor
from gpt.sampling import SamplingParams

ARCHS = ["gpt1", "gpt2"]


def tiny(arch: str = "gpt1", sequence_len: int = 16, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=97, sequence_len=sequence_len, num_layers=2, embed_dim=32, num_heads=4,
                 forward_expansion=4, dropout=0.0, pad_idx=0, arch=arch)
    sizes.update(overrides)
    return GPT(**sizes).eval()


def test_seed_constructor_and_logit_shape():
    model = GPT(vocab_size=100, sequence_len=128, num_layers=2, embed_dim=64, num_heads=4,
                forward_expansion=4, dropout=0.1, pad_idx=0)
    logits = model(torch.randint(0, 100, (3, 20)))
    assert logits.shape == (3, 20, 100)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocked_linear_equals_f_linear(threads):
    """Few rows take the batched row-block path (when out_features splits evenly), many rows F.linear."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for rows, out_features, bias in [(1, 96, True), (3, 96, False), (16, 50, True), (17, 96, True), (2, 97, True)]:
            weight = torch.randn(out_features, 40, requires_grad=True)
            b = torch.randn(out_features, requires_grad=True) if bias else None
            x = torch.randn(rows, 1, 40, requires_grad=True)
            ours, reference = linear(x, weight, b), F.linear(x, weight, b)
            assert ours.shape == reference.shape == (rows, 1, out_features)
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
            grads = torch.autograd.grad(ours.square().sum(), [x, weight])
            expected = torch.autograd.grad(reference.square().sum(), [x, weight])
            torch.testing.assert_close(grads, expected, atol=1e-4, rtol=1e-4)  # summed in another order
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_plan_steps_equal_forward_and_follow_new_weights(threads, arch):
    """Row-block views (two or one per thread, where they divide the rows) or plain weights (one thread): the
    step equals forward(); a plan taken after the weights change, in place or by loading, reads the new ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny(arch, vocab_size=96)
        x = torch.randint(1, 96, (2, 10))
        for change in ("none", "in place", "loaded"):
            if change == "in place":
                with torch.no_grad():
                    for param in model.parameters():
                        param.mul_(1.5)
            elif change == "loaded":
                model.load_state_dict(tiny(arch, vocab_size=96, seed=1).state_dict())
            cache = KVCache(model.config, 2, "cpu", torch.float32)
            model(x[:, :4], None, cache)
            plan = DecodePlan(model, rows=2)
            for t in range(4, 10):
                stepped = decode_step(model, x[:, t], cache, plan)
                assert (stepped - model(x[:, : t + 1])[:, -1]).abs().max() <= 1e-4, (change, t)
    finally:
        torch.set_num_threads(before)


def test_embedding_dropout_drops_whole_vocabulary_entries_in_training_only():
    torch.manual_seed(0)
    model = GPT(config=ModelConfig(vocab_size=97, sequence_len=16, num_layers=1, embed_dim=32, num_heads=4,
                                   dropout=0.0, embedding_dropout=0.5)).eval()
    idx = torch.arange(97).repeat(2, 1)[:, :16]  # every token id twice: once per row
    plain = model.token_embed(idx)
    assert torch.equal(model._embed_tokens(idx), plain)  # eval mode: untouched
    model.train()
    torch.manual_seed(0)
    dropped = model._embed_tokens(idx)
    zero = dropped.abs().sum(-1) == 0  # (B, T)
    assert zero.any() and (~zero).any()
    assert torch.equal(zero[0], zero[1])  # a dropped entry is dropped wherever its token appears
    torch.testing.assert_close(dropped[~zero], 2 * plain[~zero])  # the rest scaled by 1 / (1 - p)


def test_bad_shapes_are_usage_errors():
    with pytest.raises(UsageError, match="divisible"):
        GPT(vocab_size=10, embed_dim=30, num_heads=4)
    with pytest.raises(UsageError, match="vocab_size"):
        GPT()


def test_embeddings_are_tied_and_initialised_small():
    model = GPT(vocab_size=1000, sequence_len=64, num_layers=2, embed_dim=256, num_heads=4, dropout=0.0).eval()
    x = torch.randint(0, 1000, (1, 8))
    hidden = model.ln_f(model.blocks[1](model.blocks[0](model.token_embed(x) + model.position_embed.weight[:8],
                                                        None, None), None, None))
    torch.testing.assert_close(model(x), hidden @ model.token_embed.weight.T)  # no separate output matrix
    assert abs(model.token_embed.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].mlp.fc.bias.abs().max().item() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_block_layout(arch):
    """gpt1: h = LN(x + attn(x)), out = LN(h + mlp(h)), no final LN; gpt2: pre-LN and a final LN."""
    model = tiny(arch)
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    if arch == "gpt1":
        h = block.ln_1(x + block.attn(x, None, None))
        expected = block.ln_2(h + block.mlp(h))
        assert isinstance(model.ln_f, torch.nn.Identity)
    else:
        h = x + block.attn(block.ln_1(x), None, None)
        expected = h + block.mlp(block.ln_2(h))
        assert isinstance(model.ln_f, torch.nn.LayerNorm)
    torch.testing.assert_close(block(x, None, None), expected)
    assert block.mlp.gelu.approximate == "none"  # the exact GELU unless model.activation says "gelu_tanh"


def test_activation_choice_reaches_forward_and_cached_decoding():
    """gelu_tanh is the GPT-1 code's curve, within 1e-3 of the exact one; a cached decoding step uses the same."""
    exact = tiny("gpt1")
    with torch.no_grad():  # large weights, so the two curves give logits far apart
        for param in exact.parameters():
            param.normal_(0.0, 0.3)
    approx = GPT(config=ModelConfig(**{**vars(exact.config), "activation": "gelu_tanh"})).eval()
    approx.load_state_dict(exact.state_dict())
    assert approx.blocks[0].mlp.gelu.approximate == "tanh"
    x = torch.linspace(-6, 6, 1001)
    assert 1e-4 < (exact.blocks[0].mlp.gelu(x) - approx.blocks[0].mlp.gelu(x)).abs().max() < 1e-3
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        assert (exact(ids) - approx(ids)).abs().max() > 1e-4
        for model in (exact, approx):
            cache = KVCache(model.config, 2, "cpu", torch.float32)
            model.hidden(ids[:, :-1], cache=cache)
            torch.testing.assert_close(decode_step(model, ids[:, -1], cache), model(ids)[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="model.activation must be one of gelu, gelu_tanh"):
        ModelConfig(activation="relu").validate()


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_is_causal(arch):
    model = tiny(arch)
    x = torch.randint(1, 97, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 96 + 1
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_is_masked_on_keys(arch):
    """A left-padded row gives the same logits on its real tokens as the row without padding."""
    model = tiny(arch)
    x = torch.randint(1, 97, (2, 9))
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), x], dim=1)
    pad_mask = padded == 0
    torch.testing.assert_close(model(padded, pad_mask)[:, 4:], model(x), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(padded, pad_mask)).all()  # pad queries attend to themselves, no NaN


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_full_forward(arch):
    model = tiny(arch)
    x = torch.randint(1, 97, (2, 14))
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    pieces = [model(x[:, a:b], None, cache) for a, b in [(0, 5), (5, 6), (6, 10), (10, 14)]]
    assert (torch.cat(pieces, dim=1) - model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_equals_forward_with_left_padding(arch):
    """The flat one-token path against the general forward, with a left-padded row in the batch."""
    model = tiny(arch, sequence_len=12)
    x = torch.randint(1, 97, (2, 10))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, :3] = True
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    model(x[:, :4], pad[:, :4], cache)
    for t in range(4, 10):
        stepped = decode_step(model, x[:, t], cache)  # (2, vocab)
        assert (stepped - model(x[:, : t + 1], pad[:, : t + 1])[:, -1]).abs().max() <= 1e-4, t
    with pytest.raises(ValueError, match="sequence_len"):
        for t in range(3):
            decode_step(model, x[:, t], cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_stepwise_argmax_beyond_the_window(arch):
    """Past sequence_len the context is cropped: compare with full forwards over the same crops."""
    model = tiny(arch, sequence_len=8)
    prompt = torch.randint(1, 97, (1, 5))
    generated = Predictor(model).generate(prompt, 20, temperature=0)
    assert generated.shape == (1, 25)
    assert torch.equal(generated[:, :5], prompt)
    # replay with full forwards: when the window overflows, the context restarts from its last half
    tokens, start = prompt, 0
    for _ in range(20):
        if tokens.size(1) - start > 8:
            start = tokens.size(1) - 4
        logits = model(tokens[:, start:])[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def reference_contexts(prompt_len: int, steps: int, window: int) -> list[tuple[int, int]]:
    """(start, end) of the context behind each step's logits: the last window tokens, restarting from
    the last half of the window whenever a token would overflow it."""
    start, end, spans = max(0, prompt_len - window), prompt_len, []
    for _ in range(steps):
        spans.append((start, end))
        end += 1
        if end - start > window:
            start = end - window // 2
    return spans


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [3, 8, 20])
def test_cached_logits_equal_full_forward_at_every_step(arch, prompt_len):
    """Below, at and beyond sequence_len (8): logits with the cache = a full forward over the same context."""
    model = tiny(arch, sequence_len=8)
    tokens = torch.randint(1, 97, (2, prompt_len + 30), generator=torch.Generator().manual_seed(prompt_len))
    decoder = Decoder(Predictor(model), tokens[:, :prompt_len])
    for step, (start, end) in enumerate(reference_contexts(prompt_len, 30, 8)):
        if step:
            decoder.append(tokens[:, end - 1])
        full = model(tokens[:, start:end])[:, -1]
        assert (decoder.scores - full).abs().max() <= 1e-4, (step, start, end)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_decode_like_unpadded_ones(arch):
    predictor = Predictor(tiny(arch, sequence_len=8))
    short, long = torch.randint(1, 97, (1, 3)), torch.randint(1, 97, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # (2, 6)
    pad_mask = torch.tensor([[True] * 3 + [False] * 3, [False] * 6])
    together = torch.stack(list(predictor.stream(batch, 20, SamplingParams(temperature=0), pad_mask)), 1)
    for row, alone in enumerate([short, long]):
        assert torch.equal(together[row], predictor.generate(alone, 20, temperature=0)[0, alone.size(1):])


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_and_no_cache_generate_the_same_tokens(arch):
    predictor = Predictor(tiny(arch, sequence_len=8))
    prompt = torch.randint(1, 97, (2, 5))
    assert torch.equal(predictor.generate(prompt, 25, temperature=0),
                       predictor.generate(prompt, 25, temperature=0, use_cache=False))


def test_repetition_penalty_sees_the_prompt_and_generated_tokens():
    predictor = Predictor(tiny(sequence_len=32))
    prompt = torch.randint(1, 97, (1, 4))
    params = SamplingParams(temperature=0, repetition_penalty=1e6)  # a seen token is never chosen again
    new = torch.cat(list(predictor.stream(prompt, 20, params))).tolist()
    assert len(set(new)) == 20 and not set(new) & set(prompt[0].tolist())


def test_long_prompt_is_cropped_not_an_error():
    out = Predictor(tiny(sequence_len=8)).generate(torch.randint(1, 97, (1, 30)), 3, temperature=0)
    assert out.shape == (1, 33)


def test_generate_zero_tokens_and_batch():
    predictor = Predictor(tiny())
    prompt = torch.randint(1, 97, (3, 4))
    assert torch.equal(predictor.generate(prompt, 0), prompt)
    assert predictor.generate(prompt, 5, temperature=1.0, top_k=5, top_p=0.9).shape == (3, 9)


def test_generated_tokens_can_be_trained_on():
    """Decoding runs in inference mode; what it hands out must still be usable where autograd records."""
    model = tiny()
    prompt = torch.randint(1, 97, (2, 4))
    generated = Predictor(model).generate(prompt, 6, temperature=0)
    streamed = list(Predictor(model).stream(prompt, 3))
    model.train()
    model.loss(generated[:, :-1], generated[:, 1:]).backward()
    for token in streamed:  # (B,) ids, as yielded
        model.token_embed(token).sum().backward()
    assert model.token_embed.weight.grad is not None


def test_loss_ignores_padding_targets():
    model = tiny()
    x = torch.randint(1, 97, (2, 6))
    y = torch.randint(1, 97, (2, 6))
    y_padded = y.clone()
    y_padded[:, 3:] = 0
    logits = model(x)
    expected = F.cross_entropy(logits[:, :3].flatten(0, 1), y[:, :3].flatten())
    torch.testing.assert_close(model.loss(x, y_padded), expected)


def test_initial_loss_is_near_uniform():
    model = tiny()
    x, y = torch.randint(1, 97, (2, 4, 16))
    assert abs(model.loss(x, y).item() - math.log(97)) < 0.3


def test_flops_per_token_counts_matmuls():
    model = GPT(config=ModelConfig(vocab_size=100, sequence_len=10, num_layers=1, embed_dim=8, num_heads=2))
    block = sum(p.numel() for p in model.blocks.parameters())
    assert model.flops_per_token() == 6 * block + 6 * 8 * 100 + 12 * 1 * 8 * 10
