"""Checkpoints the ecosystem can use: export to and import from Hugging Face `transformers` folders.

Each of our models is exactly one transformers class, so the conversion is a renaming:
  gpt1 (post-LN, no final LN), tanh GELU  <-> OpenAIGPTLMHeadModel (`afn: "gelu"` is the tanh approximation)
  gpt1, exact GELU                        <-> OPTForCausalLM (`do_layer_norm_before: false`, `"gelu"`)
  gpt2 (pre-LN, final LayerNorm)          <-> GPT2LMHeadModel (`activation_function`: `"gelu_new"` or `"gelu"`)
All use layer-norm epsilon 1e-5, biases on every projection, an output layer tied to the token
embedding, and no saved attention-mask buffers. transformers' GPT projections are `Conv1D` modules whose
weight is [in, out], the transpose of our `nn.Linear` [out, in]; OPT keeps [out, in] but splits our one
query-key-value projection into three, and its position table starts two rows in. A transformers folder
that differs in anything that changes the numbers (another activation or epsilon, an untied head,
cross-attention, scaled attention) is refused rather than converted into a different model. Dropout only
matters for training: attn_pdrop is our model.attention_dropout, resid_pdrop = embd_pdrop our
model.dropout (OPT has no embedding dropout), and our model.embedding_dropout has no transformers field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from gpt.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_write,
    load_checkpoint,
    save_config,
    save_weights,
    write_text,
)
from gpt.config import ModelConfig, TrainConfig, UsageError, first_line
from gpt.hf_card import model_card
from gpt.model import GPT
from gpt.preflight import check_loading
from gpt.tokenizer import EOT, PAD, decode, encode

MODEL_TYPES = {"openai-gpt": "OpenAIGPTLMHeadModel", "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel"}
EMBEDDINGS = {"openai-gpt": ("tokens_embed", "positions_embed"), "gpt2": ("wte", "wpe")}
BLOCK_MODULES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj", "ln_2": "ln_2"}
CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # transposed between nn.Linear and Conv1D
OPT_MODULES = {"ln_1": "self_attn_layer_norm", "attn.proj": "self_attn.out_proj", "mlp.fc": "fc1",
               "mlp.proj": "fc2", "ln_2": "final_layer_norm"}
OPT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding looks up position + 2
GELU_NAMES = {  # each model type's activation key, and its names for our activations
    "openai-gpt": ("afn", {"gelu": "gelu_tanh"}),
    "gpt2": ("activation_function", {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}),
    "opt": ("activation_function", {"gelu": "gelu"}),
}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
OLD_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks some older GPT-2 files still carry
LOSSLESS_PROBE = "Alice said: \"Curiouser and curiouser!\"\n\n\tcafé 你好 😀  <|endoftext|> [PAD] x\r\n"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("this needs the transformers package: pip install transformers") from None
    return transformers


def model_type_of(config: ModelConfig) -> str:
    if config.arch == "gpt2":
        return "gpt2"
    return "openai-gpt" if config.activation == "gelu_tanh" else "opt"


def gpt_key_map(model_type: str, num_layers: int) -> dict[str, str]:
    """Our parameter names -> a GPT class's (the tied lm_head is left out, as save_pretrained does)."""
    token, position = EMBEDDINGS[model_type]
    names = {"token_embed.weight": f"transformer.{token}.weight",
             "position_embed.weight": f"transformer.{position}.weight"}
    for i in range(num_layers):
        for ours, theirs in BLOCK_MODULES.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    if model_type == "gpt2":
        names.update({"ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"})
    return names


