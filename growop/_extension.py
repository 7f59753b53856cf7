"""Loads the compiled operators: the ahead-of-time build if there is one, else a JIT build.

``setup.py`` builds ``growop._C``; importing it registers the ``torch.ops.growop`` operators.
Without it (a source checkout on ``PYTHONPATH``, or an install that skipped the build), the
same sources in ``csrc/`` are compiled once with :func:`torch.utils.cpp_extension.load`
(ninja) into torch's extension cache and reused on later imports. Both builds take their
source lists and flags from here (:func:`sources`).

The CUDA kernels (``csrc/cuda/``) are part of either build only when torch is a CUDA build and
an ``nvcc`` of the same CUDA major version is found (:func:`builds_cuda`; ``GROWOP_BUILD_CUDA=0``
or ``1`` overrides). They are compiled for ``TORCH_CUDA_ARCH_LIST``; unset, setup.py uses
:data:`DEFAULT_CUDA_ARCHS`, and the JIT build the GPUs it sees, or the same default without one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import subprocess
import types
import warnings
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"

# The folders of csrc/ whose .cpp files make the extension, each taken whole, so a new file
# there needs no edit here: op schemas and their typed calls, autograd, the CPU kernels, the
# Python module. File names must differ across folders (hence masked_linear_cpu.cpp beside
# ops/masked_linear.cpp): torch's JIT build names each object file after its source's name.
CPU_SOURCE_DIRS = ("ops", "autograd", "cpu", "python")
# The CUDA kernels (.cu) and their torch glue (.cpp), in CUDA builds only.
CUDA_SOURCE_DIRS = ("cuda",)
# The compile flags of both builds.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]

# sm_80 and sm_90 machine code, and PTX that newer GPUs compile at load.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


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


def _jit_build() -> types.ModuleType:
    from torch.utils import cpp_extension

    with_cuda = builds_cuda()
    if not cpu_sources():
        raise ImportError(
            "growop: the compiled extension growop._C is missing and the C++ sources are not "
            f"at {_CSRC} to build it. Reinstall growop from a source checkout "
            "(pip install --no-build-isolation .)."
        )
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
    with _jit_cuda_archs() if with_cuda else contextlib.nullcontext():
        return cpp_extension.load(
            name="growop_C",
            sources=[str(path) for path in sources(with_cuda)],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=os.environ.get("GROWOP_VERBOSE_BUILD") == "1",
        )


def load() -> tuple[str, types.ModuleType]:
    """Registers the operators; returns how (``"prebuilt"`` or ``"jit"``) and the extension
    module, whose ``masked_linear`` is the op's direct binding for eager calls."""
    if os.environ.get("GROWOP_FORCE_JIT") != "1":
        try:
            return "prebuilt", importlib.import_module("growop._C")
        except ImportError:
            pass
    return "jit", _jit_build()
