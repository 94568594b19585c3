"""Running the `gpt` command as a user does, and checking that a failure was a clean one.

A clean failure: exit status 2, exactly one line on stderr starting "gpt: error: " that names the
problem and the fix, no traceback, and every file the user had is byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch

from gpt.cli import main


def gpt(*args: str, cwd=None, timeout: float = 180, env: dict | None = None,
        launcher: str | None = None) -> subprocess.CompletedProcess:
    """`python -m gpt ARGS`; with a launcher, `python -c LAUNCHER ARGS` (it sets up a fault, then runs gpt)."""
    start = ["-c", launcher, *args] if launcher else ["-m", "gpt", *args]
    return subprocess.run([sys.executable, *start], capture_output=True, text=True, cwd=cwd,
                          env=env or os.environ, timeout=timeout)


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def gpt_in_process(*args: str) -> subprocess.CompletedProcess:
    """`gpt ARGS` through the command's entry point, `gpt.cli.main`, in this process: the same code without the
    3-4 s that a new process spends importing torch. What the process would print lands in stderr too: Python's
    warnings under its default filters (pytest would otherwise collect them) and a crash's traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng(), \
            warnings.catch_warnings():
        warnings.resetwarnings()
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        warnings.showwarning = print_warning
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["gpt", *args], code, out.getvalue(), err.getvalue())


def gpt_many(cases: dict[str, list[str]], real: str) -> dict[str, subprocess.CompletedProcess]:
    """Every command in this process (`gpt_in_process`); the case named `real` also as the installed command
    in a new process, which must exit and print the same: the link between the two ways of running."""
    results = {name: gpt_in_process(*argv) for name, argv in cases.items()}
    command, here = gpt(*cases[real]), results[real]
    assert (command.returncode, command.stderr) == (here.returncode, here.stderr), (command.stderr, here.stderr)
    return results


def fingerprint(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given files or folders (missing ones count as absent)."""
    found = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_one_clear_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one `gpt: error:` line containing every word, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
