#!/usr/bin/env bash
# The GPU check of growop's CUDA path, in one run (about 400 s on one H100/H200):
#
#   1. machine: GPU, driver, torch and CUDA versions, nvcc;
#   2. build: growop with its CUDA kernels, for this GPU's architecture only
#      (pip install --no-build-isolation --no-deps -e .; no network needed), and a check
#      that the CUDA kernels are registered and that the GEMMs run on tensor cores (HMMA);
#   3. tests: every CUDA test (pytest -k cuda: the cuda half of tests/test_ops.py under each
#      strategy, with and without a live count, values and gradients in bf16/fp16/fp32/fp64,
#      auto's forward+backward under torch.cuda.set_sync_debug_mode("error"), CUDA-graph
#      replays of a static_shape layer after grow/deactivate/reactivate in
#      tests/test_cuda_graphs.py, and the CUDA parts of the other files);
#   4. benchmark: python benchmarks/bench_linear_cuda.py (a row per strategy and
#      mask, bf16 and TF32, the dense/gather crossover R* on this GPU, grow latency);
#   5. profile: where forward+backward's GPU time goes, kernel by kernel, in bf16 at 50%
#      fragmented, at the prefix mask (with and without static_shape) and for a small head,
#      beside nn.Linear (bench_linear_cuda.py --profile; log only);
#   6. the fused loss: python benchmarks/bench_loss.py --device cuda (bf16, 8192 tokens,
#      4096 -> 128000 classes, against nn.Linear + CE, torch's chunked loss and Liger's
#      where it imports);
#   7. the main job: python -m growop.demo --device cuda --quick;
#   8. compute-sanitizer memcheck over the gather kernels' odd-size and fragmented-mask
#      tests, where compute-sanitizer exists and time is left;
#   9. a summary table, last.
#
# CHECK_STEPS names the steps after the build to run (default
# "tests bench profile loss demo memcheck"),
# CHECK_SECONDS the run's budget (default 400; give the call a timeout of about 450). A
# compiler in CXX without a shared libstdc++ is swapped for /usr/bin/g++ (setup.py
# refuses it).
#
# Logs and the benchmark CSV go to $OUT (the device tool's folder) or to CHECK_OUT, else a
# temporary folder. Exit status: 0 when every step passed; 1 when a step failed (the later
# steps still run); 2 on a machine where torch sees no CUDA GPU, after running the one
# check that needs none (tests/test_cuda_compile.py): the GPU steps are then NOT done.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${CHECK_OUT:-${OUT:-$(mktemp -d -t growop-device-check.XXXX)}}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
START=$(date +%s)
# Every step after the build runs under a timeout that keeps the whole run inside 400 s.
DEADLINE=$((START + ${CHECK_SECONDS:-400}))
STATUS=0
SUMMARY=()
# The steps after the build, by name (a rerun may take fewer).
STEPS=${CHECK_STEPS:-"tests bench profile loss demo memcheck"}
want() { [[ " $STEPS " == *" $1 "* ]]; }

step() { echo; echo "=== $* [$(($(date +%s) - START)) s]"; }
# Seconds for the next step: at most $1, and no later than the deadline.
budget() {
  local left=$((DEADLINE - $(date +%s)))
  ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"
}
# Whether step $1 is asked for and at least 15 s are left for it (else it is recorded as
# skipped, so the summary still prints before the caller's timeout).
run_step() {
  want "$1" || return 1
  if (($(date +%s) + 15 > DEADLINE)); then
    record "$1" "skipped: out of time (CHECK_SECONDS=${CHECK_SECONDS:-400})"
    return 1
  fi
}
record() { SUMMARY+=("$(printf '%-10s %s' "$1" "$2")"); }

step "machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
else
  echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
      f"CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ "$HAS_GPU" != 1 ]]; then
  echo
  echo "NO CUDA GPU: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device."
  echo "Only the check that needs no GPU runs here (tests/test_cuda_compile.py);"
  echo "the build with CUDA kernels, the CUDA tests and the GPU benchmark are NOT done."
  step "CUDA compile checks (no GPU needed)"
  if "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py 2>&1 | tee "$LOGS/compile.log"; then
    record compile "passed (nvcc, sm_80 + sm_90, no spills; host model)"
  else
    record compile "FAILED (see $LOGS/compile.log)"
  fi
  record gpu "none: GPU steps not run"
  echo
  echo "=== summary (no GPU) [$(($(date +%s) - START)) s]"
  printf '%s\n' "${SUMMARY[@]}"
  exit 2
fi

