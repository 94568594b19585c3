"""Rows of one batch at their own lengths: each row's text is the text it gets alone, whoever joins or leaves."""

import pytest
import torch

from gpt.batching import Batch, Request
from gpt.checkpoint import load_checkpoint
from gpt.retriever import Retriever
from gpt.sampling import SamplingParams
from gpt.tokenizer import EOT, decode, encode, special_id

PROMPTS = ["Alice", "The Queen said", "", "Down, down, down. Would the fall never come to an end?", "Oh my ears",
           "and whiskers", "How doth the little crocodile improve his shining tail", "Curiouser", "The Hatter",
           "Who are you?", "said the Caterpillar", "It was the White Rabbit, trotting slowly back again",
           "Soup of the evening", "beautiful Soup", "Off with her head!", "the March Hare"]
PARAMS = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.8, top_k=20), SamplingParams(1.2, top_p=0.9),
          SamplingParams(0.9, min_p=0.05), SamplingParams(1.0, repetition_penalty=1.3)]


@pytest.fixture(scope="module")
def checkpoint(memory_run):
    checkpoint = load_checkpoint(memory_run)
    assert checkpoint.predictor.memory is not None and checkpoint.predictor.memory.ngram is not None
    return checkpoint


def requests() -> list[Request]:
    """16 requests of different prompts, lengths and settings; some run past the 32-token window."""
    return [Request(prompt, max_new_tokens=10 + 7 * i, params=PARAMS[i % len(PARAMS)], seed=100 + i,
                    stop=["Alice said"] if i == 5 else ())
            for i, prompt in enumerate(PROMPTS)]


def alone(checkpoint, request: Request) -> str:
    batch = Batch(checkpoint.predictor, checkpoint.tokenizer, 1)
    generation = batch.add(request)
    while batch.active:
        batch.step()
    return generation.text.text


def test_a_row_among_fifteen_others_gets_the_text_it_gets_alone(checkpoint):
    expected = [alone(checkpoint, request) for request in requests()]
    batch = Batch(checkpoint.predictor, checkpoint.tokenizer, 16)
    generations = [batch.add(request) for request in requests()]
    while batch.active:
        batch.step()
    assert [g.text.text for g in generations] == expected
    assert len(set(expected)) == len(expected) and max(g.text.completion_tokens for g in generations) > 32


def test_rows_that_join_late_and_leave_early_change_no_other_row(checkpoint):
    expected = [alone(checkpoint, request) for request in requests()]
    batch = Batch(checkpoint.predictor, checkpoint.tokenizer, 4)  # fewer rows than requests: they take turns
    waiting, generations, cancelled = list(enumerate(requests())), {}, None
    steps = 0
    while waiting or batch.active:
        while waiting and len(batch.active) < batch.capacity:
            index, request = waiting.pop(0)
            generations[index] = batch.add(request)
        batch.step()
        steps += 1
        if steps == 5:  # a reader goes away mid-batch: its row leaves, the last row takes its slot
            cancelled = next(i for i, g in generations.items() if g.slot == 0)
            batch.remove(generations[cancelled])
    for index, generation in generations.items():
        if index == cancelled:
            assert expected[index].startswith(generation.text.text) and generation.text.finish_reason is None
        else:
            assert generation.text.text == expected[index]


def test_every_row_scores_what_a_full_forward_pass_over_its_window_scores(checkpoint):
    """Rows decoding one token and rows running a whole window (new, or slid past the window) share one pass
    through the layers: each row's scores are those of the general forward over its window, with the memory."""
    predictor, tokenizer = checkpoint.predictor, checkpoint.tokenizer
    batch = Batch(predictor, tokenizer, 4)
    rows = [batch.add(Request(p, max_new_tokens=60, params=SamplingParams(1.0), seed=i))
            for i, p in enumerate(PROMPTS[:3])]
    lengths, slid = {}, 0
    for step in range(50):
        if step == 20:  # joins while the others decode: its prompt and their tokens run together
            rows.append(batch.add(Request(PROMPTS[3], max_new_tokens=20, seed=9)))
        batch.step()
        with torch.inference_mode():
            for generation in batch.active:
                tokens = torch.tensor([generation.tokens])
                hidden = predictor.network.hidden(tokens)[:, -1]
                expected = predictor.last_scores(hidden, predictor.network.head(hidden), tokens)[0]
                torch.testing.assert_close(generation.scores, expected, atol=1e-4, rtol=1e-4)
                slid += len(generation.tokens) < lengths.get(id(generation), 0)
                lengths[id(generation)] = len(generation.tokens)
    assert slid >= 3  # windows slid, each run again in a step where others decoded


def test_greedy_rows_follow_the_mixture_decoded_alone_by_the_predictor(checkpoint):
    """The reference: Predictor.generate, whose cached decoding the tests hold to full forward passes."""
    tokenizer, predictor = checkpoint.tokenizer, checkpoint.predictor
    eot = special_id(tokenizer, EOT)
    batch = Batch(predictor, tokenizer, 3)
    prompts = PROMPTS[:3]
    generations = [batch.add(Request(p, max_new_tokens=45, params=SamplingParams(0.0))) for p in prompts]
    while batch.active:
        batch.step()
    for prompt, generation in zip(prompts, generations):
        ids = torch.tensor([[eot] + encode(tokenizer, prompt)])
        new = predictor.generate(ids, 45, temperature=0)[0, ids.size(1):].tolist()
        new = new[: new.index(eot)] if eot in new else new
        assert generation.text.text == decode(tokenizer, new)


def test_the_retriever_seeds_row_i_with_seed_plus_i(checkpoint):
    retriever = Retriever(checkpoint.tokenizer, checkpoint.predictor)
    together = retriever.complete(["Alice", "Alice", "The King"], max_new_tokens=20, seed=41)
    assert [c.text for c in together] == [retriever.complete([p], max_new_tokens=20, seed=41 + i)[0].text
                                          for i, p in enumerate(["Alice", "Alice", "The King"])]
    assert together[0].text != together[1].text


def test_a_full_batch_and_bad_settings_are_refused(checkpoint):
    batch = Batch(checkpoint.predictor, checkpoint.tokenizer, 1)
    batch.add(Request("Alice"))
    with pytest.raises(RuntimeError, match="full"):
        batch.add(Request("Alice"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch.add(Request("Alice", max_new_tokens=-1))
    finished = Batch(checkpoint.predictor, checkpoint.tokenizer, 1).add(Request("Alice", max_new_tokens=0))
    assert finished.text.completion().finish_reason == "length" and finished.slot == -1
