"""gpt.preflight's estimates: the closed-form parameter count against a built model, the printed memory
estimate against the peak resident memory that a real training run, in its own process, reaches, and the disk
estimate against the files a run writes; runs and `gpt prepare` on a disk too small for them (a real tmpfs, in a
user namespace of its own) are refused before they write anything."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_helpers import assert_one_clear_line, gpt_in_process

from gpt.checkpoint import MEMORY_FILE, STATE_FILE, WEIGHTS_FILE, load_checkpoint
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.preflight import parameters, run_files


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_parameter_count_is_the_built_models(arch):
    config = ModelConfig(vocab_size=300, sequence_len=16, num_layers=3, embed_dim=24, num_heads=2, arch=arch)
    assert parameters(config, 300) == GPT(config=config).num_params(non_embedding=False)


def peak_of_run(tmp_path, name: str, toml: str) -> tuple[float, float]:
    """(estimated GB from the run's first line, the run's peak RSS in GB): a new process per run, so the
    children's peak (ru_maxrss) is this run's alone."""
    (tmp_path / f"{name}.toml").write_text(toml)
    code = (f"import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'gpt', 'train', "
            f"'--preset', 'tiny', '--config', {str(tmp_path / name)!r} + '.toml', '--max-steps', '3', '--out', "
            f"{str(tmp_path / name)!r}], capture_output=True, text=True); print(r.stderr); "
            "print('peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    estimate = float(re.search(r"~([\d.]+) GB estimated", out).group(1))
    return estimate, int(re.search(r"peak (\d+)", out).group(1)) * 1024 / 1e9


@pytest.mark.parametrize("name, toml", [
    ("tiny", "[train]\nbatch_size = 8\n"),
    ("wider", "[model]\nembed_dim = 384\nnum_heads = 4\nnum_layers = 4\n[train]\nbatch_size = 32\n"),
    ("memory", "[model]\nmemory_weight = 0.3\n[train]\nbatch_size = 8\n"),  # the memory's peak at the end
    ("bf16 activations", "[model]\nembed_dim = 256\nnum_heads = 4\nnum_layers = 4\nsequence_len = 256\n"
                         "[train]\nbatch_size = 32\ndtype = \"bfloat16\"\n"),  # fp32's activations: 42% over
])
def test_estimate_is_within_30_percent_of_the_peak(tmp_path, name, toml):
    estimate, peak = peak_of_run(tmp_path, name, toml)
    print(f"{name}: estimated {estimate} GB, peak RSS {peak:.3f} GB")
    assert abs(estimate - peak) <= 0.3 * peak, (estimate, peak)


def test_disk_estimate_matches_the_files_a_run_writes(tmp_path):
    """Each file within 10% of its estimate: a tiny run with a memory of the training text."""
    (tmp_path / "memory.toml").write_text("[model]\nmemory_weight = 0.3\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--config",
                           str(tmp_path / "memory.toml"), "--max-steps", "3", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = load_checkpoint(out)
    plain = len(checkpoint.memory.text)
    token_bytes = sum(path.stat().st_size for path in (out / "data").glob("*.bin"))
    estimate = run_files(checkpoint.model_config, checkpoint.train_config, plain, token_bytes)
    written = {"the training state": STATE_FILE, "the weights": WEIGHTS_FILE,
               "the memory of the training text": MEMORY_FILE}
    for part, name in written.items():
        size = (out / name).stat().st_size
        print(f"{part}: estimated {estimate[part]:,} bytes, written {size:,}")
        assert abs(estimate[part] - size) <= 0.1 * size, (part, estimate[part], size)


def on_small_disk(size: str, command: str) -> subprocess.CompletedProcess:
    """`command` (a shell line) run where /mnt of a private mount namespace is a tmpfs of `size`."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /mnt && {command}"],
                          capture_output=True, text=True, timeout=300)


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return on_small_disk("1m", "true").returncode == 0


small_disk = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm and tmpfs (user namespaces)")


@small_disk
def test_a_run_too_big_for_its_disk_is_refused_before_it_writes():
    """The tiny preset writes ~1.2 MB (state, weights, token data, and the state again while it is replaced)."""
    result = on_small_disk("1m", f"{sys.executable} -m gpt train --preset tiny --max-steps 5 --out /mnt/run; "
                                 "rc=$?; ls -A /mnt; exit $rc")
    line = assert_one_clear_line(result, "/mnt/run", "free", "choose another folder")
    assert re.search(r"needs ~1\.\d MB .* only 1\.0 MB is free", line), line
    assert result.stdout == ""  # the folder was not even created


@small_disk
def test_the_same_run_fits_a_disk_of_its_size():
    result = on_small_disk("3m", f"{sys.executable} -m gpt train --preset tiny --max-steps 5 --quiet --out /mnt/run "
                                 "&& ls /mnt/run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.safetensors" in result.stdout


@small_disk
def test_prepare_too_big_for_its_disk_is_refused_before_it_writes(tmp_path, alice_text):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for copy in range(12):  # ~1.2 MB of token shards at the default vocabulary
        (corpus / f"part{copy}.txt").write_text(alice_text)
    result = on_small_disk("1m", f"{sys.executable} -m gpt prepare --data {corpus} --out /mnt/data; "
                                 "rc=$?; ls -A /mnt; exit $rc")
    assert_one_clear_line(result, "gpt prepare needs", "/mnt/data", "only 1.0 MB is free")
    assert result.stdout == ""


def test_a_memory_too_big_for_ram_is_refused_and_can_be_left_out(tiny_run, tmp_path):
    """A memory file of 60 GB (sparse: nothing is read before the check) against this machine's RAM."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder)
    info = json.loads((folder / "config.json").read_text())
    info["model"]["memory_weight"] = 0.3
    (folder / "config.json").write_text(json.dumps(info))
    with open(folder / MEMORY_FILE, "wb") as handle:
        handle.truncate(60 * 2**30)
    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") > 3 * 60 * 2**30:
        pytest.skip("this machine has the RAM for it")
    assert_one_clear_line(gpt_in_process("eval", "--checkpoint", str(folder)), "of memory to load",
                          "its memory of the training text ~193", "--no-memory")
    alone = gpt_in_process("eval", "--checkpoint", str(folder), "--no-memory")
    assert alone.returncode == 0, alone.stderr


def test_import_of_an_absurd_size_is_refused_before_loading(tiny_run, tmp_path):
    pytest.importorskip("transformers")
    from gpt.hf import export_checkpoint

    exported = export_checkpoint(tiny_run, tmp_path / "hf")
    info = json.loads((exported / "config.json").read_text())
    layers = "n_layer" if "n_layer" in info else "num_hidden_layers"
    info[layers] = 10**6
    (exported / "config.json").write_text(json.dumps(info))
    result = gpt_in_process("import", "--from", str(exported), "--out", str(tmp_path / "imported"))
    assert_one_clear_line(result, "of memory to load", "its network")
    assert not (tmp_path / "imported").exists()
