"""How exactly a checkpoint's transformers export reproduces it: logits, a GELU control, greedy text.

    pip install -e '.[hf]'
    python benchmarks/hf_parity.py --checkpoint runs/small [--prompt "Alice was"] [--new-tokens 50]

Exports the checkpoint to a temporary folder, loads it with AutoModelForCausalLM (fp32, CPU) and prints:
the max abs logits difference on random token windows and on full windows of the validation text; the same
difference with transformers' activation swapped for the other GELU (exact for tanh, tanh for exact), a
mapping error the check must catch; and whether greedy generation from <|endoftext|> + prompt gives the
same tokens in both (our `Predictor(network).generate(temperature=0)` against `generate(do_sample=False)`, prompt + new
tokens within the context).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
import torch.nn as nn
import transformers

from gpt.checkpoint import load_checkpoint
from gpt.corpus import load_documents, split_documents
from gpt.hf import export_checkpoint
from gpt.predictor import Predictor
from gpt.tokenizer import EOT, encode


def max_diff(ours, theirs, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="Alice was")
    parser.add_argument("--new-tokens", type=int, default=50)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    config, tokenizer = checkpoint.model_config, checkpoint.tokenizer
    window, eot = config.sequence_len, tokenizer.token_to_id(EOT)
    val = split_documents(load_documents(checkpoint.info.get("data", "alice")), checkpoint.train_config.val_fraction)[1]
    ids = [eot] + encode(tokenizer, "".join(val))
    real = torch.tensor([ids[i : i + window] for i in range(0, len(ids) - window, window)][:16])
    random = torch.randint(0, config.vocab_size, (16, window), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        model = transformers.AutoModelForCausalLM.from_pretrained(export_checkpoint(args.checkpoint, folder)).eval()
        report = {"arch": config.arch, "activation": config.activation, "class": type(model).__name__,
                  "random_tokens": max_diff(checkpoint.model, model, random),
                  "validation_text": max_diff(checkpoint.model, model, real)}
        context = torch.tensor([[eot] + encode(tokenizer, args.prompt)])
        steps = min(args.new_tokens, window - context.size(1) + 1)
        network = Predictor(checkpoint.model)  # the export is the network alone, without the memory
        ours = network.generate(context, steps, temperature=0)[0, context.size(1) :].tolist()
        theirs = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=steps,
                                do_sample=False)[0, context.size(1) :].tolist()
        ours = ours[: ours.index(eot) + 1] if eot in ours else ours  # transformers stops after <|endoftext|>
        report.update(greedy_tokens=len(theirs), greedy_identical=ours == theirs)
        other_gelu = nn.GELU(approximate="none" if config.activation == "gelu_tanh" else "tanh")
        if type(model).__name__ == "OPTForCausalLM":
            for layer in model.model.decoder.layers:
                layer.activation_fn = other_gelu
        else:
            for block in model.transformer.h:
                block.mlp.act = other_gelu
        report["other_gelu_control"] = max(max_diff(checkpoint.model, model, t) for t in (random, real))
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
