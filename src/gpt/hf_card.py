"""The model card (README.md) of an exported folder: what the model learned from, its shape, its score.

The validation figure is the one training measured for the exported weights (the metrics row of the
step stored in model.safetensors), never recomputed or rounded into something else.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from gpt.checkpoint import WEIGHTS_FILE, Checkpoint
from gpt.logs import read_metrics


def weights_metadata(checkpoint_dir: Path) -> dict[str, str]:
    with safe_open(str(checkpoint_dir / WEIGHTS_FILE), framework="pt") as handle:
        return handle.metadata() or {}


def validation_line(checkpoint_dir: Path, metadata: dict[str, str]) -> str:
    step = metadata.get("step")
    rows = [r for r in read_metrics(checkpoint_dir / "metrics.jsonl")
            if str(r.get("step")) == step and "val_bits_per_char" in r]
    if not rows:
        return "Not recorded for these weights (no validation row in the source checkpoint's metrics.jsonl)."
    row = rows[-1]
    return (f"**{row['val_bits_per_char']:.4f} bits per character** (loss {row['val_loss']:.4f} nats per token) on "
            f"the validation split, measured by `gpt train` at step {step}, the step with the best validation "
            "loss. Every character of the split is scored once, with sliding windows of the model's context.")


def data_line(info: dict) -> str:
    if "imported_from" in info:
        return (f"Imported from the transformers folder `{Path(info['imported_from']).name}`; its training data is "
                "not known here.")
    if info.get("data") == "alice":
        return ("*Alice's Adventures in Wonderland* by Lewis Carroll (Project Gutenberg eBook #11, licence header and "
                "footer stripped): the first 90% of its characters for training, the last 10% for validation.")
    return (f"The text in `{Path(info.get('data', '?')).name}`: the first "
            f"{1 - info.get('train', {}).get('val_fraction', 0.1):.0%} of its characters for training, the rest "
            "for validation.")


def model_card(checkpoint: Checkpoint, checkpoint_dir: Path, architecture: str) -> str:
    """Markdown with Hub front matter: data, configuration, validation score and how to load the folder."""
    config, train = checkpoint.model_config, checkpoint.train_config
    metadata = weights_metadata(checkpoint_dir)
    blocks = ("post-LN blocks of the GPT-1 paper, no final LayerNorm" if config.arch == "gpt1"
              else "pre-LN blocks with a final LayerNorm (GPT-2)")
    params = sum(p.numel() for p in checkpoint.model.parameters())
    versions = checkpoint.info.get("versions", {})
    rows = [("architecture", f"`{architecture}`: {blocks}"), ("layers", config.num_layers),
            ("width", config.embed_dim), ("heads", config.num_heads), ("context", f"{config.sequence_len} tokens"),
            ("MLP width", config.forward_expansion * config.embed_dim),
            ("activation", "GELU, tanh approximation" if config.activation == "gelu_tanh" else "GELU, exact (erf)"),
            ("vocabulary", f"{config.vocab_size} (byte-level BPE, lossless)"), ("dropout", config.dropout),
            ("parameters", f"{params:,}"), ("training steps", metadata.get("step", "not recorded")),
            ("optimizer", f"AdamW, lr {train.learning_rate:g}, batch {train.batch_size}, "
                          f"weight decay {train.weight_decay:g}"),
            ("made with", f"wonderland-gpt {versions.get('wonderland-gpt', '?')}, torch {versions.get('torch', '?')}")]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- wonderland-gpt
- {config.arch}
---

# A small GPT made with wonderland-gpt

## Training data

{data_line(checkpoint.info)}

## Configuration

| | |
|---|---|
{table}

## Validation

{validation_line(checkpoint_dir, metadata)}

## How to load

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
# Every training text started with <|endoftext|>: put its id first, as `gpt generate` does.
ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode("Alice was")])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
print(tokenizer.decode(out[0, 1:], skip_special_tokens=True))
```

The prompt and the new tokens together must fit the {config.sequence_len}-token context. The tokenizer is
lossless and treats the literal text `<|endoftext|>` as plain text, as wonderland-gpt does. To turn this folder
back into a wonderland-gpt checkpoint: `gpt import --from THIS_FOLDER --out DIR`.
"""