def opt_key_map(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Our parameter names -> OPTForCausalLM's; the query-key-value projection maps to three."""
    names = {"token_embed.weight": ("model.decoder.embed_tokens.weight",),
             "position_embed.weight": ("model.decoder.embed_positions.weight",)}
    for i in range(num_layers):
        theirs = f"model.decoder.layers.{i}"
        for kind in ("weight", "bias"):
            names[f"blocks.{i}.attn.qkv.{kind}"] = tuple(f"{theirs}.{name}.{kind}" for name in OPT_QKV)
            for ours, name in OPT_MODULES.items():
                names[f"blocks.{i}.{ours}.{kind}"] = (f"{theirs}.{name}.{kind}",)
    return names


def key_map(model_type: str, num_layers: int) -> dict[str, tuple[str, ...]]:
    if model_type == "opt":
        return opt_key_map(num_layers)
    return {ours: (theirs,) for ours, theirs in gpt_key_map(model_type, num_layers).items()}


def is_conv1d_weight(our_name: str) -> bool:
    return our_name.endswith(".weight") and any(f".{module}." in our_name for module in CONV1D)


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    model_type = model_type_of(config)
    names = key_map(model_type, config.num_layers)
    if set(state) != set(names):
        raise UsageError(f"the weights do not match a {config.arch} model: {sorted(set(state) ^ set(names))[:3]}")
    out = {}
    for ours, tensor in state.items():
        if model_type == "opt" and ours == "position_embed.weight":
            tensor = torch.cat([tensor.new_zeros(OPT_POSITION_OFFSET, tensor.size(1)), tensor])
        elif model_type != "opt" and is_conv1d_weight(ours):
            tensor = tensor.t()
        for theirs, part in zip(names[ours], tensor.chunk(len(names[ours]))):
            out[theirs] = part.contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    model_type = model_type_of(config)
    names = key_map(model_type, config.num_layers)
    missing = [name for theirs in names.values() for name in theirs if name not in state]
    if missing:
        raise UsageError(f"the transformers weights lack {missing[0]} (and {len(missing) - 1} more); "
                         "the folder is incomplete")
    out = {}
    for ours, theirs in names.items():
        tensor = torch.cat([state[name] for name in theirs])
        if model_type == "opt" and ours == "position_embed.weight":
            tensor = tensor[OPT_POSITION_OFFSET:]
        elif model_type != "opt" and is_conv1d_weight(ours):
            tensor = tensor.t()
        out[ours] = tensor.contiguous()
    return out


def hf_config(config: ModelConfig, eot_id: int, pad_id: int | None) -> dict:
    """The transformers config.json for our model: only keys its config class knows."""
    model_type = model_type_of(config)
    if model_type == "openai-gpt" and config.forward_expansion != 4:
        raise UsageError(f"OpenAIGPTLMHeadModel's MLP is always 4 x embed_dim, but this gpt1 model uses "
                         f"forward_expansion {config.forward_expansion}; it cannot be exported exactly")
    activation_key, names = GELU_NAMES[model_type]
    activation = next(name for name, ours in names.items() if ours == config.activation)
    attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
    common = {"vocab_size": config.vocab_size, activation_key: activation, "tie_word_embeddings": True,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id}
    if model_type == "opt":
        fields = {**common, "hidden_size": config.embed_dim, "num_hidden_layers": config.num_layers,
                  "num_attention_heads": config.num_heads, "ffn_dim": config.forward_expansion * config.embed_dim,
                  "max_position_embeddings": config.sequence_len, "word_embed_proj_dim": config.embed_dim,
                  "do_layer_norm_before": False, "enable_bias": True, "layer_norm_elementwise_affine": True,
                  "dropout": config.dropout, "attention_dropout": attention_dropout, "activation_dropout": 0.0,
                  "layerdrop": 0.0}
    else:
        fields = {**common, "n_positions": config.sequence_len, "n_embd": config.embed_dim,
                  "n_layer": config.num_layers, "n_head": config.num_heads, "resid_pdrop": config.dropout,
                  "embd_pdrop": config.dropout, "attn_pdrop": attention_dropout, "layer_norm_epsilon": LAYER_NORM_EPS}
    if model_type == "gpt2":
        fields.update(n_inner=config.forward_expansion * config.embed_dim, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    return {"architectures": [MODEL_TYPES[model_type]], "model_type": model_type, **fields, "dtype": "float32"}


def gpt_fields(hf: dict) -> tuple[dict, dict[str, bool]]:
    """A GPT-2 / OpenAI-GPT config as our shape fields, and what in it we cannot represent."""
    embed = hf["n_embd"]
    shape = {"sequence_len": hf["n_positions"], "num_layers": hf["n_layer"], "embed_dim": embed,
             "num_heads": hf["n_head"], "hidden": hf.get("n_inner") or 4 * embed,
             "dropout": hf.get("resid_pdrop", 0.1), "attention_dropout": hf.get("attn_pdrop", 0.1)}
    problems = {
        f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} is not 1e-5":
            not math.isclose(hf.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS, rel_tol=1e-9),
        "it has cross-attention": bool(hf.get("add_cross_attention")),
        "attention scores are not scaled by 1/sqrt(head_dim)": not hf.get("scale_attn_weights", True),
        "attention is scaled by the inverse layer index": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "resid_pdrop and embd_pdrop differ (we use one dropout outside attention)":
            hf.get("resid_pdrop", 0.1) != hf.get("embd_pdrop", 0.1),
    }
    return shape, problems


def opt_fields(hf: dict) -> tuple[dict, dict[str, bool]]:
    """An OPT config as our shape fields, and what in it we cannot represent."""
    shape = {"sequence_len": hf["max_position_embeddings"], "num_layers": hf["num_hidden_layers"],
             "embed_dim": hf["hidden_size"], "num_heads": hf["num_attention_heads"], "hidden": hf["ffn_dim"],
             "dropout": hf.get("dropout", 0.1), "attention_dropout": hf.get("attention_dropout", 0.0)}
    problems = {
        "its blocks are pre-LN (gpt1 is OPT with do_layer_norm_before false)": hf.get("do_layer_norm_before", True),
        "it projects its embeddings (word_embed_proj_dim differs from hidden_size)":
            hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"],
        "its projections have no biases": not hf.get("enable_bias", True),
        "its layer norms have no gains and biases": not hf.get("layer_norm_elementwise_affine", True),
        "it has dropout inside the MLP (activation_dropout)": bool(hf.get("activation_dropout", 0.0)),
    }
    return shape, problems


def model_config_from_hf(hf: dict, pad_id: int | None) -> ModelConfig:
    """Our ModelConfig for a transformers config, or a UsageError naming what we cannot represent."""
    model_type = hf["model_type"]
    shape, problems = opt_fields(hf) if model_type == "opt" else gpt_fields(hf)
    activation_key, names = GELU_NAMES[model_type]
    embed, hidden = shape["embed_dim"], shape["hidden"]
    problems |= {
        f"{activation_key} {hf.get(activation_key)!r} is not a GELU we have (one of {', '.join(names)})":
            hf.get(activation_key) not in names,
        "the output layer is not tied to the token embedding": not hf.get("tie_word_embeddings", True),
        f"the MLP width {hidden} is not a multiple of the width {embed}": hidden % embed != 0,
    }
    found = [what for what, bad in problems.items() if bad]
    if found:
        raise UsageError(f"this {MODEL_TYPES[model_type]} cannot be represented exactly: {'; '.join(found)}")
    dropout, attention_dropout = float(shape["dropout"]), float(shape["attention_dropout"])
    config = ModelConfig(vocab_size=hf["vocab_size"], sequence_len=shape["sequence_len"],
                         num_layers=shape["num_layers"], embed_dim=embed, num_heads=shape["num_heads"],
                         forward_expansion=hidden // embed, dropout=dropout,
                         arch="gpt2" if model_type == "gpt2" else "gpt1", activation=names[hf[activation_key]],
                         pad_idx=pad_id, attention_dropout=None if attention_dropout == dropout else attention_dropout)
    config.validate()
    return config


def tokenizer_files(tokenizer: Tokenizer, sequence_len: int) -> dict[str, str]:
    """tokenizer.json plus the two files AutoTokenizer reads; special-token literals in text stay text."""
    pad = PAD if tokenizer.token_to_id(PAD) is not None else None
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad or EOT}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": sequence_len,
                "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tokenizer.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(settings, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def check_output_folder(out: Path, source: Path, what: str) -> None:
    """Refuse to write over the source or over a folder that holds another kind of checkpoint."""
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the folder being converted; pass a new folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    existing = out / CONFIG_FILE
    if existing.is_file():
        try:
            info = json.loads(existing.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            info = {}
        if not isinstance(info, dict) or ("format_version" in info) != (what == "checkpoint"):
            raise UsageError(f"--out {out} already holds another kind of model folder; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a folder that transformers loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    transformers = require_transformers()
    checkpoint = load_checkpoint(checkpoint_dir)
    config, tokenizer = checkpoint.model_config, checkpoint.tokenizer
    eot_id, pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    if eot_id is None:
        raise UsageError(f"the tokenizer in {checkpoint_dir} has no {EOT} token; it cannot be exported")
    hf = hf_config(config, eot_id, pad_id)
    hf["transformers_version"] = transformers.__version__
    check_output_folder(out, checkpoint_dir, "transformers")
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id if pad_id is None
                  else pad_id, "transformers_version": transformers.__version__}
    tensors = to_hf_state_dict(checkpoint.model.state_dict(), config)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_text(out / "config.json", json.dumps(hf, indent=2) + "\n")
    write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    for name, text in tokenizer_files(tokenizer, config.sequence_len).items():
        write_text(out / name, text)
    write_text(out / "README.md", model_card(checkpoint, checkpoint_dir, MODEL_TYPES[model_type_of(config)]))
    return out


def load_hf_model(hf_dir: Path, transformers):
    """The transformers model in float32, refusing files with missing or unknown weights."""
    bars = transformers.utils.logging
    was_showing = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # a bar for loading a file is noise in a one-shot command
    try:
        model, report = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"transformers cannot load the model in {hf_dir} ({first_line(err)})") from None
    finally:
        if was_showing:
            bars.enable_progress_bar()
    unexpected = [k for k in report.get("unexpected_keys", []) if not k.endswith(OLD_MASK_BUFFERS)]
    missing = list(report.get("missing_keys", []))
    if missing or unexpected or report.get("mismatched_keys"):
        raise UsageError(f"the weights in {hf_dir} do not fit its config.json (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]}); the folder is damaged or of another model")
    return model


