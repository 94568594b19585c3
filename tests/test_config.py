"""Presets, TOML overrides, durations and validation of ModelConfig / TrainConfig."""

import dataclasses

import pytest

from gpt.config import (
    DEFAULT_PRESET,
    PRESETS,
    ModelConfig,
    TrainConfig,
    UsageError,
    apply_overrides,
    load_toml,
    parse_duration,
    preset,
)

# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["tiny", "small", "seed"])
def test_presets_exist_and_validate(name):
    model, train = preset(name)
    assert isinstance(model, ModelConfig)
    assert isinstance(train, TrainConfig)
    model.validate()
    train.validate()


def test_default_preset_is_listed():
    assert DEFAULT_PRESET in PRESETS


def test_preset_values_are_applied():
    model, train = preset("tiny")
    assert (model.sequence_len, model.num_layers, model.embed_dim, model.num_heads) == (32, 2, 32, 2)
    assert train.tokenizer_vocab_size == 320
    seed_model, seed_train = preset("seed")
    assert (seed_model.num_layers, seed_model.embed_dim, seed_model.num_heads) == (12, 768, 12)
    assert seed_train.max_time is None and seed_train.max_steps == 100_000


def test_preset_returns_fresh_objects():
    model, train = preset("tiny")
    model.embed_dim = 999
    train.batch_size = 999
    again_model, again_train = preset("tiny")
    assert again_model.embed_dim == 32
    assert again_train.batch_size == 8


def test_unknown_preset_names_the_choices():
    with pytest.raises(UsageError) as info:
        preset("huge")
    message = str(info.value)
    assert "huge" in message
    for name in ("tiny", "small", "seed"):
        assert name in message


# --------------------------------------------------------------------------------------------- overrides


def test_overrides_apply_known_keys():
    model, train = preset("small")
    apply_overrides(
        model,
        train,
        {"model": {"embed_dim": 64, "num_heads": 8, "arch": "gpt2"}, "train": {"batch_size": 4, "seed": 7}},
    )
    assert (model.embed_dim, model.num_heads, model.arch) == (64, 8, "gpt2")
    assert (train.batch_size, train.seed) == (4, 7)


def test_overrides_coerce_int_to_float():
    model, train = preset("small")
    apply_overrides(model, train, {"train": {"learning_rate": 1, "max_time": 60}, "model": {"dropout": 0}})
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float)
    assert train.max_time == 60.0 and isinstance(train.max_time, float)
    assert model.dropout == 0.0 and isinstance(model.dropout, float)


def test_overrides_none_for_optional_keys():
    model, train = preset("small")
    apply_overrides(model, train, {"train": {"max_time": "none", "max_steps": 100}})
    assert train.max_time is None
    assert train.max_steps == 100


def test_overrides_leave_other_keys_alone():
    model, train = preset("small")
    before_model, before_train = dataclasses.asdict(model), dataclasses.asdict(train)
    apply_overrides(model, train, {"train": {"batch_size": 3}})
    after_train = dataclasses.asdict(train)
    assert dataclasses.asdict(model) == before_model
    assert after_train.pop("batch_size") == 3
    before_train.pop("batch_size")
    assert after_train == before_train


def test_unknown_key_is_named():
    model, train = preset("small")
    with pytest.raises(UsageError) as info:
        apply_overrides(model, train, {"model": {"emb_dim": 64}})
    assert "model.emb_dim" in str(info.value)
    assert "embed_dim" in str(info.value)  # the known keys are listed


def test_unknown_train_key_is_named():
    model, train = preset("small")
    with pytest.raises(UsageError, match=r"train\.lr"):
        apply_overrides(model, train, {"train": {"lr": 0.1}})


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("model", "embed_dim", "big"),
        ("model", "embed_dim", 64.5),
        ("model", "num_layers", True),
        ("model", "arch", 2),
        ("train", "learning_rate", "fast"),
        ("train", "learning_rate", True),
        ("train", "batch_size", [1, 2]),
        ("train", "device", 0),
    ],
)
def test_wrong_type_is_named(section, key, value):
    model, train = preset("small")
    with pytest.raises(UsageError) as info:
        apply_overrides(model, train, {section: {key: value}})
    assert f"{section}.{key}" in str(info.value)
    assert repr(value) in str(info.value)


def test_none_for_required_key_is_rejected():
    model, train = preset("small")
    with pytest.raises(UsageError, match=r"model\.embed_dim"):
        apply_overrides(model, train, {"model": {"embed_dim": None}})


@pytest.mark.parametrize("overrides", [{"optimizer": {"lr": 1}}, {"model": 3}, {"train": "fast"}])
def test_unknown_section(overrides):
    model, train = preset("small")
    with pytest.raises(UsageError, match=r"section"):
        apply_overrides(model, train, overrides)


