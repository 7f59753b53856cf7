"""Ahead-of-time build of growop's operators as ``growop._C``.

Build against the torch you run with, so pass ``--no-build-isolation``:
``pip install --no-build-isolation .`` (or ``-e .``). Without this build, ``import growop``
compiles the same sources JIT (see growop/_extension.py).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def sources() -> list[str]:
    files = [ROOT / "csrc" / "growop.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    return [str(path.relative_to(ROOT)) for path in files]


setup(
    ext_modules=[
        CppExtension("growop._C", sources(), extra_compile_args={"cxx": ["-O3"]}),
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
