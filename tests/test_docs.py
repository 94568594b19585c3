"""Every command that README.md and docs/ show runs as shown (issue 27): each page's shell lines and Python blocks
in page order, in a fresh folder. `gpt train` lines get a tiny model's sizes and a few steps added after what the
page shows (`--config`, `--max-steps`: the flags given last win); everything else runs exactly as written."""

import io
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import gpt_in_process

from gpt.config import ModelConfig, TrainConfig, apply_overrides, load_toml

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md"))]
SCALE = """[model]
sequence_len = 64
num_layers = 2
embed_dim = 32
num_heads = 2
memory_weight = 0.0
memory_ngram_weight = 0.0
[train]
tokenizer_vocab_size = 320
batch_size = 8
bpe_copies = 1
warmup_steps = 5
eval_interval = 10
"""
# what runs elsewhere: installing (.ci/run does it as the README says), the tests themselves, several processes
RUN_ELSEWHERE = {"pip": ".ci/run", "python -m venv": ".ci/run", "python -m pytest": ".ci/run",
                 "torchrun": "tests/test_distributed.py", "python benchmarks/": "benchmarks/"}


def blocks(page: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of a page, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), re.S)


def shell_lines(body: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuations joined, comments and `...` placeholders dropped."""
    lines = (shlex.split(line, comments=True) for line in body.replace("\\\n", " ").splitlines())
    return [[word for word in line if word != "..."] for line in lines if line]


def runs_elsewhere(argv: list[str]) -> bool:
    return any(" ".join(argv).startswith(start) for start in RUN_ELSEWHERE)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """runs/small as the pages' `gpt train` makes it here: the default preset at SCALE's sizes, 10 steps."""
    from gpt.config import preset
    from gpt.train import train

    scale = tmp_path_factory.mktemp("scale") / "scale.toml"
    scale.write_text(SCALE)
    model_config, train_config = preset("small")
    apply_overrides(model_config, train_config, load_toml(scale))
    train_config.max_steps, train_config.max_time = 10, None
    out = scale.parent / "small"
    train(model_config, train_config, out, show_progress=False)
    return out


@pytest.fixture
def folder(tmp_path, monkeypatch, alice_text):
    """A user's folder, with their own texts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scale.toml").write_text(SCALE)
    (tmp_path / "my_book.txt").write_text(alice_text[:20_000], encoding="utf-8")
    (tmp_path / "other.txt").write_text(alice_text[-5_000:], encoding="utf-8")
    for name in ("folder_of_txt_files", "corpus"):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"part{i}.txt").write_text(alice_text[i * 10_000 : (i + 1) * 10_000], encoding="utf-8")
    return tmp_path


def ensure_small(folder: Path, small_run: Path) -> None:
    """runs/small, where a page uses one it did not train."""
    if not (folder / "runs" / "small").exists():
        shutil.copytree(small_run, folder / "runs" / "small")


def run_gpt(argv: list[str], folder: Path, small_run: Path, monkeypatch) -> None:
    if "runs/small" in argv and argv[1] != "train":
        ensure_small(folder, small_run)
    if argv[1] == "train":
        argv = [*argv, "--config", "scale.toml", "--max-steps", "20" if "--resume" in argv else "10"]
    if "--interactive" in argv:
        monkeypatch.setattr(sys, "stdin", io.StringIO("Alice was\n"))
    result = gpt_in_process(*argv[1:])
    assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p != "docs/serving.md"
                                  and any(lang in ("bash", "python") for lang, _ in blocks(p))])
def test_every_command_of_a_page_runs_as_shown(page, folder, small_run, monkeypatch, capsys):
    namespace: dict = {}
    for lang, body in blocks(page):
        if lang == "python":
            if "runs/small" in body:
                ensure_small(folder, small_run)
            exec(compile(body, page, "exec"), namespace)
        elif lang == "bash":
            for argv in shell_lines(body):
                assert runs_elsewhere(argv) or argv[0] == "gpt", f"{page}: a command no test runs: {argv}"
                if argv[0] == "gpt":
                    run_gpt(argv, folder, small_run, monkeypatch)
    assert capsys.readouterr().out.strip() or not any(lang == "python" for lang, _ in blocks(page))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_serving_page_runs_as_shown(folder, small_run, capsys):
    """`gpt serve` as shown (on a free port rather than 8000), then the page's curl and Python against it."""
    ensure_small(folder, small_run)
    port = free_port()
    server, namespace = None, {}
    try:
        for lang, body in blocks("docs/serving.md"):
            body = body.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if lang == "python":
                exec(compile(body, "docs/serving.md", "exec"), namespace)
                continue
            for argv in shell_lines(body):
                if argv[:2] == ["gpt", "serve"]:
                    server = subprocess.Popen([sys.executable, "-m", "gpt", *argv[1:], "--port", str(port)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    wait_for(f"http://127.0.0.1:{port}/health", server)
                elif argv[0] == "curl" and shutil.which("curl"):
                    reply = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                    assert reply.returncode == 0 and "data:" in reply.stdout, reply.stderr
                else:
                    assert runs_elsewhere(argv) or argv[0] == "curl", f"a command no test runs: {argv}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert capsys.readouterr().out.strip()


def wait_for(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer {url} in {timeout} s")


def test_the_configuration_pages_toml_is_accepted(tmp_path):
    """What `gpt train --config` reads from the page's TOML block (the runs above train with their own sizes)."""
    path = tmp_path / "page.toml"
    path.write_text(next(body for lang, body in blocks("docs/configuration.md") if lang == "toml"))
    model_config, train_config = ModelConfig(), TrainConfig()
    apply_overrides(model_config, train_config, load_toml(str(path)))
    assert model_config.arch == "gpt2" and model_config.num_layers == 6 and train_config.learning_rate == 2e-3
