"""How the extension is found or built.

The JIT build's tests share one build (the ``jit_build`` fixture): this checkout's, in torch's
extension cache, whose folder is keyed by the sources, so a later run with the same sources
reuses it. A copy of that folder in a root of the tests' own takes what a killed build leaves
behind; rebuilding it there finds every object up to date, so no test compiles again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import growop
from growop import _extension

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=timeout,
    )


def test_operators_are_registered():
    assert growop.ops.BUILD in ("prebuilt", "jit")
    for name in ("masked_linear", "masked_linear_backward"):
        assert hasattr(torch.ops.growop, name)


# ------------------------------------------------------------------------- source lists


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


def test_jit_build_folders_follow_what_decides_the_binary(tmp_path, monkeypatch):
    """Two checkouts with the same sources share a build folder; other sources (a header
    too), flags, CUDA or not, or another compiler make another folder, so two checkouts
    never rebuild over each other."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "root"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("CXX", raising=False)
    first, second = tmp_path / "a" / "csrc", tmp_path / "b" / "csrc"
    shutil.copytree(ROOT / "csrc", first)
    shutil.copytree(ROOT / "csrc", second)
    folder = _extension.jit_build_folder(False, first)
    assert folder.parent == tmp_path / "root" and folder.name.startswith("growop_C-")
    assert _extension.jit_build_folder(False, second) == folder
    (second / "README.md").write_text("not a source")
    assert _extension.jit_build_folder(False, second) == folder
    seen = {folder}

    def differs(what):
        key = _extension.jit_build_folder(what == "cuda", second)
        assert key not in seen, what
        seen.add(key)

    differs("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    differs("cuda")
    monkeypatch.setenv("CXX", "clang++")
    differs("compiler")
    monkeypatch.setattr(_extension, "CXX_FLAGS", ["-O2"])
    differs("flags")
    with open(second / "cpu" / "masked_linear.cpp", "a") as source:
        source.write("// edited\n")
    differs("a source")
    with open(second / "dense.h", "a") as header:
        header.write("// edited\n")
    differs("a header")
    (second / "ops" / "new_op.cpp").write_text("")
    differs("a new source")


# ---------------------------------------------------------------------------- JIT build

JIT_CHECK = (
    "import torch, growop\n"
    "assert growop.ops.BUILD == 'jit', growop.ops.BUILD\n"
    "w0 = torch.randn(4, 3); a0 = torch.tensor([True, False, True, True])\n"
    "d = growop.ops._masked_linear_binding(torch.ones(2, 3), w0, None, a0, 4, None, 'auto', None)\n"
    "assert torch.equal(d, torch.ops.growop.masked_linear.default(torch.ones(2, 3), w0, None, a0, 4))\n"
    "w = torch.randn(4, 3); a = torch.tensor([True, False, True, True])\n"
    "print(growop.masked_linear(torch.ones(2, 3), w, active=a).shape)"
)
# Seconds an import may take when it compiles nothing (torch's import included).
IMPORT_SECONDS = 180


@pytest.fixture(scope="module")
def jit_build(tmp_path_factory):
    """This checkout's JIT build in torch's extension cache (built if it is not there), and
    a copy of its folder in a root of the tests' own: (the first import's result, the copy)."""
    first = run_python(JIT_CHECK, GROWOP_FORCE_JIT="1")
    with_cuda = _extension.builds_cuda()
    with _extension._jit_cuda_archs() if with_cuda else contextlib.nullcontext():
        folder = _extension.jit_build_folder(with_cuda)
    copy = tmp_path_factory.mktemp("torch_extensions") / folder.name
    if first.returncode == 0:
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(_extension.TORCH_LOCK, _extension.JIT_LOCK))
    return first, copy


def import_in(copy: Path, timeout: float = IMPORT_SECONDS, **env: str) -> subprocess.CompletedProcess:
    return run_python(
        JIT_CHECK, timeout=timeout, GROWOP_FORCE_JIT="1", TORCH_EXTENSIONS_DIR=str(copy.parent), **env
    )


def test_jit_build_works_without_the_prebuilt_module(jit_build):
    first, _ = jit_build
    assert first.returncode == 0, first.stderr[-4000:]
    assert "torch.Size([2, 4])" in first.stdout


