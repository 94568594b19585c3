"""A checkpoint is a folder that needs nothing else to load:

  config.json         model and training config, tokenizer info, data source, versions
  model.safetensors   the weights to use (during training: the best by validation loss)
  tokenizer.json      the byte-level BPE
  training_state.pt   the latest weights, optimizer, step, elapsed time and RNG state, for --resume
  memory.safetensors  the training text's memory (gpt.memory): hidden-state keys, next tokens and the plain
                      training tokens, built at the end of a run for the saved weights

Each file is written to a temporary name and renamed over the old one, so a crash mid-save
leaves the previous version intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from gpt.config import ModelConfig, TrainConfig, UsageError, apply_overrides, first_line
from gpt.memory import Memory
from gpt.model import GPT
from gpt.predictor import Predictor
from gpt.preflight import check_loading
from gpt.tokenizer import load_tokenizer, tokenizer_info

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, STATE_FILE, MEMORY_FILE = (
    "config.json", "model.safetensors", "tokenizer.json", "training_state.pt", "memory.safetensors",
)
STATE_KEYS = {"model", "optimizer", "step", "elapsed", "best_val_loss", "rng"}


def package_version() -> str:
    try:
        return version("wonderland-gpt")
    except PackageNotFoundError:
        return "unknown"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(temporary_path)`, flush to disk, then rename into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def save_config(
    folder: Path, model_config: ModelConfig, train_config: TrainConfig, tokenizer: Tokenizer, data: str,
    extra: dict | None = None,
) -> None:
    """`extra` records where the weights came from (e.g. imported_from, init_from)."""
    info = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "tokenizer": tokenizer_info(tokenizer),
        "data": data,
        "versions": {"wonderland-gpt": package_version(), "torch": torch.__version__},
        **(extra or {}),
    }
    write_text(folder / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
    write_text(folder / TOKENIZER_FILE, tokenizer.to_str(pretty=True))


def save_weights(folder: Path, weights: GPT | dict, metadata: dict[str, str] | None = None) -> None:
    """Weights of a model, or a state dict (what a multi-process run gathers), as safetensors."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=metadata or {}))


def save_training_state(folder: Path, state: dict) -> None:
    atomic_write(folder / STATE_FILE, lambda p: torch.save(state, p))


@dataclass
class Checkpoint:
    model: GPT  # the network alone
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_config: TrainConfig
    info: dict
    memory: Memory | None = None  # the training text's memory, when the checkpoint has one for these weights

    @property
    def predictor(self) -> Predictor:
        """The network with its memory, as it stands now: set `memory` to None first for the network alone."""
        return Predictor(self.model, self.memory)


# fields of checkpoints saved by earlier versions that no longer change anything (the temperature that the
# validation split now picks: train.tune_memory_temperature)
RETIRED_TRAIN_KEYS = ("soup_memory_temperature",)


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"checkpoint folder {folder} not found; train one with: gpt train --out {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: {folder} is not a checkpoint folder (made by gpt train)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    found = info.get("format_version")
    if found is None and "model_type" in info:
        raise UsageError(f"{folder} is a transformers model folder ({info['model_type']}), not a gpt checkpoint: "
                         f"convert it first with gpt import --from {folder} --out FOLDER")
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT_VERSION:
        raise UsageError(f"{path} has format version {found}, newer than this wonderland-gpt reads "
                         f"({FORMAT_VERSION}); upgrade it: pip install -U wonderland-gpt")
    if found != FORMAT_VERSION or isinstance(found, bool):
        raise UsageError(f"{path} has format version {found!r}, not {FORMAT_VERSION}; the checkpoint is damaged "
                         "or not made by gpt train")
    return info


def configs_from(info: dict, path: Path) -> tuple[ModelConfig, TrainConfig]:
    """The saved configs, checked key by key and type by type like a --config file."""
    model_config, train_config = ModelConfig(), TrainConfig()
    try:
        if not isinstance(info.get("model"), dict) or not isinstance(info.get("train"), dict):
            raise UsageError("the model or train section is missing")
        model_section = {"activation": "gelu_tanh", **info["model"]}  # saved before the field existed: tanh
        train_section = {key: value for key, value in info["train"].items() if key not in RETIRED_TRAIN_KEYS}
        apply_overrides(model_config, train_config, {"model": model_section, "train": train_section})
        model_config.validate()
        train_config.validate()
    except UsageError as err:
        raise UsageError(f"{path / CONFIG_FILE} is damaged ({err}); re-create the checkpoint with gpt train") from None
    return model_config, train_config


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", memory: bool = True) -> Checkpoint:
    """Network (in eval mode), its memory (unless `memory` is False), tokenizer and configs from a checkpoint
    folder; refused before anything is built when it cannot fit in RAM (gpt.preflight)."""
    folder = Path(folder)
    info = read_config(folder)
    model_config, train_config = configs_from(info, folder)
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    check_tokenizer(tokenizer, model_config, info, folder)
    memory_path = folder / MEMORY_FILE
    memory = memory and model_config.memory_weight > 0 and memory_path.is_file()
    check_loading(model_config, memory_path.stat().st_size if memory else 0, folder)
    model = GPT(config=model_config)
    load_weights(model, folder / WEIGHTS_FILE)
    model.to(device).eval()
    memory = load_memory(folder, model_config, weights_step(folder / WEIGHTS_FILE), device) if memory else None
    return Checkpoint(model, tokenizer, model_config, train_config, info, memory)


