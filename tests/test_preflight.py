"""gpt.preflight's memory estimate: the closed-form parameter count against a built model, and the printed
estimate against the peak resident memory that a real training run, in its own process, reaches."""

import re
import subprocess
import sys

import pytest

from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.preflight import parameters


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
])
def test_estimate_is_within_30_percent_of_the_peak(tmp_path, name, toml):
    estimate, peak = peak_of_run(tmp_path, name, toml)
    print(f"{name}: estimated {estimate} GB, peak RSS {peak:.3f} GB")
    assert abs(estimate - peak) <= 0.3 * peak, (estimate, peak)