def test_the_jit_build_says_when_it_compiles_and_where_its_log_goes(jit_build):
    """One line on stderr when it builds, naming the folder and the log, which holds the
    build's output; nothing when it loads a finished build."""
    _, copy = jit_build
    (copy / _extension.JIT_DONE).unlink(missing_ok=True)  # as if the build had not finished
    building = import_in(copy)
    assert building.returncode == 0, building.stderr[-4000:]
    log = copy / _extension.JIT_LOG
    said = [line for line in building.stderr.splitlines() if line.startswith("growop: building growop's C++")]
    assert len(said) == 1, building.stderr
    assert "first import only" in said[0] and said[0].endswith(f", in {copy}; build log: {log}"), said
    # ninja's own output: its build lines, or "ninja: no work to do" where the copied
    # folder's objects are up to date.
    text = log.read_text()
    assert "ninja: no work to do" in text or "-o growop_C.so" in text, text[-2000:]
    assert "building" not in building.stdout and "torch.Size([2, 4])" in building.stdout
    loading = import_in(copy)
    assert loading.returncode == 0, loading.stderr[-4000:]
    assert "growop" not in loading.stderr, loading.stderr


def test_a_lock_file_left_by_a_killed_build_is_removed(jit_build):
    """torch waits for its lock file for as long as it exists, and a killed build leaves it:
    the import removes it (growop's own lock proves no build is running) and finishes."""
    _, copy = jit_build
    (copy / _extension.JIT_DONE).unlink(missing_ok=True)
    torch_lock = copy / _extension.TORCH_LOCK
    torch_lock.touch()
    result = import_in(copy)  # raises subprocess.TimeoutExpired if the import waits on
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"growop: removed {torch_lock}, left by a build that was killed" in result.stderr
    assert not torch_lock.exists() and (copy / _extension.JIT_DONE).is_file()


def test_a_failed_build_names_its_log_and_shows_its_end(tmp_path, monkeypatch):
    """The build's output (torch runs ninja on descriptor 1) goes to the log; a failure
    raises ImportError naming the log, with its last lines, and descriptor 1 is restored."""
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        os.write(1, b"masked_linear_cpu.cpp:1:1: error: something is wrong\n")
        raise RuntimeError("Error building extension 'growop_C'")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.delenv("GROWOP_VERBOSE_BUILD", raising=False)
    with pytest.raises(ImportError) as info:
        _extension._compile(tmp_path, with_cuda=False)
    log = tmp_path / _extension.JIT_LOG
    assert f"the build's output is in {log}; its last lines:" in str(info.value)
    assert str(info.value).endswith("masked_linear_cpu.cpp:1:1: error: something is wrong")
    assert not (tmp_path / _extension.JIT_DONE).exists()
    assert not os.path.samestat(os.fstat(1), log.stat())  # descriptor 1 is back


def test_without_a_lock_a_torch_lock_file_is_named_for_the_user(tmp_path):
    """Where growop cannot lock (no flock), it cannot tell a running build from a killed one:
    it names the file to delete instead of waiting on it."""
    _extension._clear_torch_lock(tmp_path, locked=False)  # no file: nothing to say
    (tmp_path / _extension.TORCH_LOCK).touch()
    expected = f"If no build is running, delete {tmp_path / 'lock'} and import growop again"
    with pytest.raises(ImportError, match=re.escape(expected)):
        _extension._clear_torch_lock(tmp_path, locked=False)
    assert (tmp_path / _extension.TORCH_LOCK).exists()


def lines_of(stream) -> queue.Queue:
    """The lines `stream` gives, as they come, on a queue (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, text: str, timeout: float) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=timeout)  # queue.Empty: a test failure, not a hang
        assert line is not None, f"the process ended without printing {text!r}: {seen}"
        seen.append(line)
        if text in line:
            return seen


def test_an_import_says_whom_it_waits_for_and_goes_on_when_that_build_dies(jit_build):
    """While another process holds growop's build lock the import says which one it waits
    for; when that process dies (the kernel drops its lock) the import removes the torch lock
    file it left and finishes."""
    _, copy = jit_build
    (copy / _extension.JIT_DONE).unlink(missing_ok=True)
    (copy / _extension.TORCH_LOCK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(copy / _extension.JIT_LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    importer = None
    try:
        wait_for_line(lines_of(holder.stdout), "locked", timeout=60)
        importer = subprocess.Popen(
            [sys.executable, "-c", JIT_CHECK], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "GROWOP_FORCE_JIT": "1", "TORCH_EXTENSIONS_DIR": str(copy.parent)},
        )
        stderr = lines_of(importer.stderr)
        wait_for_line(stderr, f"growop: waiting for process {holder.pid}, which is building", IMPORT_SECONDS)
        assert importer.poll() is None
        holder.kill()
        holder.wait()
        assert importer.wait(timeout=IMPORT_SECONDS) == 0
        wait_for_line(stderr, "left by a build that was killed", timeout=10)
        assert "torch.Size([2, 4])" in importer.stdout.read()
    finally:
        for process in (holder, importer):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


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
