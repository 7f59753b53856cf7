"""How the extension is found or built."""

from __future__ import annotations

import os
import shutil
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


def test_setup_py_takes_its_sources_and_flags_from_the_extension_module():
    """One list of sources, in growop/_extension.py, for both builds: setup.py names no
    source, folder or flag of its own (its extension's sources are checked against the list
    in tests/test_cuda_compile.py)."""
    code = (ROOT / "setup.py").read_text().split('"""', 2)[2]  # past the docstring
    assert "_extension.sources(" in code and "_extension.CXX_FLAGS" in code
    for repeated in ('"csrc"', "*.cpp", "*.cu", "glob(", '"-O3"'):
        assert repeated not in code, repeated
    sources = _extension.cpu_sources()
    assert sources[0].parent.name == "ops" and all(path.is_file() for path in sources)


def test_every_source_file_is_built_and_new_ones_need_no_edit(tmp_path):
    """Each folder of csrc/ is compiled whole: a .cpp added to ops/, autograd/, cpu/ or
    python/ (a .cpp or .cu to cuda/) joins the build unasked, and no .cpp under csrc/ is left
    out of it."""
    csrc = ROOT / "csrc"
    built = set(_extension.sources(with_cuda=True))
    assert {*csrc.rglob("*.cpp"), *csrc.rglob("*.cu")} == built
    assert set(_extension.sources(with_cuda=False)) == built - set(_extension.cuda_sources())
    tree = tmp_path / "csrc"
    shutil.copytree(csrc, tree)
    new_cpu = [tree / folder / "new_op.cpp" for folder in _extension.CPU_SOURCE_DIRS]
    new_cuda = [tree / "cuda" / "new_op_cuda.cpp", tree / "cuda" / "new_op_kernel.cu"]
    for path in new_cpu + new_cuda:
        path.write_text("")
    cpu_build, cuda_build = set(_extension.sources(False, tree)), set(_extension.sources(True, tree))
    assert set(new_cpu) <= cpu_build and not set(new_cuda) & cpu_build
    assert set(new_cpu + new_cuda) <= cuda_build


def test_source_file_names_differ_across_folders():
    """torch's JIT build names each object after its source file (x.cpp -> x.o, x.cu ->
    x.cuda.o) in one folder: two sources of one name would collide ("multiple rules
    generate x.o"). A per-key file is named <op>_<folder>.cpp."""
    objects = {}
    for path in _extension.sources(with_cuda=True):
        name = path.stem + (".cuda.o" if path.suffix == ".cu" else ".o")
        assert name not in objects, f"{path} and {objects[name]} both compile to {name}"
        objects[name] = path


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
