"""ruff, with the repository's ruff.toml (line length 100), over every Python file in it."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    exit_code, output = result.returncode, result.stdout + result.stderr
    assert exit_code == 0, f"ruff check found problems:\n{output}"
