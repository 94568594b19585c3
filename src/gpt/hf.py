"""Checkpoints the ecosystem can use: export to and import from Hugging Face `transformers` folders.

Our two block types are exactly transformers' two GPT classes, so the conversion is a renaming:
  gpt1 (post-LN, no final LN)      <-> OpenAIGPTLMHeadModel (`afn: "gelu"` is the tanh approximation)
  gpt2 (pre-LN, final LayerNorm)   <-> GPT2LMHeadModel (`activation_function: "gelu_new"`, tanh too)
Both use layer-norm epsilon 1e-5, biases on every projection, an output layer tied to the token
embedding, and no saved attention-mask buffers. transformers' projections are `Conv1D` modules whose
weight is [in, out], the transpose of our `nn.Linear` [out, in]. A transformers folder that differs in
anything that changes the numbers (another activation or epsilon, an untied head, cross-attention,
scaled attention) is refused rather than converted into a different model. Dropout only matters for
training: attn_pdrop is our model.attention_dropout, resid_pdrop = embd_pdrop our model.dropout, and our
model.embedding_dropout has no transformers field (an export leaves it out).
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
from gpt.tokenizer import EOT, PAD, decode, encode

HF_CLASSES = {"gpt1": ("openai-gpt", "OpenAIGPTLMHeadModel"), "gpt2": ("gpt2", "GPT2LMHeadModel")}
ARCH_OF_TYPE = {model_type: arch for arch, (model_type, _) in HF_CLASSES.items()}
EMBEDDINGS = {"gpt1": ("tokens_embed", "positions_embed"), "gpt2": ("wte", "wpe")}
BLOCK_MODULES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj", "ln_2": "ln_2"}
CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # transposed between nn.Linear and Conv1D
TANH_GELU = {"gpt1": ("afn", ("gelu",)), "gpt2": ("activation_function", ("gelu_new", "gelu_pytorch_tanh"))}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
OLD_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks some older GPT-2 files still carry
LOSSLESS_PROBE = "Alice said: \"Curiouser and curiouser!\"\n\n\tcafé 你好 😀  <|endoftext|> [PAD] x\r\n"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("this needs the transformers package: pip install transformers") from None
    return transformers


def key_map(arch: str, num_layers: int) -> dict[str, str]:
    """Our parameter names -> transformers' (the tied lm_head is left out, as save_pretrained does)."""
    token, position = EMBEDDINGS[arch]
    names = {"token_embed.weight": f"transformer.{token}.weight",
             "position_embed.weight": f"transformer.{position}.weight"}
    for i in range(num_layers):
        for ours, theirs in BLOCK_MODULES.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    if arch == "gpt2":
        names.update({"ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"})
    return names


