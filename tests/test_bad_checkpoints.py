"""Missing, damaged and mismatched checkpoints through the `gpt` command (its entry point in this process, one
case also as a new process: cli_helpers.gpt_many).

Each case is a copy of a real checkpoint with one thing wrong; `gpt eval`, `gpt generate` or
`gpt train --resume` must answer with one clear line and leave the folder byte-identical.
"""

import json
import shutil

import pytest
import torch
from cli_helpers import assert_one_clear_line, fingerprint, gpt_many

from gpt.checkpoint import CONFIG_FILE, STATE_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from gpt.corpus import load_documents
from gpt.tokenizer import save_tokenizer, train_tokenizer


def edit_config(folder, change):
    info = json.loads((folder / CONFIG_FILE).read_text())
    change(info)
    (folder / CONFIG_FILE).write_text(json.dumps(info))


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(data))


def other_tokenizer(size_delta):
    def damage(folder):
        text = load_documents("alice")[0][:20_000]
        save_tokenizer(train_tokenizer([text], 320 + size_delta), folder / TOKENIZER_FILE)
    return damage


def drop_a_tensor(folder):
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, folder / STATE_FILE)


def with_key(key, value):
    return lambda info: info["model"].__setitem__(key, value)


# name: (command, how to damage a copy of a good checkpoint, words the error line must contain)
CASES = {
    "folder_missing": ("eval", "remove", ["not found", "train one with: gpt train --out"]),
    "not_a_checkpoint_folder": ("generate", lambda f: (f / CONFIG_FILE).unlink(), ["not a checkpoint folder"]),
    "weights_missing": ("eval", lambda f: (f / WEIGHTS_FILE).unlink(), ["no weights yet", "resume"]),
    "tokenizer_missing": ("generate", lambda f: (f / TOKENIZER_FILE).unlink(), ["tokenizer file", "incomplete"]),
    "weights_truncated": ("eval", lambda f: cut_in_half(f / WEIGHTS_FILE), ["cannot be read", "damaged"]),
    "weights_empty": ("generate", lambda f: (f / WEIGHTS_FILE).write_bytes(b""), ["damaged"]),
    "weights_header_corrupted": ("eval", lambda f: flip_header(f / WEIGHTS_FILE), ["damaged"]),
    "weights_replaced_by_text": ("generate", lambda f: (f / WEIGHTS_FILE).write_text("not weights\n" * 9),
                                 ["damaged"]),
    "weights_of_another_shape": ("eval", lambda f: edit_config(f, with_key("num_layers", 3)),
                                 ["does not fit the model"]),
    "newer_format_version": ("eval", lambda f: edit_config(f, lambda i: i.__setitem__("format_version", 99)),
                             ["format version 99", "upgrade"]),
    "no_format_version": ("generate", lambda f: edit_config(f, lambda i: i.pop("format_version")),
                          ["format version None", "not made by gpt train"]),
    "config_not_json": ("eval", lambda f: (f / CONFIG_FILE).write_text("{\"model\": "), ["not valid JSON"]),
    "config_wrong_type": ("generate", lambda f: edit_config(f, with_key("num_layers", "two")),
                          ["config.json is damaged", "model.num_layers must be a int"]),
    "config_of_an_absurd_size": ("generate", lambda f: edit_config(f, with_key("num_layers", 10**6)),
                                 ["of memory to load", "~101", "its network", "use a machine with more memory"]),
    "config_unknown_key": ("eval", lambda f: edit_config(f, with_key("n_layer", 2)), ["unknown key model.n_layer"]),
    "config_without_model": ("eval", lambda f: edit_config(f, lambda i: i.pop("model")), ["section is missing"]),
    "tokenizer_of_another_size": ("generate", other_tokenizer(+16), ["has 336 tokens", "expects 320"]),
    "tokenizer_of_another_run": ("eval", other_tokenizer(0), ["not the tokenizer these weights", "put back"]),
    "tokenizer_not_json": ("generate", lambda f: (f / TOKENIZER_FILE).write_text("[1, 2"), ["cannot be read"]),
    "state_truncated": ("resume", lambda f: cut_in_half(f / STATE_FILE), ["training_state.pt cannot be read",
                                                                          "without --resume"]),
    "state_missing": ("resume", lambda f: (f / STATE_FILE).unlink(), ["no training state"]),
    "state_of_another_model": ("resume", drop_a_tensor, ["does not fit the model", "without --resume"]),
    "state_not_a_state": ("resume", lambda f: torch.save({"step": 3}, f / STATE_FILE), ["lacks parts"]),
}
COMMANDS = {
    "eval": ["eval", "--checkpoint", "{f}"],
    "generate": ["generate", "--checkpoint", "{f}", "Alice", "--max-new-tokens", "5"],
    "resume": ["train", "--resume", "--out", "{f}", "--max-steps", "70", "--quiet"],
}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("bad_checkpoints")
    commands = {}
    for name, (command, damage, _) in CASES.items():
        folder = root / name
        if damage != "remove":
            shutil.copytree(tiny_run, folder)
            damage(folder)
        commands[name] = [a.format(f=folder) for a in COMMANDS[command]]
    before = fingerprint(root)
    return root, before, gpt_many(commands, real="folder_missing"), fingerprint(root)


@pytest.mark.parametrize("name", CASES)
def test_bad_checkpoint_fails_cleanly_and_touches_nothing(outcome, name):
    root, before, results, after = outcome
    assert_one_clear_line(results[name], *CASES[name][2])
    assert {k: v for k, v in after.items() if k.startswith(str(root / name) + "/")} == {
        k: v for k, v in before.items() if k.startswith(str(root / name) + "/")}
