"""Ahead-of-time build of growop's operators as ``growop._C``.

Build against the torch you run with, so pass ``--no-build-isolation``:
``pip install --no-build-isolation .`` (or ``-e .``). Without this build, ``import growop``
compiles the same sources JIT (see growop/_extension.py).

With a CUDA build of torch and an ``nvcc`` of its CUDA major version (see
``growop._extension.builds_cuda``; ``GROWOP_BUILD_CUDA=0`` or ``1`` overrides), the CUDA kernels
(csrc/cuda/) are built too, for the architectures in ``TORCH_CUDA_ARCH_LIST`` (default here:
``8.0;9.0+PTX``, sm_80 and sm_90 machine code plus PTX for newer GPUs). Otherwise the
extension is CPU-only and built exactly as before.
"""

import importlib.util
import os
import re
from pathlib import Path

import setuptools
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent


def _require_setuptools():
    """The setuptools pyproject.toml's build-system names: ``--no-build-isolation`` (which
    this build needs) installs nothing, and an older setuptools fails on the ``license``
    string with a schema error that does not say which version to install."""
    minimum = re.search(r'"setuptools>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    found = setuptools.__version__

    def numbers(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:3])

    if numbers(found) < numbers(minimum):
        raise SystemExit(
            f"growop needs setuptools>={minimum} to build (pyproject.toml), found {found}: "
            f'pip install "setuptools>={minimum}", then build again'
        )


_require_setuptools()


def _load_extension_helpers():
    """growop/_extension.py alone: importing the package would load the extension."""
    spec = importlib.util.spec_from_file_location("_growop_extension", ROOT / "growop" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_extension = _load_extension_helpers()


def extension():
    """growop._C from the sources and flags the JIT build also uses (growop/_extension.py)."""
    with_cuda = _extension.builds_cuda()
    sources = [str(path.relative_to(ROOT)) for path in _extension.sources(with_cuda)]
    if not with_cuda:
        return CppExtension("growop._C", sources, extra_compile_args={"cxx": _extension.CXX_FLAGS})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _extension.DEFAULT_CUDA_ARCHS)
    return CUDAExtension(
        "growop._C",
        sources,
        extra_compile_args={"cxx": _extension.CXX_FLAGS, "nvcc": _extension.NVCC_FLAGS},
    )


class BuildExtensionCheckingLibstdcxx(BuildExtension):
    """torch's BuildExtension, refusing a C++ compiler that would link libstdc++ statically
    (see growop._extension.static_libstdcxx_problem): the result would crash on its first
    error message."""

    def build_extensions(self):
        drivers = {
            command[0]
            for command in (getattr(self.compiler, attr, None) for attr in
                            ("compiler_cxx", "compiler_so", "linker_so", "linker_so_cxx"))
            if command
        }
        for driver in sorted(drivers):
            problem = _extension.static_libstdcxx_problem(driver)
            if problem is not None:
                raise SystemExit(problem)
        super().build_extensions()


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionCheckingLibstdcxx.with_options(use_ninja=True)},
)