def test_unknown_section_is_named():
    model, train = preset("small")
    with pytest.raises(UsageError) as info:
        apply_overrides(model, train, {"optimizer": {"lr": 1}})
    assert "optimizer" in str(info.value)


# --------------------------------------------------------------------------------------------------- toml


def test_load_toml_then_apply(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nembed_dim = 64\narch = "gpt2"\n\n[train]\nlearning_rate = 1\nmax_steps = 5\n')
    data = load_toml(path)
    assert data == {"model": {"embed_dim": 64, "arch": "gpt2"}, "train": {"learning_rate": 1, "max_steps": 5}}
    model, train = preset("small")
    apply_overrides(model, train, data)
    assert model.embed_dim == 64 and model.arch == "gpt2"
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float)
    assert train.max_steps == 5


def test_load_toml_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(UsageError) as info:
        load_toml(missing)
    assert "nope.toml" in str(info.value)


def test_load_toml_on_a_folder(tmp_path):
    with pytest.raises(UsageError):
        load_toml(tmp_path)


@pytest.mark.parametrize("content", ["[model\nembed_dim = 64\n", "embed_dim = = 3\n", "[model]\nx = 'unterminated\n"])
def test_load_toml_invalid(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UsageError) as info:
        load_toml(path)
    assert "bad.toml" in str(info.value)
    assert "TOML" in str(info.value)


def test_load_toml_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[model]\narch = '\xe9'\n")
    with pytest.raises(UsageError):
        load_toml(path)


# ---------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("45", 45.0),
        ("1.5m", 90.0),
        ("10min", 600.0),
        ("5sec", 5.0),
        ("1hr", 3600.0),
        (" 20 s ", 20.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5s", "5ms", "s", "1h30m", "0s", "0", "0.0m"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_parse_duration_message_names_the_text():
    with pytest.raises(UsageError, match="ten minutes"):
        parse_duration("ten minutes")


# ---------------------------------------------------------------------------------------- ModelConfig


def test_model_defaults_validate():
    ModelConfig().validate()


def test_embed_dim_must_divide_by_heads():
    with pytest.raises(UsageError) as info:
        ModelConfig(embed_dim=30, num_heads=4).validate()
    assert "embed_dim" in str(info.value) and "num_heads" in str(info.value)


@pytest.mark.parametrize(
    "name", ["vocab_size", "sequence_len", "num_layers", "embed_dim", "num_heads", "forward_expansion"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_model_sizes_must_be_positive(name, value):
    config = ModelConfig(**{name: value})
    with pytest.raises(UsageError, match=f"model.{name}"):
        config.validate()


@pytest.mark.parametrize("arch", ["gpt3", "", "GPT1"])
def test_model_bad_arch(arch):
    with pytest.raises(UsageError, match="arch"):
        ModelConfig(arch=arch).validate()


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_model_good_arch(arch):
    ModelConfig(arch=arch).validate()


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_model_bad_dropout(dropout):
    with pytest.raises(UsageError, match="dropout"):
        ModelConfig(dropout=dropout).validate()


# ---------------------------------------------------------------------------------------- TrainConfig


def test_train_defaults_validate():
    TrainConfig().validate()


def test_train_needs_an_end():
    with pytest.raises(UsageError, match="max-steps"):
        TrainConfig(max_steps=None, max_time=None).validate()


def test_train_either_end_is_enough():
    TrainConfig(max_steps=10, max_time=None).validate()
    TrainConfig(max_steps=None, max_time=5.0).validate()


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"max_steps": 0}, "max-steps"),
        ({"max_steps": -3}, "max-steps"),
        ({"max_time": 0.0}, "max-time"),
        ({"max_time": -1.0}, "max-time"),
        ({"batch_size": 0}, "batch_size"),
        ({"tokenizer_vocab_size": 0}, "tokenizer_vocab_size"),
        ({"tokenizer_vocab_size": 257}, "258"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"dtype": "float16"}, "dtype"),
        ({"eval_interval": 0}, "eval_interval"),
        ({"log_interval": 0}, "log_interval"),
        ({"checkpoint_interval": -1}, "checkpoint_interval"),
        ({"bpe_dropout": 1.0}, "bpe_dropout"),
        ({"bpe_dropout": -0.1}, "bpe_dropout"),
        ({"bpe_copies": 0}, "bpe_copies"),
    ],
)
def test_train_rejects(changes, needle):
    with pytest.raises(UsageError, match=needle):
        TrainConfig(**changes).validate()


def test_train_smallest_vocab_is_accepted():
    TrainConfig(tokenizer_vocab_size=258).validate()