def is_conv1d_weight(our_name: str) -> bool:
    return our_name.endswith(".weight") and any(f".{module}." in our_name for module in CONV1D)


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    names = key_map(config.arch, config.num_layers)
    if set(state) != set(names):
        raise UsageError(f"the weights do not match a {config.arch} model: {sorted(set(state) ^ set(names))[:3]}")
    return {names[k]: (t.t() if is_conv1d_weight(k) else t).contiguous() for k, t in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    names = key_map(config.arch, config.num_layers)
    missing = [theirs for theirs in names.values() if theirs not in state]
    if missing:
        raise UsageError(f"the transformers weights lack {missing[0]} (and {len(missing) - 1} more); "
                         "the folder is incomplete")
    return {ours: (state[theirs].t() if is_conv1d_weight(ours) else state[theirs]).contiguous()
            for ours, theirs in names.items()}


def hf_config(config: ModelConfig, eot_id: int, pad_id: int | None) -> dict:
    """The transformers config.json for our model: only keys its config class knows."""
    if config.arch == "gpt1" and config.forward_expansion != 4:
        raise UsageError(f"OpenAIGPTLMHeadModel's MLP is always 4 x embed_dim, but this gpt1 model uses "
                         f"forward_expansion {config.forward_expansion}; it cannot be exported exactly")
    model_type, architecture = HF_CLASSES[config.arch]
    activation_key, (activation, *_) = TANH_GELU[config.arch]
    fields = {
        "vocab_size": config.vocab_size, "n_positions": config.sequence_len, "n_embd": config.embed_dim,
        "n_layer": config.num_layers, "n_head": config.num_heads, activation_key: activation,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout if config.attention_dropout is None else config.attention_dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id,
    }
    if config.arch == "gpt2":
        fields.update(n_inner=config.forward_expansion * config.embed_dim, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    return {"architectures": [architecture], "model_type": model_type, **fields, "dtype": "float32"}


def model_config_from_hf(hf: dict, pad_id: int | None) -> ModelConfig:
    """Our ModelConfig for a transformers config, or a UsageError naming what we cannot represent."""
    arch = ARCH_OF_TYPE[hf["model_type"]]
    activation_key, tanh_names = TANH_GELU[arch]
    embed = hf["n_embd"]
    hidden = hf.get("n_inner") or 4 * embed
    problems = {
        f"{activation_key} {hf.get(activation_key)!r} is not the tanh GELU": hf.get(activation_key) not in tanh_names,
        f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} is not 1e-5":
            not math.isclose(hf.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS, rel_tol=1e-9),
        "the output layer is not tied to the token embedding": not hf.get("tie_word_embeddings", True),
        "it has cross-attention": bool(hf.get("add_cross_attention")),
        "attention scores are not scaled by 1/sqrt(head_dim)": not hf.get("scale_attn_weights", True),
        "attention is scaled by the inverse layer index": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        f"the MLP width {hidden} is not a multiple of n_embd {embed}": hidden % embed != 0,
        "resid_pdrop and embd_pdrop differ (we use one dropout outside attention)":
            hf.get("resid_pdrop", 0.1) != hf.get("embd_pdrop", 0.1),
    }
    found = [what for what, bad in problems.items() if bad]
    if found:
        raise UsageError(f"this {HF_CLASSES[arch][1]} cannot be represented exactly: {'; '.join(found)}")
    dropout, attention_dropout = float(hf.get("resid_pdrop", 0.1)), float(hf.get("attn_pdrop", 0.1))
    config = ModelConfig(vocab_size=hf["vocab_size"], sequence_len=hf["n_positions"], num_layers=hf["n_layer"],
                         embed_dim=embed, num_heads=hf["n_head"], forward_expansion=hidden // embed,
                         dropout=dropout, arch=arch, pad_idx=pad_id,
                         attention_dropout=None if attention_dropout == dropout else attention_dropout)
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
    write_text(out / "README.md", model_card(checkpoint, checkpoint_dir, HF_CLASSES[config.arch][1]))
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
    """Convert a local GPT2LMHeadModel / OpenAIGPTLMHeadModel folder into a checkpoint folder."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise UsageError(f"{hf_dir / 'config.json'} not found; pass a transformers model folder to --from")
    transformers = require_transformers()
    try:
        raw = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{hf_dir / 'config.json'} is not valid JSON ({err}); the folder is damaged") from None
    if model_type not in ARCH_OF_TYPE:
        raise UsageError(f"model_type {model_type!r} is not supported; gpt import reads GPT2LMHeadModel (gpt2) "
                         "and OpenAIGPTLMHeadModel (openai-gpt) folders")
    hf = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True).to_dict()
    tokenizer = load_hf_tokenizer(hf_dir, transformers)
    config = model_config_from_hf(hf, tokenizer.token_to_id(PAD))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UsageError(f"the tokenizer in {hf_dir} has {tokenizer.get_vocab_size()} tokens but the model "
                         f"{config.vocab_size}; wonderland-gpt needs them equal")
    hf_model = load_hf_model(hf_dir, transformers)
    state = from_hf_state_dict(hf_model.state_dict(), config)
    check_output_folder(out, hf_dir, "checkpoint")
    model = GPT(config=config)
    model.load_state_dict(state)
    train_config = TrainConfig(tokenizer_vocab_size=config.vocab_size)
    save_config(out, config, train_config, tokenizer, "alice", extra={"imported_from": str(hf_dir.resolve())})
    save_weights(out, model, {"imported_from": str(hf_dir.resolve())})
    return out
