"""The CUDA sources compile, and their index arithmetic holds, on a machine without a GPU.

Needs only ``nvcc`` (skipped where there is none), not a GPU or a CUDA build of torch:

- every kernel ``.cu`` in csrc/cuda compiles for sm_80 and for sm_90, and ptxas reports no
  register spills (and no stack frame in the GEMM kernels, where one would mean a register
  array fell to local memory);
- the kernels' sources include no torch header;
- the torch glue ``.cpp`` passes the host compiler's syntax check against torch's headers;
- tests/cuda_host/tile_model.cu, a host program that runs the kernels' index arithmetic over
  whole launches against a naive product, passes;
- setup.py and the JIT build take the CUDA sources exactly when torch has CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from growop import _extension

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHES = ("80", "90")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")


def cuda_include_dir() -> Path:
    """The toolkit's include directory, found from nvcc itself (it may be a wrapper script)."""
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for match in re.finditer(r"-I\"?([^\"\s]+)\"?", out):
        if (Path(match.group(1)) / "cuda_runtime.h").is_file():
            return Path(match.group(1))
    nvcc = Path(NVCC).resolve()
    return nvcc.parent.parent / "include"


# What torch's build passes to nvcc for every .cu (BuildExtension and load()).
NVCC_FLAGS = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O3"]


def compile_kernels(source: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NVCC, "-c", str(source), "-o", str(out_dir / f"{source.stem}.sm_{arch}.o"), *NVCC_FLAGS,
         f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=600,
    )


def ptxas_report(output: str) -> dict[str, tuple[int, int, int]]:
    """Kernel (mangled name) -> (stack frame, spill stores, spill loads) bytes."""
    report, kernel = {}, None
    for line in output.splitlines():
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:
            kernel = properties.group(1)
            continue
        usage = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if usage and kernel:
            report[kernel] = tuple(int(g) for g in usage.groups())
            kernel = None
    return report


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each kernel source compiled for each architecture, in parallel."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs = [(source, arch) for source in sorted(CUDA_DIR.glob("*.cu")) for arch in ARCHES]
    with ThreadPoolExecutor(max_workers=max(2, min(len(jobs), os.cpu_count() or 2))) as pool:
        results = list(pool.map(lambda job: compile_kernels(*job, out_dir), jobs))
    return dict(zip(jobs, results))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHES)
def test_kernels_compile_without_spills(compiled, arch):
    runs = {source: result for (source, a), result in compiled.items() if a == arch}
    assert runs, "no kernel sources in csrc/cuda"
    report = {}
    for source, result in runs.items():
        assert result.returncode == 0, f"{source.name} for sm_{arch}:\n{result.stderr[-6000:]}"
        report.update(ptxas_report(result.stderr))
    gemms = [name for name in report if "masked_gemm_kernel" in name]
    # 3 operand layouts x 5 kinds of arithmetic (bf16, fp16, tf32, fp32, fp64)
    assert len(gemms) == 15, f"expected 15 GEMM kernels in the ptxas report, found {len(gemms)}"
    for name in ("live_rows_kernel", "fill_dead_columns_kernel", "zero_dead_rows_kernel", "bias_grad_kernel"):
        assert any(name in kernel for kernel in report), f"{name} missing from the ptxas report"
    spills = {k: v for k, v in report.items() if v[1] or v[2]}
    assert not spills, f"register spills for sm_{arch} (stack, stores, loads): {spills}"
    frames = {k: v for k, v in report.items() if k in gemms and v[0]}
    assert not frames, f"GEMM kernels with a stack frame for sm_{arch}: {frames}"


