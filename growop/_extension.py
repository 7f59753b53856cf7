"""Loads the compiled operators: the ahead-of-time build if there is one, else a JIT build.

``setup.py`` builds ``growop._C``; importing it registers the ``torch.ops.growop`` operators.
Without it (a source checkout on ``PYTHONPATH``, or an install that skipped the build), the
same sources in ``csrc/`` are compiled once with :func:`torch.utils.cpp_extension.load`
(ninja) into a folder of torch's extension cache named by what decides the binary
(:func:`jit_build_folder`), and reused on later imports. Both builds take their source lists
and flags from here (:func:`sources`).

The JIT build says on stderr when it compiles and where its log goes. It holds a lock of its
own (``fcntl.flock``, which the kernel releases when its holder dies) around the build: a
process that finds the lock taken says whom it waits for, and one that takes it knows that a
lock file torch left in the folder belongs to a build that was killed, and removes it (torch
would wait for it forever).

The CUDA kernels (``csrc/cuda/``) are part of either build only when torch is a CUDA build and
an ``nvcc`` of the same CUDA major version is found (:func:`builds_cuda`; ``GROWOP_BUILD_CUDA=0``
or ``1`` overrides). They are compiled for ``TORCH_CUDA_ARCH_LIST``; unset, setup.py uses
:data:`DEFAULT_CUDA_ARCHS`, and the JIT build the GPUs it sees, or the same default without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"

# The folders of csrc/ whose .cpp files make the extension, each taken whole, so a new file
# there needs no edit here: op schemas and their typed calls, autograd, the CPU kernels, the
# Python module, and the kernels written once in ATen for every device (loss/). File names
# must differ across folders (hence masked_linear_cpu.cpp beside ops/masked_linear.cpp):
# torch's JIT build names each object file after its source's name.
CPU_SOURCE_DIRS = ("ops", "autograd", "cpu", "loss", "python")
# The CUDA kernels (.cu) and their torch glue (.cpp), in CUDA builds only.
CUDA_SOURCE_DIRS = ("cuda",)
# The compile flags of both builds.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]

# sm_80 and sm_90 machine code, and PTX that newer GPUs compile at load.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

# The JIT build's module name (TORCH_EXTENSION_NAME) and files in its folder.
JIT_NAME = "growop_C"
JIT_LOCK = "growop-build.lock"  # growop's own lock, taken with fcntl.flock
JIT_DONE = "growop-build.done"  # written when a build has finished
JIT_LOG = "build.log"
TORCH_LOCK = "lock"  # torch's lock file (torch.utils.file_baton), which records no owner
# What a JIT build's folder key reads under csrc/.
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def cpu_sources(csrc: Path = _CSRC) -> list[Path]:
    """C++ sources of the extension: every ``.cpp`` of :data:`CPU_SOURCE_DIRS`, in that order."""
    return [path for folder in CPU_SOURCE_DIRS for path in sorted((csrc / folder).glob("*.cpp"))]


def cuda_sources(csrc: Path = _CSRC) -> list[Path]:
    """CUDA sources: the torch glue (``.cpp``) and the kernels (``.cu``) of :data:`CUDA_SOURCE_DIRS`."""
    return [
        path
        for folder in CUDA_SOURCE_DIRS
        for pattern in ("*.cpp", "*.cu")
        for path in sorted((csrc / folder).glob(pattern))
    ]


def sources(with_cuda: bool, csrc: Path = _CSRC) -> list[Path]:
    """Every source a build compiles: setup.py's and the JIT build's one list."""
    return cpu_sources(csrc) + (cuda_sources(csrc) if with_cuda else [])


def builds_cuda() -> bool:
    """Whether a build here includes the CUDA kernels.

    ``GROWOP_BUILD_CUDA=1`` or ``0`` decides. Otherwise: when torch is a CUDA build, ``nvcc``
    is found (``torch.utils.cpp_extension.CUDA_HOME``) and its CUDA major version is torch's,
    which torch requires to build an extension; a mismatch warns and builds for the CPU only.
    """
    choice = os.environ.get("GROWOP_BUILD_CUDA", "")
    if choice in ("0", "1"):
        return choice == "1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    nvcc = _nvcc_major(cpp_extension.CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc != torch_major:
        warnings.warn(
            f"growop: building without the CUDA kernels: torch is built for CUDA {torch.version.cuda} "
            f"but the nvcc in {cpp_extension.CUDA_HOME} is CUDA {nvcc}. Point CUDA_HOME at a CUDA "
            f"{torch_major} toolkit, or set GROWOP_BUILD_CUDA=0 to silence this.",
            stacklevel=2,
        )
        return False
    return True


def _nvcc_major(cuda_home: str) -> int | None:
    try:
        version = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
            capture_output=True, text=True, timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", version)
    return int(match.group(1)) if match else None


def static_libstdcxx_problem(compiler: str) -> str | None:
    """Why `compiler` must not build growop, or ``None``.

    A C++ compiler with no shared libstdc++ (a toolchain built to link it statically) puts a
    private copy of libstdc++ into the extension. Its iostreams then meet the shared
    libstdc++ that torch loads, and formatting any error message inside the extension
    (``TORCH_CHECK``'s ``c10::str``) crashes the process. Asked of the compiler itself:
    ``-print-file-name=libstdc++.so`` answers a path where the shared library exists, and the
    bare name where it does not.
    """
    try:
        found = subprocess.run(
            [compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # cannot ask: the build itself will say what is wrong
    if not found or (os.path.isabs(found) and os.path.exists(found)):
        return None
    return (
        f"growop: the C++ compiler '{compiler}' has no shared libstdc++ "
        f"('{compiler} -print-file-name=libstdc++.so' prints '{found}'), so growop's extension "
        "would carry a private static copy of it, and any error raised inside it would crash "
        "the process next to torch's shared libstdc++. Build with a compiler that links "
        "libstdc++ as a shared library, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc."
    )


@contextlib.contextmanager
def _jit_cuda_archs():
    """Without TORCH_CUDA_ARCH_LIST, torch builds for the GPUs it sees, or for every
    architecture it knows when it sees none; this takes DEFAULT_CUDA_ARCHS for the latter."""
    import torch

    if "TORCH_CUDA_ARCH_LIST" in os.environ or torch.cuda.is_available():
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    try:
        yield
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _cuda_archs_built() -> str | list:
    """The architectures a CUDA JIT build compiles for (inside :func:`_jit_cuda_archs`):
    ``TORCH_CUDA_ARCH_LIST``, else the GPUs torch sees, as torch takes them."""
    import torch

    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def jit_build_folder(with_cuda: bool, csrc: Path = _CSRC) -> Path:
    """The folder of the JIT build of `csrc`: ``growop_C-<key>`` under torch's extension root
    (``TORCH_EXTENSIONS_DIR``, else :func:`torch.utils.cpp_extension.get_default_build_root`).

    The key is a digest of what decides the binary: every C++ and CUDA file under `csrc`
    (name and content), the flags, CUDA or not and for which architectures, the compiler
    (``CXX``), torch's and Python's versions. Checkouts with other sources never share a
    folder, so they never rebuild over each other; identical sources share one build. For a
    CUDA build, call it inside :func:`_jit_cuda_archs`.
    """
    import torch
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(csrc).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    decides = {
        "cxx_flags": CXX_FLAGS,
        "cuda": {"nvcc_flags": NVCC_FLAGS, "archs": _cuda_archs_built()} if with_cuda else None,
        "compiler": os.environ.get("CXX", "c++"),
        "torch": [torch.__version__, torch.version.cuda, torch.version.git_version],
        "python": [sys.version, sysconfig.get_config_var("EXT_SUFFIX"), platform.machine()],
    }
    digest.update(json.dumps(decides, sort_keys=True, default=str).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{JIT_NAME}-{digest.hexdigest()[:16]}"


def _import_built(folder: Path) -> types.ModuleType | None:
    """The extension a finished build left in `folder`, imported; None if there is none."""
    from torch.utils import cpp_extension

    library = folder / f"{JIT_NAME}{cpp_extension.LIB_EXT}"
    if not ((folder / JIT_DONE).is_file() and library.is_file()):
        return None
    spec = importlib.util.spec_from_file_location(JIT_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[bool]:
    """growop's lock on building in `folder`, held for the block; yields whether it is held.

    ``fcntl.flock``: the kernel releases it when its holder dies, however it dies, so
    holding it proves that no build of this folder is running. Where there is no flock
    (Windows, some network file systems) it yields False and locks nothing.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    fd = os.open(folder / JIT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(
                f"growop: waiting for process {owner}, which is building growop's C++ operators "
                f"in {folder} (if that process hangs, end it: its lock goes with it)",
                file=sys.stderr, flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # the file system has no flock
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _clear_torch_lock(folder: Path, locked: bool) -> None:
    """torch's lock file in `folder` makes its build wait for as long as the file exists, and
    a build that was killed leaves it behind. Holding growop's lock (`locked`), no build is
    running, so the file is stale: removed. Without the lock, the user is told what to delete."""
    torch_lock = folder / TORCH_LOCK
    if not torch_lock.exists():
        return
    if not locked:
        raise ImportError(
            f"growop: {torch_lock} exists: another process is building growop's C++ operators "
            f"now, or a build was killed and left it behind. If no build is running, delete "
            f"{torch_lock} and import growop again."
        )
    try:
        torch_lock.unlink(missing_ok=True)
    except OSError as error:
        raise ImportError(
            f"growop: {torch_lock} was left by a build that was killed, and it cannot be "
            f"removed ({error}); delete it and import growop again."
        ) from error
    print(f"growop: removed {torch_lock}, left by a build that was killed", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_into(path: Path) -> Iterator[None]:
    """File descriptor 1 into `path` for the block: torch runs ninja with its output on
    descriptor 1 when verbose (and else keeps it only for an error message)."""
    sys.stdout.flush()
    with open(path, "w") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _compile(folder: Path, with_cuda: bool) -> types.ModuleType:
    """Builds the extension into `folder` (holding the lock) and imports it."""
    from torch.utils import cpp_extension

    log = folder / JIT_LOG
    verbose = os.environ.get("GROWOP_VERBOSE_BUILD") == "1"
    what = "C++ operators and CUDA kernels, first import only, several minutes" if with_cuda else (
        "C++ operators, first import only, about a minute")
    where = "its output follows" if verbose else f"build log: {log}"
    print(f"growop: building growop's {what}, in {folder}; {where}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        with contextlib.nullcontext() if verbose else _stdout_into(log):
            module = cpp_extension.load(
                name=JIT_NAME,
                sources=[str(path) for path in sources(with_cuda)],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
                with_cuda=with_cuda,
                is_python_module=True,
                build_directory=str(folder),
                verbose=True,
            )
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        where = "above" if verbose else f"in {log}; its last lines:\n{_tail(log)}"
        raise ImportError(
            f"growop: building growop's C++ operators failed; the build's output is {where}"
        ) from error
    if (folder / f"{JIT_NAME}{cpp_extension.LIB_EXT}").is_file():
        (folder / JIT_DONE).write_text(f"built in {time.monotonic() - start:.0f} s\n")
    print(f"growop: built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def _check_compiler() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(
            f"growop: building the extension needs a C++ compiler, and '{compiler}' was not "
            "found. Install one (e.g. apt-get install g++) or set CXX, or build ahead of time "
            "where a compiler exists: pip install --no-build-isolation ."
        )
    problem = static_libstdcxx_problem(compiler)
    if problem is not None:
        raise ImportError(problem)


def _jit_build() -> types.ModuleType:
    with_cuda = builds_cuda()
    if not cpu_sources():
        raise ImportError(
            "growop: the compiled extension growop._C is missing and the C++ sources are not "
            f"at {_CSRC} to build it. Reinstall growop from a source checkout "
            "(pip install --no-build-isolation .)."
        )
    with _jit_cuda_archs() if with_cuda else contextlib.nullcontext():
        folder = jit_build_folder(with_cuda)
        module = _import_built(folder)
        if module is not None:
            return module
        _check_compiler()
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder) as locked:
            module = _import_built(folder)  # built by the process this one waited for
            if module is not None:
                return module
            _clear_torch_lock(folder, locked)
            return _compile(folder, with_cuda)


def load() -> tuple[str, types.ModuleType]:
    """Registers the operators; returns how (``"prebuilt"`` or ``"jit"``) and the extension
    module, whose ``masked_linear`` is the op's direct binding for eager calls."""
    if os.environ.get("GROWOP_FORCE_JIT") != "1":
        try:
            return "prebuilt", importlib.import_module("growop._C")
        except ImportError:
            pass
    return "jit", _jit_build()