def load_hf_tokenizer(hf_dir: Path, transformers) -> Tokenizer:
    """The folder's tokenizer as a `tokenizers.Tokenizer`; it must be lossless and know <|endoftext|>.

    tokenizer.json is taken as it is (so a round trip keeps it byte for byte); a folder with only
    vocab.json and merges.txt is converted by transformers.
    """
    try:
        if (hf_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True).backend_tokenizer
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
    except Exception as err:  # tokenizers raises a bare Exception; transformers OSError, ValueError and others
        raise UsageError(f"the tokenizer in {hf_dir} cannot be loaded ({first_line(err)}); "
                         "the folder needs tokenizer.json, or vocab.json and merges.txt") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.encode_special_tokens = True
    if tokenizer.token_to_id(EOT) is None:
        raise UsageError(f"the tokenizer in {hf_dir} has no {EOT} token, which wonderland-gpt uses to start and "
                         "end every text; only GPT-2-style byte-level tokenizers can be imported")
    if decode(tokenizer, encode(tokenizer, LOSSLESS_PROBE)) != LOSSLESS_PROBE:
        raise UsageError(f"the tokenizer in {hf_dir} does not decode text back exactly (it normalizes or "
                         "lowercases); wonderland-gpt needs a lossless byte-level tokenizer")
    return tokenizer


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a local GPT2LMHeadModel / OpenAIGPTLMHeadModel / OPTForCausalLM folder into a checkpoint folder."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise UsageError(f"{hf_dir / 'config.json'} not found; pass a transformers model folder to --from")
    try:
        raw = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{hf_dir / 'config.json'} is not valid JSON ({err}); the folder is damaged") from None
    if model_type is None and isinstance(raw, dict) and "format_version" in raw:
        raise UsageError(f"{hf_dir} is already a gpt checkpoint: use it as it is (gpt generate --checkpoint "
                         f"{hf_dir}); gpt import reads transformers folders")
    transformers = require_transformers()
    if model_type not in MODEL_TYPES:
        raise UsageError(f"model_type {model_type!r} is not supported; gpt import reads GPT2LMHeadModel (gpt2), "
                         "OpenAIGPTLMHeadModel (openai-gpt) and post-LN OPTForCausalLM (opt) folders")
    hf = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True).to_dict()
    tokenizer = load_hf_tokenizer(hf_dir, transformers)
    config = model_config_from_hf(hf, tokenizer.token_to_id(PAD))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UsageError(f"the tokenizer in {hf_dir} has {tokenizer.get_vocab_size()} tokens but the model "
                         f"{config.vocab_size}; wonderland-gpt needs them equal")
    check_loading(config, 0, hf_dir, copies=3)
    hf_model = load_hf_model(hf_dir, transformers)
    state = from_hf_state_dict(hf_model.state_dict(), config)
    check_output_folder(out, hf_dir, "checkpoint")
    model = GPT(config=config)
    model.load_state_dict(state)
    train_config = TrainConfig(tokenizer_vocab_size=config.vocab_size)
    save_config(out, config, train_config, tokenizer, "alice", extra={"imported_from": str(hf_dir.resolve())})
    save_weights(out, model, {"imported_from": str(hf_dir.resolve())})
    return out