def test_kernel_sources_include_no_torch():
    kernel_files = [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h")]
    assert kernel_files
    for path in kernel_files:
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", path.read_text())
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10") or i.startswith("Python")]
        assert not torchy, f"{path.name} includes {torchy}: the kernel side must know nothing of torch"


@needs_nvcc
def test_tile_model_runs_on_the_host(tmp_path):
    binary = tmp_path / "tile_model"
    build = subprocess.run(
        [NVCC, "-x", "cu", str(ROOT / "tests" / "cuda_host" / "tile_model.cu"), "-o", str(binary),
         *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O2"],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"tile model: \d+ checks, 0 failures", run.stdout), run.stdout


@needs_nvcc
def test_glue_passes_the_host_compiler(tmp_path):
    """Syntax check of csrc/cuda/*.cpp with torch's headers and the CUDA headers.

    A CPU-only torch ships the c10/cuda headers but not the one its CUDA build generates,
    c10/cuda/impl/cuda_cmake_macros.h; where it is missing, a stand-in with the content the
    generated one has (the C10_CUDA_BUILD_SHARED_LIBS switch) is put on the include path."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no host C++ compiler ({compiler})")
    includes = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in includes):
        stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(tmp_path)
    includes.append(cuda_include_dir())
    flags = [f for p in includes for f in ("-isystem", str(p))]
    sources = sorted(CUDA_DIR.glob("*.cpp"))
    assert sources
    for source in sources:
        result = subprocess.run(
            [compiler, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", *flags, "-DUSE_CUDA",
             "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", str(source)],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, f"{source.name}:\n{result.stderr[-6000:]}"


def test_setup_py_builds_cuda_sources_only_with_a_cuda_torch():
    """setup.py's extension as torch and the toolkit here make it, and as a CUDA build does."""
    probe = (
        "import json, os, runpy, sys, setuptools, torch, torch.utils.cpp_extension as ce\n"
        "if sys.argv[1] == 'cuda':\n"
        "    torch.version.cuda, ce.CUDA_HOME = '13.0', '/usr/local/cuda'\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "ext = seen['ext_modules'][0]\n"
        "print(json.dumps({'sources': ext.sources, 'args': ext.extra_compile_args,\n"
        "                  'arch': os.environ.get('TORCH_CUDA_ARCH_LIST')}))\n"
    )

    def run(mode, **env):
        environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "GROWOP_BUILD_CUDA")}
        result = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                cwd=ROOT, timeout=300, env={**environ, **env})
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    cuda_files = {f"csrc/cuda/{p.name}" for p in CUDA_DIR.iterdir() if p.suffix in (".cpp", ".cu")}
    cpu_files = [str(p.relative_to(ROOT)) for p in _extension.cpu_sources()]
    if torch.version.cuda is None:
        as_is = run("as-is")
        assert not cuda_files & set(as_is["sources"]) and "nvcc" not in as_is["args"]
        assert as_is["sources"] == cpu_files
    with_cuda = run("cuda", GROWOP_BUILD_CUDA="1")  # the toolkit's own version is tested below
    assert cuda_files <= set(with_cuda["sources"]), with_cuda["sources"]
    assert with_cuda["sources"][: len(cpu_files)] == cpu_files
    assert with_cuda["args"]["nvcc"] == ["-O3"] and with_cuda["arch"] == "8.0;9.0+PTX"
    assert run("cuda", GROWOP_BUILD_CUDA="0")["sources"] == cpu_files


@pytest.mark.parametrize(
    "torch_cuda,cuda_home,nvcc_major,env,expected",
    [
        (None, None, None, "", False),  # a CPU torch
        (None, "/usr/local/cuda", 13, "", False),  # a CPU torch beside a toolkit
        ("13.0", None, None, "", False),  # a CUDA torch, no nvcc
        ("13.0", "/usr/local/cuda", 13, "", True),
        ("12.8", "/usr/local/cuda", 13, "", False),  # torch refuses another major version
        ("12.8", "/usr/local/cuda", 13, "1", True),
        ("13.0", "/usr/local/cuda", 13, "0", False),
    ],
)
def test_when_the_build_includes_cuda(monkeypatch, torch_cuda, cuda_home, nvcc_major, env, expected):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(_extension, "_nvcc_major", lambda home: nvcc_major)
    monkeypatch.setenv("GROWOP_BUILD_CUDA", env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.builds_cuda() is expected
    messages = [str(w.message) for w in caught]
    if torch_cuda == "12.8" and env == "":
        assert len(messages) == 1 and "torch is built for CUDA 12.8 but the nvcc" in messages[0]
    else:
        assert not messages


@needs_nvcc
def test_nvcc_version_is_read():
    release = re.search(r"release (\d+)\.", subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout)
    assert _extension._nvcc_major(str(Path(NVCC).parent.parent)) == int(release.group(1))
    assert _extension._nvcc_major("/no/such/toolkit") is None


def test_jit_build_takes_cuda_sources_only_with_a_cuda_torch(monkeypatch, tmp_path):
    calls = []

    def fake_load(**kwargs):
        calls.append({**kwargs, "arch": os.environ.get("TORCH_CUDA_ARCH_LIST")})

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build of the real cache is found
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cuda in (False, True):
        monkeypatch.setattr(_extension, "builds_cuda", lambda cuda=cuda: cuda)
        _extension._jit_build()
    cpu_only, with_cuda = calls
    assert cpu_only["sources"] == [str(p) for p in _extension.cpu_sources()]
    assert not cpu_only.get("with_cuda") and not cpu_only.get("extra_cuda_cflags")
    assert with_cuda["with_cuda"] is True and with_cuda["arch"] == _extension.DEFAULT_CUDA_ARCHS
    assert {Path(s).name for s in with_cuda["sources"]} >= {"masked_linear_kernel.cu", "masked_linear_cuda.cpp"}
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # put back as it was
