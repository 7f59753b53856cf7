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


def test_sources_have_distinct_file_names():
    """The JIT build (torch.utils.cpp_extension.load) names each object file after its
    source's file name alone: two sources of one name in different folders collide."""
    names = [path.name for path in _extension.cpu_sources() + _extension.cuda_sources()]
    assert len(names) == len(set(names)), sorted(names)


def test_jit_build_works_without_the_prebuilt_module():
    result = run_python(
        "import torch, growop\n"
        "assert growop.ops.BUILD == 'jit', growop.ops.BUILD\n"
        "w0 = torch.randn(4, 3); a0 = torch.tensor([True, False, True, True])\n"
        "d = growop.ops._masked_linear_binding(torch.ones(2, 3), w0, None, a0, 4, None, 'auto', None)\n"
        "assert torch.equal(d, torch.ops.growop.masked_linear.default(torch.ones(2, 3), w0, None, a0, 4))\n"
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


def static_only_compiler(tmp_path: Path) -> Path:
    """A g++ that, like a toolchain built without a shared libstdc++, finds no libstdc++.so."""
    script = tmp_path / "g++-static-only"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-print-file-name=libstdc++.so" ]; then echo libstdc++.so; exit 0; fi\n'
        'exec g++ "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_a_compiler_without_shared_libstdcxx_is_refused_clearly(tmp_path):
    """Its extension would hold a private libstdc++ and crash on the first error message."""
    assert _extension.static_libstdcxx_problem("g++") is None
    assert _extension.static_libstdcxx_problem("no-such-compiler") is None  # the build says why
    fake = static_only_compiler(tmp_path)
    problem = _extension.static_libstdcxx_problem(str(fake))
    assert problem is not None and "has no shared libstdc++" in problem and "CXX=/usr/bin/g++" in problem

    jit = run_python("import growop", GROWOP_FORCE_JIT="1", CXX=str(fake))
    assert jit.returncode != 0 and "has no shared libstdc++" in jit.stderr, jit.stderr[-2000:]

    ahead = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")],
        capture_output=True, text=True, env={**os.environ, "CXX": str(fake), "GROWOP_BUILD_CUDA": "0"},
        cwd=ROOT, timeout=600,
    )
    assert ahead.returncode != 0 and "has no shared libstdc++" in ahead.stderr, ahead.stderr[-2000:]
    assert not list((tmp_path / "lib").rglob("*.so")), "nothing may be built"
