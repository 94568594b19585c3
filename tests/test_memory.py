import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import gpt_many
from safetensors.torch import save_file

from gpt.checkpoint import (
    MEMORY_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_memory,
    save_memory,
    save_weights,
    weights_step,
)
from gpt.config import DEFAULT_PRESET, ModelConfig, TrainConfig, UsageError, preset
from gpt.corpus import load_documents, split_documents
from gpt.dataset import TokenSplits, encode_documents, prepare_splits
from gpt.evaluate import total_nats
from gpt.logs import read_metrics
from gpt.memory import MEMORY_MAX_BYTES, TEMPERATURE_STEPS, Memory, build_memory, fits, tune_temperature
from gpt.model import GPT
from gpt.predictor import Predictor
from gpt.runfolder import EndCosts, validates_with_memory
from gpt.tokenizer import EOT, special_id, train_tokenizer
from gpt.train import run_progress, train


def small_config(**changes) -> ModelConfig:
    config = ModelConfig(vocab_size=50, sequence_len=16, num_layers=2, embed_dim=32, num_heads=2, dropout=0.0,
                         memory_weight=0.5, memory_temperature=4.0)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize("queries_at_once", [1, 5, 300])  # a decoding step, a few rows, more than a chunk
def test_memory_distribution_is_the_softmax_of_distances_summed_per_token(queries_at_once):
    torch.manual_seed(0)
    config = small_config(embed_dim=8, vocab_size=6)
    keys, values = torch.randn(41, 8), torch.randint(0, 6, (41,))  # 41: the scan pads the rows
    memory = Memory(keys, values, values, config)
    assert len(memory) == 41 and torch.equal(memory.keys, keys)
    queries = torch.randn(queries_at_once, 8)
    probs = memory.probs(queries)
    for q, row in zip(queries, probs):
        weights = torch.softmax(-((keys - q) ** 2).sum(-1) / config.memory_temperature, 0)
        expected = torch.zeros(6).index_add_(0, values, weights)
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(queries_at_once))


def test_mixture_is_a_distribution_with_the_configured_shares():
    torch.manual_seed(1)
    config = small_config(embed_dim=8, vocab_size=6, memory_weight=0.3)
    text = torch.randint(0, 6, (31,))
    memory = Memory(torch.randn(30, 8), text[1:], text, config)
    hidden, logits = torch.randn(4, 8), torch.randn(4, 6)
    mixed = memory.mix(hidden, logits).exp()
    expected = 0.7 * torch.softmax(logits, -1) + 0.3 * memory.probs(hidden)
    torch.testing.assert_close(mixed, expected)
    assert torch.allclose(mixed.sum(-1), torch.ones(4))
    config.memory_ngram_weight, config.memory_ngram_order = 0.2, 3
    counted = Memory(memory.keys, memory.values, text, config)
    contexts = torch.tensor([[-1, -1], [-1, 2], [4, 5], [int(text[0]), int(text[1])]])
    mixed = counted.mix(hidden, logits, contexts).exp()
    expected = 0.5 * torch.softmax(logits, -1) + 0.3 * memory.probs(hidden) + 0.2 * counted.ngram.probs(contexts)
    torch.testing.assert_close(mixed, expected)
    assert torch.allclose(mixed.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="contexts"):
        counted.mix(hidden, logits)


def test_scoring_with_a_memory_equals_the_mixture_computed_by_hand():
    torch.manual_seed(2)
    model = GPT(config=small_config(memory_ngram_weight=0.2, memory_ngram_order=3)).eval()
    ids = np.random.default_rng(0).integers(2, 50, 40)
    memory = build_memory(model, np.random.default_rng(1).integers(2, 50, 100), ignore_id=1)
    nats, count = total_nats(Predictor(model, memory), ids, ignore_id=1, stride=16)
    expected = 0.0
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        for begin, end, new in ((0, 16, 16), (16, 32, 16), (32, 39, 7)):
            hidden = model.hidden(x[None, begin:end])[0, -new:]
            contexts = torch.stack([x[max(0, t - 1) : t + 1] if t else torch.tensor([-1, x[0]])
                                    for t in range(end - new, end)])  # the two tokens up to each position
            log_probs = memory.mix(hidden, model.head(hidden), contexts)
            expected -= float(log_probs.gather(1, x[begin + 1 : end + 1][-new:, None]).sum())
    assert count == 39
    assert nats == pytest.approx(expected, rel=1e-5)