step "build growop with its CUDA kernels"
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUILD_START=$(date +%s)
# A C++ compiler without a shared libstdc++ (one such image sets CXX=/opt/gcc/bin/g++) makes
# an extension that crashes on its first error message; setup.py refuses it, so the build
# takes the system compiler instead.
if [[ -n "${CXX:-}" && "$("$CXX" -print-file-name=libstdc++.so 2>/dev/null)" != /* && -x /usr/bin/g++ ]]; then
  echo "CXX=$CXX has no shared libstdc++: building with /usr/bin/g++"
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
{
  echo "# link environment"
  env | grep -E "^(LDFLAGS|CFLAGS|CXXFLAGS|CPPFLAGS|CC|CXX|LDSHARED)=" || true
  "$PY" -c "import sys, sysconfig as s; print(sys.executable, sys.base_prefix); print({k: s.get_config_var(k) for k in ('CC', 'CXX', 'LDSHARED', 'LDCXXSHARED', 'LDFLAGS')})"
  c++ --version 2>&1 | head -1 || true
} >"$LOGS/link.log" 2>&1
# A rerun on a machine still warm from an earlier run reuses that build when the sources,
# the architecture, torch and the compiler are the same (pip's editable build would redo
# every nvcc compile); any change rebuilds.
STAMP_FILE=build/device_check.stamp
STAMP="$( { cat setup.py pyproject.toml growop/_extension.py; find csrc -type f | sort | xargs cat; \
  echo "$ARCH ${CXX:-c++}"; "$PY" -c "import torch; print(torch.__version__)"; } | sha256sum | cut -c1-16)"
verify_build() {
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOGS/build.log"
import torch, growop
assert growop.ops.BUILD == "prebuilt", growop.ops.BUILD
assert torch._C._dispatch_has_kernel_for_dispatch_key("growop::masked_linear", "CUDA"), \
    "growop was built without its CUDA kernels"
print("growop", growop.__version__, "built with CUDA kernels:", growop._C.__file__)
EOF
}
REUSED=0
if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] && : >"$LOGS/build.log" && verify_build; then
  REUSED=1
  echo "reusing the build of an earlier run (sources unchanged, stamp $STAMP)"
fi
if [[ "$REUSED" == 1 ]] || { rm -f "$STAMP_FILE";
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1 && verify_build; }
then
  mkdir -p build && echo "$STAMP" >"$STAMP_FILE"
  BUILT=1
  SO=$("$PY" -c "import growop._C as c; print(c.__file__)")
  {
    echo "# link line"
    grep -E " -shared " "$LOGS/build.log" | tail -1 || true
    echo "# libraries"
    ldd "$SO" | grep -E "stdc|cudart|c10|torch" || true
    echo "# libstdc++ code inside growop._C (0 when it is linked shared)"
    nm --defined-only "$SO" | grep -c "_ZNSo9_M_insert" || true
  } >>"$LOGS/link.log" 2>&1
  tail -8 "$LOGS/link.log"
  # An error message is formatted inside growop._C (c10::str): it must raise, not crash.
  for DEV in cpu cuda; do
    if "$PY" - "$DEV" >"$LOGS/probe.txt" 2>&1 <<'EOF'
import sys, torch
from growop import ops
d = sys.argv[1]
try:
    ops.masked_linear(torch.ones(2, 3, device=d), torch.ones(4, 4, device=d), None,
                      torch.ones(4, dtype=torch.bool, device=d), 4)
except RuntimeError as e:
    print(f"error formatting on {d}: ok ({str(e).splitlines()[0][:80]})")
EOF
    then
      tail -1 "$LOGS/probe.txt" | tee -a "$LOGS/link.log"
    else
      echo "error formatting on $DEV: CRASHED" | tee -a "$LOGS/link.log"
      STATUS=1
    fi
  done
  rm -f "$LOGS/probe.txt"
  HMMA=$(cuobjdump -sass "$SO" 2>/dev/null | grep -c "HMMA" || true)
  if [[ "$REUSED" == 1 ]]; then
    record build "reused (sources unchanged) for sm_${ARCH/./}; ${HMMA:-?} HMMA instructions in growop._C"
  else
    record build "ok in $(($(date +%s) - BUILD_START)) s for sm_${ARCH/./}; ${HMMA:-?} HMMA instructions in growop._C"
  fi
else
  BUILT=0
  STATUS=1
  tail -40 "$LOGS/build.log"
  record build "FAILED (see $LOGS/build.log)"
fi

if [[ "$BUILT" == 1 ]] && run_step tests; then
  step "CUDA tests"
  # test_cuda_compile needs no GPU and runs in CI; -k cuda takes every other CUDA test.
  # With pytest-xdist, four workers share the GPU, and a test that crashes its process is
  # reported as failed instead of ending the run.
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4 --max-worker-restart 50" || true)
  if timeout "$(budget 160)" "$PY" -m pytest -q -rfEs -p no:cacheprovider $XDIST tests -k cuda --tb=short \
      --ignore=tests/test_cuda_compile.py 2>&1 | tee "$LOGS/tests.log"; then
    record tests "$(tail -1 "$LOGS/tests.log")"
  else
    STATUS=1
    record tests "FAILED: $(tail -1 "$LOGS/tests.log")"
  fi
fi

if [[ "$BUILT" == 1 ]] && run_step bench; then
  step "benchmark: bench_linear_cuda.py"
  # expandable segments: the spread16 rows hold blocks of 8 and 16 GiB in turn (an H100
  # has 80 GiB); without them the allocator's splits could run out of memory.
  if PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$(budget 100)" \
      "$PY" benchmarks/bench_linear_cuda.py --repeats 8 \
      --csv "$LOGS/bench_linear_cuda.csv" \
      2>&1 | tee "$LOGS/bench.log"; then
    record bench "ok (CSV: $LOGS/bench_linear_cuda.csv)"
  else
    STATUS=1
    record bench "FAILED (see $LOGS/bench.log)"
  fi
fi

if [[ "$BUILT" == 1 ]] && run_step profile; then
  step "profile: bench_linear_cuda.py --profile"
  if PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$(budget 45)" \
      "$PY" benchmarks/bench_linear_cuda.py --profile --dtypes bf16 \
      --masks fragmented50 prefix small50 >"$LOGS/profile.log" 2>&1; then
    record profile "ok (kernel tables: $LOGS/profile.log)"
  else
    record profile "failed or out of time (see $LOGS/profile.log)"
  fi
fi

if [[ "$BUILT" == 1 ]] && run_step loss; then
  step "fused loss: bench_loss.py --device cuda"
  if timeout "$(budget 60)" "$PY" benchmarks/bench_loss.py --device cuda --repeats 5 \
      --csv "$LOGS/bench_loss_cuda.csv" >"$LOGS/loss.log" 2>&1; then
    record loss "ok (see $LOGS/loss.log)"
  else
    STATUS=1
    tail -20 "$LOGS/loss.log"
    record loss "FAILED or out of time (see $LOGS/loss.log)"
  fi
fi

if [[ "$BUILT" == 1 ]] && run_step demo; then
  step "main job: python -m growop.demo --device cuda --quick"
  if timeout "$(budget 30)" "$PY" -m growop.demo --device cuda --quick --out "$(mktemp -d)" \
      >"$LOGS/demo.log" 2>&1; then
    record demo "ok: $(grep -iE "accuracy|acc" "$LOGS/demo.log" | tail -1)"
  else
    STATUS=1
    tail -20 "$LOGS/demo.log"
    record demo "FAILED (see $LOGS/demo.log)"
  fi
fi

if [[ "$BUILT" == 1 ]] && run_step memcheck; then
  step "compute-sanitizer memcheck"
  if command -v compute-sanitizer >/dev/null; then
    if timeout "$(budget 60)" compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py \
        -k "cuda and gather and (odd_sizes or fragmented_and_empty or values_and_grads_match_reference and mixed)" \
        >"$LOGS/memcheck.log" 2>&1; then
      record memcheck "clean ($(grep -Eo '[0-9]+ passed' "$LOGS/memcheck.log" | tail -1))"
    elif [[ $? == 124 ]]; then
      record memcheck "out of time; errors reported before the stop: $(grep -c "^========= Invalid" "$LOGS/memcheck.log" || true)"
    else
      STATUS=1
      grep -E "ERROR SUMMARY|Invalid|passed|failed" "$LOGS/memcheck.log" | tail -8 || true
      record memcheck "FAILED (see $LOGS/memcheck.log)"
    fi
  else
    record memcheck "skipped: compute-sanitizer not found"
  fi

fi

echo
echo "=== summary [$(($(date +%s) - START)) s]"
"$PY" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
printf '%s\n' "${SUMMARY[@]}"
if [[ -s "$LOGS/bench.log" ]]; then
  echo
  grep -E "^(dtype|bf16|fp32|tf32) " "$LOGS/bench.log" || true
  grep -A8 -E "^crossover" "$LOGS/bench.log" || true
  grep -A2 -E "^ +cap +grow ms" "$LOGS/bench.log" || true
fi
if [[ -s "$LOGS/loss.log" ]]; then
  echo
  tail -25 "$LOGS/loss.log"
fi
exit "$STATUS"
