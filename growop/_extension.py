"""Loads the compiled operators: the ahead-of-time build if there is one, else a JIT build.

``setup.py`` builds ``growop._C``; importing it registers the ``torch.ops.growop`` operators.
Without it (a source checkout on ``PYTHONPATH``, or an install that skipped the build), the
same sources in ``csrc/`` are compiled once with :func:`torch.utils.cpp_extension.load`
(ninja) into torch's extension cache and reused on later imports.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cpu_sources() -> list[Path]:
    """C++ sources of the extension, schema file first."""
    return [_CSRC / "growop.cpp", *sorted((_CSRC / "cpu").glob("*.cpp"))]


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = cpu_sources()
    if not all(path.is_file() for path in sources):
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
    cpp_extension.load(
        name="growop_C",
        sources=[str(path) for path in sources],
        extra_cflags=["-O3"],
        is_python_module=False,
        verbose=os.environ.get("GROWOP_VERBOSE_BUILD") == "1",
    )


def load() -> str:
    """Registers the operators; returns how: ``"prebuilt"`` or ``"jit"``."""
    if os.environ.get("GROWOP_FORCE_JIT") != "1":
        try:
            importlib.import_module("growop._C")
            return "prebuilt"
        except ImportError:
            pass
    _jit_build()
    return "jit"