def test_a_memory_of_the_scored_text_predicts_it():
    """Every token of this text has one successor, so the memory's neighbours (the keys of the same current
    token) agree on the next token: a real lookup, even through an untrained network."""
    torch.manual_seed(3)
    model = GPT(config=small_config(memory_weight=0.9, memory_temperature=0.1)).eval()
    ids = np.tile(np.random.default_rng(2).permutation(np.arange(2, 50)), 3)
    alone, count = total_nats(model, ids, ignore_id=1)
    memory = build_memory(model, ids, ignore_id=1)
    assert len(memory) == count == len(ids) - 1
    remembered, _ = total_nats(Predictor(model, memory), ids, ignore_id=1)
    assert alone / count > 3.0
    assert remembered / count < -math.log(0.9) + 0.05


def test_ignored_targets_are_not_stored():
    model = GPT(config=small_config()).eval()
    ids = np.array([1, 5, 6, 7, 1, 8, 9, 1, 10])
    memory = build_memory(model, ids, ignore_id=1)
    assert sorted(memory.values.tolist()) == [5, 6, 7, 8, 9, 10]


def test_fits_only_when_on_and_small_enough():
    config = small_config(embed_dim=512)
    assert fits(1000, config)
    assert not fits(MEMORY_MAX_BYTES // (2 * 512) + 1, config)
    assert not fits(1000, small_config(memory_weight=0.0))


def test_validations_use_a_memory_only_for_a_text_short_next_to_the_training_between_them():
    model_config, train_config = small_config(), TrainConfig(eval_interval=10)
    trained = 10 * 4 * model_config.sequence_len  # eval_interval x global batch x context
    assert validates_with_memory(TokenSplits(np.zeros(trained // 4), np.zeros(10), []), model_config, train_config, 4)
    longer = TokenSplits(np.zeros(trained // 4 + 1), np.zeros(10), [])
    assert not validates_with_memory(longer, model_config, train_config, 4)
    model_config.memory_weight, model_config.memory_ngram_weight = 0.0, 0.0
    assert not validates_with_memory(TokenSplits(np.zeros(8), np.zeros(10), []), model_config, train_config, 4)


def test_the_default_preset_scores_with_a_memory_at_its_validations_on_alice():
    """The default validates every 180 steps so that its log shows the memory's score early (docs/training.md,
    round 17); every 150 steps, the rule above would leave the memory out of them on Alice."""
    model_config, train_config = preset(DEFAULT_PRESET)
    documents = load_documents("alice")
    tokenizer = train_tokenizer(split_documents(documents, train_config.val_fraction)[0],
                                train_config.tokenizer_vocab_size)
    splits = prepare_splits(documents, tokenizer, train_config.val_fraction)  # the plain tokenization alone
    assert validates_with_memory(splits, model_config, train_config, train_config.batch_size)
    train_config.eval_interval = 150
    assert not validates_with_memory(splits, model_config, train_config, train_config.batch_size)


@pytest.mark.parametrize("weight, temperature", [(1.0, 1.0), (-0.1, 1.0), (0.5, 0.0), (0.5, -2.0)])
def test_bad_memory_settings_are_refused(weight, temperature):
    with pytest.raises(UsageError, match="memory_"):
        small_config(memory_weight=weight, memory_temperature=temperature).validate()


@pytest.mark.parametrize("weight, ngram_weight, order", [(0.5, 0.5, 4), (0.0, 0.2, 4), (0.5, -0.1, 4), (0.5, 0.2, 0)])
def test_bad_ngram_settings_are_refused(weight, ngram_weight, order):
    with pytest.raises(UsageError, match="memory_"):
        small_config(memory_weight=weight, memory_ngram_weight=ngram_weight, memory_ngram_order=order).validate()


def test_the_reserve_ends_a_timed_run_early():
    config = TrainConfig(max_time=600.0, max_steps=None)
    assert run_progress(10, 450.0, config, reserve=150.0) == 1.0
    assert run_progress(10, 300.0, config, reserve=0.0) == 0.5


def test_a_run_ends_with_the_memory_of_its_plain_training_text(memory_run):
    checkpoint = load_checkpoint(memory_run)
    documents = load_documents(memory_run.parent / "alice_start.txt")
    train_docs, val_docs = split_documents(documents, checkpoint.train_config.val_fraction)
    eot = special_id(checkpoint.tokenizer, EOT)
    train_ids = encode_documents(checkpoint.tokenizer, train_docs)
    memory = checkpoint.memory
    assert memory is not None and len(memory) == int((train_ids[1:] != eot).sum())
    assert sorted(memory.values.tolist()) == sorted(train_ids[1:][train_ids[1:] != eot].tolist())
    assert memory.ngram is not None and memory.text.tolist() == train_ids.tolist()
    rows = read_metrics(memory_run / "metrics.jsonl")
    row = rows[-1]
    assert row["step"] == 40 and row["memory_positions"] == len(memory)
    middle = next(r for r in rows if r["step"] == 20 and "val_loss" in r)
    assert "val_bits_per_char_with_memory" not in middle  # the text is long next to 20 steps: no memory mid-run
    val_ids = encode_documents(checkpoint.tokenizer, val_docs)
    nats, _ = total_nats(checkpoint.predictor, val_ids, eot)
    chars = sum(map(len, val_docs))
    assert nats / (chars * math.log(2)) == pytest.approx(row["val_bits_per_char_with_memory"], abs=1e-5)
    nats, _ = total_nats(checkpoint.model, val_ids, eot)  # the network alone
    assert nats / (chars * math.log(2)) == pytest.approx(row["val_bits_per_char_network"], abs=1e-5)


def test_validations_during_a_run_score_with_a_memory_of_the_weights_they_validate(alice_text, tmp_path):
    """A second run stopped at the first validation's step has the same weights there (the learning rate does
    not depend on the run's length here), and its checkpoint with a memory read at non-overlapping windows
    scores what the first run logged at that step."""
    text = tmp_path / "start.txt"
    text.write_text(alice_text[1_000:5_000], encoding="utf-8")

    def run(name: str, steps: int) -> list[dict]:
        model_config, train_config = preset("tiny")
        model_config.memory_weight, model_config.memory_ngram_weight = 0.5, 0.2
        train_config.max_steps, train_config.max_time, train_config.eval_interval = steps, None, 40
        train_config.min_lr_ratio = 1.0  # constant after the warm-up
        train(model_config, train_config, tmp_path / name, data=str(text), show_progress=False)
        return [row for row in read_metrics(tmp_path / name / "metrics.jsonl") if "val_loss" in row]

    middle, end = run("long", 80)
    assert (middle["step"], end["step"]) == (40, 80)
    assert middle["val_bits_per_char_with_memory"] < middle["val_bits_per_char"]
    assert "val_bits_per_char_with_memory" not in end  # the memory built at the end logs its own row
    (stopped,) = run("short", 40)
    assert stopped["val_bits_per_char"] == pytest.approx(middle["val_bits_per_char"], abs=1e-6)
    checkpoint = load_checkpoint(tmp_path / "short")
    train_docs, val_docs = split_documents(load_documents(text), checkpoint.train_config.val_fraction)
    eot = special_id(checkpoint.tokenizer, EOT)
    model, val_ids = checkpoint.model, encode_documents(checkpoint.tokenizer, val_docs)
    model.config.memory_temperature = ModelConfig().memory_temperature  # config.json has the end's choice
    memory = build_memory(model, encode_documents(checkpoint.tokenizer, train_docs), eot,
                          stride=model.config.sequence_len)
    tune_temperature(memory, model, val_ids, eot)  # as the run's validation picked it
    nats, _ = total_nats(Predictor(model, memory), val_ids, eot)
    chars = sum(map(len, val_docs))
    assert nats / (chars * math.log(2)) == pytest.approx(middle["val_bits_per_char_with_memory"], abs=1e-5)


def test_a_run_keeps_the_weights_that_score_best_with_the_memory(alice_text, tmp_path):
    """Validations with a memory judge the weights by that score; the last one (no memory) replaces them only
    with a lower network loss than theirs (on this text the network's best came at step 440 here, the memory's at
    360)."""
    text = tmp_path / "start.txt"
    text.write_text(alice_text[1_000:5_000], encoding="utf-8")
    model_config, train_config = preset("tiny")
    model_config.memory_weight, model_config.memory_ngram_weight = 0.5, 0.2
    train_config.max_steps, train_config.max_time, train_config.eval_interval = 480, None, 40
    train(model_config, train_config, tmp_path / "run", data=str(text), show_progress=False)
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in row]
    scored = [row for row in rows if "val_bits_per_char_with_memory" in row]
    by_memory = min(scored, key=lambda row: row["val_bits_per_char_with_memory"])
    kept = rows[-1] if rows[-1]["val_loss"] < by_memory["val_loss"] else by_memory
    assert weights_step(tmp_path / "run" / WEIGHTS_FILE) == str(kept["step"])


def test_a_timed_run_reserves_the_memorys_time_before_its_first_validation(alice_text, tmp_path):
    (tmp_path / "alice_start.txt").write_text(alice_text[:30_000], encoding="utf-8")
    model_config, train_config = preset("tiny")
    model_config.memory_weight = 0.5
    train_config.max_steps, train_config.max_time, train_config.eval_interval = None, 3.0, 100_000
    train(model_config, train_config, tmp_path / "run", data=str(tmp_path / "alice_start.txt"), show_progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sum("val_loss" in row for row in rows) == 1  # only the final validation
    assert 0 < rows[-1]["memory_seconds_reserved"] <= 0.25 * 3.0
    assert rows[-2]["elapsed"] < 3.0  # training stopped early, though no validation had timed the memory
    # the run's end is logged: the training time, then the last validation, checkpoint and the memory
    assert rows[-1]["run_seconds"] >= rows[-2]["elapsed"] + rows[-1]["memory_seconds"]


def test_a_memory_of_other_weights_is_not_used(memory_run, tmp_path):
    checkpoint = load_checkpoint(memory_run)
    for name in ("config.json", "tokenizer.json", WEIGHTS_FILE, MEMORY_FILE):
        (tmp_path / name).write_bytes((memory_run / name).read_bytes())
    assert load_checkpoint(tmp_path).memory is not None
    save_weights(tmp_path, checkpoint.model, {"step": "39", "val_loss": "1.0"})
    assert load_checkpoint(tmp_path).memory is None


def test_a_damaged_or_mismatched_memory_is_one_clear_error(memory_run, tmp_path):
    config = load_checkpoint(memory_run).model_config
    (tmp_path / MEMORY_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="cannot be read.*delete it"):
        load_memory(tmp_path, config, "40")
    save_file({"keys": torch.zeros(3, config.embed_dim + 1, dtype=torch.float16),
               "values": torch.zeros(3, dtype=torch.int32)}, str(tmp_path / MEMORY_FILE), metadata={"step": "40"})
    with pytest.raises(UsageError, match="does not fit the model.*delete it"):
        load_memory(tmp_path, config, "40")
    save_file({"keys": torch.zeros(3, config.embed_dim, dtype=torch.float16),
               "values": torch.zeros(3, dtype=torch.int32)}, str(tmp_path / MEMORY_FILE), metadata={"step": "40"})
    with pytest.raises(UsageError, match="without the training tokens"):
        load_memory(tmp_path, config, "40")
    config.memory_ngram_weight = 0.0
    assert len(load_memory(tmp_path, config, "40")) == 3  # the neighbours alone need no tokens


def test_generation_follows_the_mixture_with_and_without_the_cache(memory_run):
    predictor = load_checkpoint(memory_run).predictor
    model, memory = predictor.network, predictor.memory
    prompt = torch.tensor([[1, 40, 41, 42]])
    greedy = predictor.generate(prompt, 20, top_k=1)
    assert torch.equal(greedy, predictor.generate(prompt, 20, top_k=1, use_cache=False))
    differs = 0
    with torch.no_grad():
        for t in range(prompt.size(1), greedy.size(1)):  # within the context: no sliding window
            hidden = model.hidden(greedy[:, :t])[:, -1]
            mixture = memory.mix(hidden, model.head(hidden), memory.contexts(greedy[:, :t])[:, -1])
            assert int(greedy[0, t]) == int(mixture.argmax())
            differs += int(mixture.argmax()) != int(model.head(hidden).argmax())
    assert differs > 0  # the memory changed what greedy decoding picks


def test_the_command_line_scores_and_samples_with_and_without_the_memory(memory_run):
    runs = gpt_many({
        "with": ["eval", "--checkpoint", str(memory_run), "--json"],
        "without": ["eval", "--checkpoint", str(memory_run), "--json", "--no-memory"],
        "text": ["eval", "--checkpoint", str(memory_run)],
        "generate": ["generate", "--checkpoint", str(memory_run), "Alice", "--max-new-tokens", "5", "--seed", "1",
                     "--no-memory"],
    }, real="generate")
    assert all(run.returncode == 0 for run in runs.values()), {k: v.stderr for k, v in runs.items()}
    row = read_metrics(memory_run / "metrics.jsonl")[-1]
    scored = {name: json.loads(runs[name].stdout) for name in ("with", "without")}
    assert scored["with"]["bits_per_char"] == pytest.approx(row["val_bits_per_char_with_memory"], abs=1e-5)
    assert scored["without"]["bits_per_char"] == pytest.approx(row["val_bits_per_char_network"], abs=1e-5)
    assert scored["with"]["memory_positions"] == row["memory_positions"] and scored["without"]["memory_positions"] == 0
    assert "with the memory of the training text" in runs["text"].stdout
    assert runs["generate"].stdout.startswith("Alice")


def test_the_time_kept_for_a_timed_runs_end_keeps_what_validations_timed():
    costs = EndCosts(val_tokens=1_000, train_tokens=10_000)
    costs.estimate(0.001)  # from the training speed: no validation yet
    assert (costs.network, costs.keys, costs.scoring) == pytest.approx((2.0, 10.0, 6.0))
    assert costs.reserve(max_time=600) == pytest.approx(1.1 * (2 * 2.0 + 2 * 10.0 + 6.0))
    costs.time_memory(keys=4.0, scoring=3.0)  # a validation with a memory timed its parts
    costs.save = 1.5  # and a checkpoint its save
    costs.estimate(0.0002)  # a later, faster validation without a memory: the timed parts stay
    assert (costs.network, costs.keys, costs.scoring) == pytest.approx((0.4, 4.0, 3.0))
    costs.step = 1.2  # and the loop a step
    assert costs.reserve(max_time=600) == pytest.approx(1.1 * (2 * 0.4 + 1.5 + 2 * 4.0 + 3.0) + 1.2)
    assert costs.validation_with_memory() == pytest.approx(0.4 + 4.0 + 3.0 + 1.5)
    costs.estimate(0.001)  # the machine slowed down: its speed now is the floor
    assert (costs.network, costs.keys, costs.scoring) == pytest.approx((2.0, 10.0, 6.0))
    costs.time_memory(keys=12.0, scoring=7.0)  # a memory timed again replaces the old timings
    costs.estimate(0.0002)
    assert (costs.keys, costs.scoring) == pytest.approx((12.0, 7.0))
    assert costs.reserve(max_time=40) == pytest.approx(10.0)  # never more than a quarter of the budget


def test_keys_are_the_principal_components_and_queries_are_projected_alike():
    torch.manual_seed(5)
    model = GPT(config=small_config(memory_dim=8)).eval()
    train_ids = np.random.default_rng(3).integers(2, 50, 300)
    memory = build_memory(model, train_ids, ignore_id=1)
    model.config.memory_dim = 0
    states = build_memory(model, train_ids, ignore_id=1).keys.double()  # (N, 32) the whole hidden states
    assert memory.axes is not None and memory.keys.shape == (len(states), 8)
    mean = states.mean(0)
    basis = torch.linalg.svd(states - mean, full_matrices=False).Vh[:8].T  # the top 8 directions, another way
    query = torch.randn(3, 32)
    ours = memory.distances(memory.query(query))[:, : len(memory)]
    expected = torch.cdist((query.double() - mean) @ basis, (states - mean) @ basis) ** 2  # basis-independent
    torch.testing.assert_close(ours.double(), expected, rtol=1e-2, atol=1e-2)  # keys are stored in fp16


def test_a_projected_memory_survives_saving_and_loading(tmp_path):
    torch.manual_seed(6)
    model = GPT(config=small_config(memory_dim=8)).eval()
    memory = build_memory(model, np.random.default_rng(4).integers(2, 50, 200), ignore_id=1)
    save_memory(tmp_path, memory, "7")
    loaded = load_memory(tmp_path, model.config, "7")
    assert loaded.axes is not None and loaded.keys.shape == memory.keys.shape
    hidden = torch.randn(4, 32)
    torch.testing.assert_close(loaded.probs(hidden), memory.probs(hidden))


def test_the_tuned_temperature_is_the_grid_point_that_scores_the_sampled_targets_best():
    torch.manual_seed(7)
    model = GPT(config=small_config(memory_ngram_weight=0.2, memory_ngram_order=3)).eval()
    rng = np.random.default_rng(5)
    memory = build_memory(model, rng.integers(2, 50, 400), ignore_id=1)
    val_ids = rng.integers(2, 50, 200)
    chosen = tune_temperature(memory, model, val_ids, ignore_id=1)
    x = torch.from_numpy(val_ids.astype(np.int64))

    def sampled_nats(temperature: float) -> float:  # the mixture's own path: softmax summed per token
        memory.temperature, nats = temperature, 0.0
        for begin, end, new in ((0, 16, 16), *((b, b + 16, 8) for b in range(8, 184, 8)), (183, 199, 1)):
            with torch.no_grad():
                hidden = model.hidden(x[None, begin:end])[0, -new:]
                contexts = memory.contexts(x[None, begin:end])[0, -new:]
                log_probs = memory.mix(hidden, model.head(hidden), contexts)[::8]
            nats -= float(log_probs.gather(1, x[begin + 1 : end + 1][-new:][::8, None]).sum())
        return nats

    grid = [small_config().memory_temperature * step for step in TEMPERATURE_STEPS]
    scores = [sampled_nats(t) for t in grid]
    assert chosen == grid[int(np.argmin(scores))]
    assert max(scores) - min(scores) > 1e-3  # the choice matters here
