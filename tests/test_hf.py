"""transformers export and import: exact parity both ways, for every block type and GELU, with real models.

Models come from configs (random weights) or from brief training runs; nothing is downloaded. Random
weights are drawn with std 0.3: with the usual 0.02 the activations stay so small that exact and tanh
GELU agree to 1e-6 and the parity check could not tell them apart (see test_negative_controls). The
three transformers classes: gpt1 with the tanh GELU is OpenAIGPTLMHeadModel, gpt1 with the exact GELU
(the default) OPTForCausalLM, gpt2 with either GELU GPT2LMHeadModel.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from cli_helpers import fingerprint, gpt_in_process
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

transformers = pytest.importorskip("transformers")

from gpt.checkpoint import load_checkpoint  # noqa: E402
from gpt.config import ModelConfig, UsageError, preset  # noqa: E402
from gpt.corpus import split_documents  # noqa: E402
from gpt.evaluate import evaluate_documents  # noqa: E402
from gpt.hf import MODEL_TYPES, export_checkpoint, hf_config, import_checkpoint, model_type_of, tokenizer_files  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.retriever import Retriever  # noqa: E402
from gpt.tokenizer import EOT, decode, encode, load_tokenizer  # noqa: E402
from gpt.train import train  # noqa: E402

TOLERANCE = 1e-4  # logits, max abs difference, fp32
KINDS = {"gpt1": ("gpt1", "gelu"), "gpt1_tanh": ("gpt1", "gelu_tanh"), "gpt2": ("gpt2", "gelu"),
         "gpt2_tanh": ("gpt2", "gelu_tanh")}  # test id -> (arch, activation)


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def max_diff(ours, theirs, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def real_ids(tokenizer: Tokenizer, text: str, length: int) -> torch.Tensor:
    ids = [tokenizer.token_to_id(EOT)] + encode(tokenizer, text)
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(3)])


def random_ids(vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(0))


def gpt2_style_tokenizer(text: str) -> Tokenizer:
    """A byte-level BPE with <|endoftext|> and no [PAD], like GPT-2's own."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def hf_layers(model) -> nn.ModuleList:
    return model.model.decoder.layers if type(model).__name__ == "OPTForCausalLM" else model.transformer.h


def save_random_hf(folder: Path, kind: str, tokenizer: Tokenizer, sequence_len: int = 64, **overrides) -> Path:
    """A transformers model built from a config with random weights, saved with its tokenizer files."""
    arch, activation = KINDS[kind]
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len, num_layers=2,
                         embed_dim=32, num_heads=2, dropout=0.0, arch=arch, activation=activation)
    fields = hf_config(config, tokenizer.token_to_id(EOT), tokenizer.token_to_id("[PAD]"))
    fields.update(overrides)
    torch.manual_seed(0)
    model_type = fields.pop("model_type")
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **fields))
    with torch.no_grad():  # every weight N(0, 0.3), LayerNorm gains N(1, 0.3): nothing at its neutral value
        for name, param in model.named_parameters():
            gain = ("ln_" in name or "layer_norm" in name) and name.endswith("weight")
            param.normal_(1.0 if gain else 0.0, 0.3)
    model.save_pretrained(folder)
    for name, text in tokenizer_files(tokenizer, sequence_len).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def alice_val(alice_text) -> str:
    return split_documents([alice_text], 0.1)[1][0]


