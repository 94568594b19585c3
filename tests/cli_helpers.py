"""Running the `gpt` command as a user does, and checking that a failure was a clean one.

A clean failure: exit status 2, exactly one line on stderr starting "gpt: error: " that names the
problem and the fix, no traceback, and every file the user had is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def gpt(*args: str, cwd=None, timeout: float = 180, env: dict | None = None,
        launcher: str | None = None) -> subprocess.CompletedProcess:
    """`python -m gpt ARGS`; with a launcher, `python -c LAUNCHER ARGS` (it sets up a fault, then runs gpt)."""
    start = ["-c", launcher, *args] if launcher else ["-m", "gpt", *args]
    return subprocess.run([sys.executable, *start], capture_output=True, text=True, cwd=cwd,
                          env=env or os.environ, timeout=timeout)


def gpt_many(cases: dict[str, list[str]], workers: int = 4) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands side by side: most of each one's time is Python and torch starting up."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(gpt, *argv) for name, argv in cases.items()}
        return {name: future.result() for name, future in futures.items()}


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
