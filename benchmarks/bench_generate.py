"""Generation speed: our GPT's KV-cache decoding against transformers' GPT2LMHeadModel.generate, same shapes.

    pip install -e '.[bench]'          # or: pip install transformers
    python benchmarks/bench_generate.py [--rounds N] [--new-tokens 256] [--prompt-tokens 16] [--batch-sizes 1,8]

Both models are built from configs with random weights (no downloads): M = 6 layers, 6 heads, 384 wide,
context 512, vocabulary 4096, 4x MLP, layer-norm epsilon 1e-5, no dropout, eval mode, fp32. Ours uses the
pre-LN block (arch "gpt2") and our default exact GELU, the same computation as GPT2LMHeadModel with
`activation_function="gelu"`. Each run decodes greedily from a random
16-token prompt for 256 new tokens, end-of-text disabled on both sides, so both do the same work:

    ours, KV cache      Predictor(model).generate(prompt, 256, temperature=0)
    ours, no cache      Predictor(model).generate(prompt, 256, temperature=0, use_cache=False): a full forward per token
    transformers        model.generate(prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False,
                                       use_cache=True)   (and use_cache=False)

Time to first token is the time of a run with one new token (prefill + first choice). The runs are
interleaved in one process, several rounds, each round starting with a different system; the table gives
the best round of each (the least disturbed by background load). Threads are left at torch's default.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable

import torch

from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.predictor import Predictor

try:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:  # pragma: no cover - depends on the environment
    raise SystemExit("bench_generate.py needs HuggingFace transformers: pip install -e '.[bench]'") from None

LAYERS, HEADS, WIDTH, CONTEXT, VOCAB = 6, 6, 384, 512, 4096


def build_models() -> tuple[GPT, GPT2LMHeadModel]:
    torch.manual_seed(0)
    ours = GPT(config=ModelConfig(vocab_size=VOCAB, sequence_len=CONTEXT, num_layers=LAYERS, embed_dim=WIDTH,
                                  num_heads=HEADS, forward_expansion=4, dropout=0.0, arch="gpt2")).eval()
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        activation_function="gelu", bos_token_id=0, eos_token_id=None, pad_token_id=0)
    theirs = GPT2LMHeadModel(config).eval()
    theirs.generation_config.eos_token_id = None
    return ours, theirs


def runners(ours: GPT, theirs: GPT2LMHeadModel) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    def hf(use_cache: bool):
        return lambda prompt, n: theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                 min_new_tokens=n, do_sample=False, use_cache=use_cache)

    predictor = Predictor(ours)
    return {
        "ours, KV cache": lambda prompt, n: predictor.generate(prompt, n, temperature=0),
        "transformers, cache": hf(True),
        "ours, no cache": lambda prompt, n: predictor.generate(prompt, n, temperature=0, use_cache=False),
        "transformers, no cache": hf(False),
    }


def timed(run: Callable[[torch.Tensor, int], torch.Tensor], prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = run(prompt, n)
    elapsed = time.perf_counter() - start
    assert out.shape == (prompt.size(0), prompt.size(1) + n), out.shape
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()

    ours, theirs = build_models()
    systems = runners(ours, theirs)
    print(f"# {datetime.date.today()} torch {torch.__version__}, transformers {transformers.__version__}, "
          f"Python {platform.python_version()}, {torch.get_num_threads()} threads")
    print(f"# M: {LAYERS} layers, {HEADS} heads, {WIDTH} wide, context {CONTEXT}, vocab {VOCAB}; "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new greedy tokens; best of {args.rounds} rounds")
    generator = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = torch.randint(1, VOCAB, (batch, args.prompt_tokens), generator=generator)
        names = [n for n in systems if batch == 1 or "no cache" not in n]  # no-cache runs take minutes at 8
        for name in names:  # warm-up: first calls allocate and pick kernels
            timed(systems[name], prompt, 4)
        best: dict[str, float] = {}
        first: dict[str, float] = {}
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                best[name] = min(best.get(name, float("inf")), timed(systems[name], prompt, args.new_tokens))
                first[name] = min(first.get(name, float("inf")), timed(systems[name], prompt, 1))
        print(f"\n## batch {batch}\n")
        print("| system | new tokens/s | ms per step | time to first token (ms) |")
        print("|---|---:|---:|---:|")
        for name in names:
            rate = batch * args.new_tokens / best[name]
            print(f"| {name} | {rate:,.0f} | {1000 * best[name] / args.new_tokens:.2f} | {1000 * first[name]:.1f} |")
        cached = best["transformers, cache"] / best["ours, KV cache"]
        print(f"\nours (KV cache) / transformers generate(use_cache=True): {cached:.2f}x")
        if "ours, no cache" in best:
            print(f"ours (KV cache) / ours without cache: {best['ours, no cache'] / best['ours, KV cache']:.2f}x")
            print(f"transformers with / without cache: "
                  f"{best['transformers, no cache'] / best['transformers, cache']:.2f}x")


if __name__ == "__main__":
    main()