@pytest.fixture(scope="module")
def tiny_gpt2_run(tmp_path_factory) -> Path:
    """A tiny pre-LN model trained briefly, with a context long enough for a prompt and 50 new tokens."""
    model_config, train_config = preset("tiny")
    model_config.arch, model_config.sequence_len = "gpt2", 64
    train_config.max_steps, train_config.max_time = 40, None
    out = tmp_path_factory.mktemp("runs") / "tiny_gpt2"
    train(model_config, train_config, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_tanh_run(tmp_path_factory) -> Path:
    """A tiny post-LN model with the GPT-1 code's tanh GELU, trained briefly."""
    model_config, train_config = preset("tiny")
    model_config.activation = "gelu_tanh"
    train_config.max_steps, train_config.max_time = 40, None
    out = tmp_path_factory.mktemp("runs") / "tiny_tanh"
    train(model_config, train_config, out, show_progress=False)
    return out


@pytest.fixture(scope="module", params=["gpt1", "gpt1_tanh", "gpt2"])
def trained(request, tiny_run, tiny_tanh_run, tiny_gpt2_run, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, its export) for a briefly trained model of each block type (gpt1 with either GELU)."""
    checkpoint = {"gpt1": tiny_run, "gpt1_tanh": tiny_tanh_run, "gpt2": tiny_gpt2_run}[request.param]
    return checkpoint, export_checkpoint(checkpoint, tmp_path_factory.mktemp("hf") / request.param)


@pytest.fixture(scope="module", params=list(KINDS))
def random_hf(request, tiny_run, tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    return save_random_hf(tmp_path_factory.mktemp("random") / request.param, request.param, tokenizer)


def test_export_writes_a_folder_transformers_loads(trained):
    checkpoint, folder = trained
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (folder / name).is_file(), name
    ours = load_checkpoint(checkpoint)
    model = hf_model(folder)
    assert type(model).__name__ == MODEL_TYPES[model_type_of(ours.model_config)]
    assert model.config.max_position_embeddings == ours.model_config.sequence_len and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any(k.startswith("lm_head") or k.endswith(".attn.bias") for k in load_file(folder / "model.safetensors"))
    card = (folder / "README.md").read_text()
    assert "Alice's Adventures in Wonderland" in card and "bits per character" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and f"| layers | {ours.model_config.num_layers} |" in card


def test_exported_logits_match_on_random_and_real_tokens(trained, alice_val):
    checkpoint, folder = trained
    ours = load_checkpoint(checkpoint)
    model, length = hf_model(folder), ours.model_config.sequence_len
    for ids in (random_ids(ours.model_config.vocab_size, length), real_ids(ours.tokenizer, alice_val, length)):
        assert max_diff(ours.model, model, ids) <= TOLERANCE


def test_imported_logits_match_on_random_and_real_tokens(random_hf, tmp_path, alice_val):
    ours = load_checkpoint(import_checkpoint(random_hf, tmp_path / "imported"))
    model = hf_model(random_hf)
    for ids in (random_ids(ours.model_config.vocab_size, 64), real_ids(ours.tokenizer, alice_val, 64)):
        with torch.no_grad():
            assert ours.model(ids).std() > 1.0  # large enough logits for the tolerance to mean something
        assert max_diff(ours.model, model, ids) <= TOLERANCE


@pytest.mark.parametrize("break_it", ["the other GELU", "a square weight transposed", "pre/post-LN swapped",
                                      "final LN"])
def test_negative_controls(random_hf, tmp_path, break_it):
    """The parity check fails, by far, when the mapping is wrong in any of these ways."""
    ours = load_checkpoint(import_checkpoint(random_hf, tmp_path / "imported"))
    config = ours.model_config
    model, opt = hf_model(random_hf), config.arch == "gpt1" and config.activation == "gelu"
    layer = hf_layers(model)[-1]
    if break_it == "the other GELU":
        other = nn.GELU(approximate="none" if config.activation == "gelu_tanh" else "tanh")
        for block in hf_layers(model):
            if opt:
                block.activation_fn = other
            else:
                block.mlp.act = other
    elif break_it == "a square weight transposed":  # the attention output projection loads either way round
        projection = layer.self_attn.out_proj if opt else layer.attn.c_proj
        projection.weight.data = projection.weight.data.t().contiguous()
    elif break_it == "pre/post-LN swapped":  # our model built with the other block type, the same weights
        swapped = GPT(config=ModelConfig(**{**vars(config), "arch": "gpt2" if config.arch == "gpt1" else "gpt1"}))
        swapped.load_state_dict(ours.model.state_dict(), strict=False)  # a final LN, if gpt2, stays as built
        ours.model = swapped.eval()
    elif opt:  # a stray final LayerNorm
        model.model.decoder.final_layer_norm = nn.LayerNorm(config.embed_dim)
    elif config.arch == "gpt1":
        layer.ln_2 = nn.Sequential(layer.ln_2, nn.LayerNorm(config.embed_dim))
    else:  # the final LayerNorm left out
        model.transformer.ln_f = nn.Identity()
    assert max_diff(ours.model, model, random_ids(config.vocab_size, 64)) > 10 * TOLERANCE


def test_import_reads_the_gpt2_hub_layout(tiny_run, tmp_path):
    """GPT-2's own files name weights without `transformer.` and still carry the old causal-mask buffers."""
    source = save_random_hf(tmp_path / "hf", "gpt2", load_tokenizer(tiny_run / "tokenizer.json"))
    weights = {k.removeprefix("transformer."): v for k, v in load_file(source / "model.safetensors").items()}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    ours = load_checkpoint(import_checkpoint(source, tmp_path / "imported"))
    assert torch.equal(ours.model.blocks[1].mlp.fc.weight, weights["h.1.mlp.c_fc.weight"].t())
    assert max_diff(ours.model, hf_model(source), random_ids(ours.model_config.vocab_size, 64)) <= TOLERANCE


def test_round_trip_gives_bit_identical_weights(trained, tmp_path):
    checkpoint, folder = trained
    back = load_checkpoint(import_checkpoint(folder, tmp_path / "back"))
    original = load_checkpoint(checkpoint)
    assert back.model_config == original.model_config
    before, after = original.model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert back.tokenizer.to_str() == original.tokenizer.to_str()


@pytest.fixture(scope="module")
def both_tokenizers(tiny_run, tmp_path_factory):
    folder = export_checkpoint(tiny_run, tmp_path_factory.mktemp("hf") / "tok")
    return load_tokenizer(tiny_run / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(folder)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
@example(text="the word <|endoftext|> and a [PAD] marker")
@example(text="  two spaces, a tab\t, CRLF\r\n, emoji 😀, CJK 你好, combining e\u0301 ")
def test_exported_tokenizer_gives_our_ids_and_text(both_tokenizers, text):
    ours, theirs = both_tokenizers
    ids = encode(ours, text)
    assert theirs.encode(text) == ids
    assert theirs(text)["input_ids"] == ids
    assert theirs.decode(ids) == text == decode(ours, ids)
    with_specials = [ours.token_to_id(EOT)] + ids + [ours.token_to_id("[PAD]")]
    assert theirs.decode(with_specials, skip_special_tokens=True) == decode(ours, with_specials)


def cli_greedy(checkpoint: Path, prompt: str) -> str:
    result = gpt_in_process("generate", "--checkpoint", str(checkpoint), prompt, "--temperature", "0",
                 "--max-new-tokens", "50")
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


def transformers_greedy(folder: Path, prompt: str, window: int) -> str:
    """generate(do_sample=False) on the same ids gpt generate feeds: <|endoftext|> + the prompt.

    When the context fills, GPT.stream carries on from the last half of the window; the same is done
    here with one generate call per window, so the two see the same tokens at every step.
    """
    tokenizer, model = transformers.AutoTokenizer.from_pretrained(folder), hf_model(folder)
    tokens = [tokenizer.eos_token_id] + tokenizer.encode(prompt)
    context, new = tokens[-window:], []
    while len(new) < 50:
        steps = min(50 - len(new), window - len(context) + 1)
        ids = torch.tensor([context])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
        new += out[0, len(context) :].tolist()
        if tokenizer.eos_token_id in new or out.size(1) - len(context) < steps:
            break
        context = (tokens + new)[-max(1, window // 2) :]
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    return prompt + tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_greedy_50_tokens_match_transformers_on_trained_exports(trained):
    checkpoint, folder = trained
    window = load_checkpoint(checkpoint).model_config.sequence_len  # gpt1: 32, so the window slides
    assert cli_greedy(checkpoint, "Alice was") == transformers_greedy(folder, "Alice was", window)


@pytest.mark.slow
def test_greedy_50_tokens_match_transformers_on_imported_models(random_hf, tmp_path):
    imported = import_checkpoint(random_hf, tmp_path / "imported")
    assert cli_greedy(imported, "The Queen") == transformers_greedy(random_hf, "The Queen", 64)


def test_pipeline_runs_on_an_export(trained):
    _, folder = trained
    generator = transformers.pipeline("text-generation", model=str(folder))
    result = generator("Alice was", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("Alice was")


@pytest.mark.slow
def test_imported_gpt2_tokenizer_without_pad_works_everywhere(tmp_path, alice_text):
    """generate, eval and fine-tuning with --init-from on an import whose tokenizer has no [PAD]."""
    tokenizer = gpt2_style_tokenizer(alice_text[:20_000])
    source = save_random_hf(tmp_path / "hf", "gpt2", tokenizer, sequence_len=32, pad_token_id=None)
    imported = tmp_path / "imported"
    result = gpt_in_process("import", "--from", str(source), "--out", str(imported))
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(imported)
    assert checkpoint.model_config.pad_idx is None and checkpoint.info["tokenizer"]["pad_id"] is None
    assert Retriever(checkpoint.tokenizer, checkpoint.model).generate("Alice", max_new_tokens=5, seed=1) != "Alice"
    new_text = alice_text[20_000:40_000]
    assert evaluate_documents(checkpoint.model, checkpoint.tokenizer, [new_text]).chars == 20_000
    (tmp_path / "new.txt").write_text(new_text, encoding="utf-8")
    (tmp_path / "slow.toml").write_text("[train]\nlearning_rate = 1e-12\nwarmup_steps = 1\nbatch_size = 4\n")
    tuned = tmp_path / "tuned"
    result = gpt_in_process("train", "--init-from", str(imported), "--data", str(tmp_path / "new.txt"), "--config",
                 str(tmp_path / "slow.toml"), "--max-steps", "2", "--eval-interval", "2", "--out", str(tuned),
                 "--quiet")
    assert result.returncode == 0, result.stderr
    after = load_checkpoint(tuned)
    assert after.tokenizer.to_str() == checkpoint.tokenizer.to_str()
    assert after.model_config == checkpoint.model_config and after.info["init_from"] == str(imported.resolve())
    start, end = checkpoint.model.state_dict(), after.model.state_dict()
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)  # it started from the imported weights


@pytest.mark.parametrize("kind, change, words", [
    ("gpt2", {"activation_function": "relu"}, "'relu' is not a GELU we have"),
    ("gpt2", {"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ("gpt2", {"tie_word_embeddings": False}, "not tied"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "inverse layer index"),
    ("gpt2", {"embd_pdrop": 0.2}, "dropout"),
    ("gpt1", {"activation_function": "relu"}, "OPTForCausalLM cannot be represented exactly: activation_function"),
    ("gpt1", {"do_layer_norm_before": True}, "pre-LN"),
    ("gpt1", {"word_embed_proj_dim": 16}, "projects its embeddings"),
    ("gpt1", {"enable_bias": False}, "no biases"),
])
def test_import_refuses_what_it_cannot_represent(tiny_run, tmp_path, kind, change, words):
    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    source = save_random_hf(tmp_path / "hf", kind, tokenizer, **change)
    with pytest.raises(UsageError, match=words):
        import_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attention_dropout_survives_export_and_import(tiny_run, tmp_path):
    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    source = save_random_hf(tmp_path / "hf", "gpt2", tokenizer, attn_pdrop=0.0, resid_pdrop=0.2, embd_pdrop=0.2)
    import_checkpoint(source, tmp_path / "out")
    config = load_checkpoint(tmp_path / "out").model_config
    assert (config.dropout, config.attention_dropout) == (0.2, 0.0)
    export_checkpoint(tmp_path / "out", tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (saved["resid_pdrop"], saved["embd_pdrop"], saved["attn_pdrop"]) == (0.2, 0.2, 0.0)


def test_import_refuses_a_lossy_tokenizer_and_other_models(tiny_run, tmp_path):
    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    source = save_random_hf(tmp_path / "hf", "gpt1_tanh", tokenizer)
    data = json.loads((source / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (source / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="does not decode text back exactly"):
        import_checkpoint(source, tmp_path / "out")
    with pytest.raises(UsageError, match="config.json not found"):
        import_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    result = gpt_in_process("import", "--from", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("gpt: error: model_type 'llama' is not supported")
    assert result.stderr.count("\n") == 1


def test_a_folder_given_to_the_wrong_command_says_what_it_is(tiny_run, tmp_path):
    exported = tmp_path / "hf"
    assert gpt_in_process("export", "--checkpoint", str(tiny_run), "--out", str(exported)).returncode == 0
    before = fingerprint(tiny_run, exported)
    for command in (["eval", "--checkpoint", str(exported)], ["generate", "--checkpoint", str(exported)]):
        result = gpt_in_process(*command)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "is a transformers model folder" in result.stderr and "gpt import --from" in result.stderr
    result = gpt_in_process("import", "--from", str(tiny_run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is already a gpt checkpoint" in result.stderr
    assert fingerprint(tiny_run, exported) == before and not (tmp_path / "out").exists()


def test_export_refuses_what_transformers_cannot_hold(tiny_run, tmp_path):
    config = ModelConfig(vocab_size=320, forward_expansion=2, activation="gelu_tanh")
    with pytest.raises(UsageError, match="always 4 x embed_dim"):
        hf_config(config, 1, 0)
    assert hf_config(ModelConfig(vocab_size=320, forward_expansion=2), 1, 0)["ffn_dim"] == 2 * 512  # OPT holds it
    with pytest.raises(UsageError, match="not found"):
        export_checkpoint(tmp_path / "missing", tmp_path / "hf")
    result = gpt_in_process("export", "--checkpoint", str(tiny_run), "--out", str(tiny_run))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "pass a new folder" in result.stderr


def test_init_from_refuses_resume_and_another_shape(tiny_run, tmp_path):
    result = gpt_in_process("train", "--init-from", str(tiny_run), "--resume", "--out", str(tmp_path / "t"))
    assert result.returncode == 2 and "pass only one of them" in result.stderr
    model_config, train_config = preset("tiny")
    model_config.embed_dim = 64
    with pytest.raises(UsageError, match="embed_dim 64 vs 32"):
        train(model_config, train_config, tmp_path / "t", init_from=tiny_run, show_progress=False)
    with pytest.raises(UsageError, match="new --out folder"):
        train(preset("tiny")[0], train_config, tiny_run, init_from=tiny_run, show_progress=False)
