"""How the extension is found or built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import growop
from growop import _extension

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=600,
    )


def test_operators_are_registered():
    assert growop.ops.BUILD in ("prebuilt", "jit")
    for name in ("masked_linear", "masked_linear_backward"):
        assert hasattr(torch.ops.growop, name)


def test_setup_py_builds_the_sources_the_jit_build_uses():
    setup_py = (ROOT / "setup.py").read_text()
    assert 'ROOT / "csrc" / "growop.cpp"' in setup_py and '"cpu").glob("*.cpp")' in setup_py
    sources = _extension.cpu_sources()
    assert sources[0].name == "growop.cpp" and all(path.is_file() for path in sources)


def test_jit_build_works_without_the_prebuilt_module():
    result = run_python(
        "import torch, growop\n"
        "assert growop.ops.BUILD == 'jit', growop.ops.BUILD\n"
        "w = torch.randn(4, 3); a = torch.tensor([True, False, True, True])\n"
        "print(growop.masked_linear(torch.ones(2, 3), w, active=a).shape)",
        GROWOP_FORCE_JIT="1",
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 4])" in result.stdout


def test_missing_compiler_gives_a_clear_message():
    result = run_python("import growop", GROWOP_FORCE_JIT="1", CXX="no-such-compiler")
    assert result.returncode != 0
    assert "needs a C++ compiler, and 'no-such-compiler' was not found" in result.stderr
