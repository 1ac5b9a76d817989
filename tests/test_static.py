"""Static checks that no CPU test would otherwise catch: an undefined name on a code path that only
runs on a GPU (the CUDA branch of the API, the tools) fails here, on any machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_clean():
    pytest.importorskip("pyflakes")
    result = subprocess.run([sys.executable, "-m", "pyflakes", "mxfp8_moe", "tools", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