def check_tokenizer(tokenizer: Tokenizer, model_config: ModelConfig, info: dict, folder: Path) -> None:
    """The tokenizer must be the one the weights learned: same size and, where recorded, same merges."""
    path = folder / TOKENIZER_FILE
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise UsageError(f"{path} has {tokenizer.get_vocab_size()} tokens but the model expects "
                         f"{model_config.vocab_size}; the tokenizer belongs to another checkpoint: put back this "
                         "run's tokenizer.json")
    recorded = info.get("tokenizer", {}).get("sha256_of_json") if isinstance(info.get("tokenizer"), dict) else None
    if recorded is not None and recorded != tokenizer_info(tokenizer)["sha256_of_json"]:
        raise UsageError(f"{path} is not the tokenizer these weights were trained with (its fingerprint differs "
                         f"from {CONFIG_FILE}'s); put back this run's tokenizer.json")


def load_weights(model: GPT, path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"{path} not found; the checkpoint has no weights yet (train longer or resume)")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise UsageError(f"{path} cannot be read ({err}); the file is damaged") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UsageError(f"{path} does not fit the model in config.json ({first})") from None


def load_training_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UsageError(f"no training state in {folder} to resume from; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path} cannot be read ({first}); the training state is damaged: train again "
                         "without --resume") from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise UsageError(f"{path} lacks parts of a training state; it is damaged: train again without --resume")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Drop half-written files that a killed run left behind (see atomic_write); a live writer's are kept."""
    for path in Path(folder).glob(".*.tmp*"):
        pid = path.name.rpartition(".tmp")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def weights_step(path: Path) -> str | None:
    """The training step recorded in a weights file: what a memory must have been built from."""
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("step")


def save_memory(folder: Path, memory: Memory, step: str | None) -> None:
    tensors = {"keys": memory.keys.half().contiguous().cpu(), "values": memory.values.int().contiguous().cpu(),
               "text": memory.text.int().contiguous()}
    if memory.axes is not None:  # the keys are projections: the queries need the same center and directions
        tensors["center"], tensors["directions"] = (axis.contiguous().cpu() for axis in memory.axes)
    atomic_write(Path(folder) / MEMORY_FILE, lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))


def load_memory(folder: Path, config: ModelConfig, step: str | None, device: str | torch.device = "cpu",
                ) -> Memory | None:
    """The checkpoint's memory; None when the config turns it off, or the file is missing or was built for
    other weights than the saved ones (a run stopped early: it is built when a run ends)."""
    path = Path(folder) / MEMORY_FILE
    if config.memory_weight <= 0 or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("step") != str(step):
                return None
            keys, values = handle.get_tensor("keys"), handle.get_tensor("values")
            text = handle.get_tensor("text") if "text" in handle.keys() else torch.zeros(0, dtype=torch.int32)
            axes = tuple(handle.get_tensor(name) for name in ("center", "directions")) \
                if "directions" in handle.keys() else None  # none in memories of older versions: whole states
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise UsageError(f"{path} cannot be read ({first_line(err)}); delete it to use the network alone") from None
    dim = config.embed_dim if axes is None else keys.size(-1)
    if axes is not None and (axes[0].shape != (config.embed_dim,) or axes[1].shape != (config.embed_dim, dim)):
        raise UsageError(f"{path} does not fit the model in {CONFIG_FILE}; delete it to use the network alone")
    if keys.ndim != 2 or keys.size(1) != dim or values.shape != keys.shape[:1] or any(
            len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < config.vocab_size for ids in (values, text)):
        raise UsageError(f"{path} does not fit the model in {CONFIG_FILE}; delete it to use the network alone")
    if config.memory_ngram_weight > 0 and not len(text):
        raise UsageError(f"{path} was built without the training tokens that model.memory_ngram_weight needs (an "
                         "older version): train again, or set the weight to 0")
    return Memory(keys, values, text.long(), config, device, axes)
