#!/usr/bin/env bash
# One prepared check for a lent GPU machine (see benchmarks/README.md): the GPU tests, then
# benchmarks/gpu_latency.py; logs, a Markdown summary and a JSON summary go to OUTDIR.
#
#   bash benchmarks/device_check.sh OUTDIR
#
# Needs benchmarks/device_inputs (python benchmarks/prepare_device_inputs.py, on a machine with
# SimpleITK and ../shared/data). The project is not installed there: PYTHONPATH=$PWD.
# Budget: about 8 minutes on an H100 (tests <= TESTS_TIMEOUT s, benchmark <= BENCH_TIMEOUT s);
# extra benchmark options in BENCH_ARGS (e.g. "--repeats 10 --no-large").
set -u -o pipefail

OUTDIR=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-170}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-290}
BENCH_ARGS=${BENCH_ARGS:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export IIRP_DEVICE_INPUTS=$PWD/benchmarks/device_inputs
start=$(date +%s)

{
  date -u
  nvidia-smi || echo "nvidia-smi not available"
  python - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "torch", "numba", "cuda.core", "cupy", "onnxruntime", "pytest", "typer", "SimpleITK"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "unavailable:", type(err).__name__, err)
import torch
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF
} > "$OUTDIR/environment.txt" 2>&1

if [ ! -f "$IIRP_DEVICE_INPUTS/lpba40_pair.npz" ]; then
  echo "missing $IIRP_DEVICE_INPUTS/lpba40_pair.npz: run python benchmarks/prepare_device_inputs.py and carry" \
       "benchmarks/device_inputs" | tee "$OUTDIR/summary.md"
  exit 2
fi

tests_rc=skipped
if python -c "import pytest" 2>/dev/null; then
  timeout "$TESTS_TIMEOUT" python -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/kernels/test_cuda_kernels.py tests/runtime/test_device_pipeline.py > "$OUTDIR/tests.log" 2>&1
  tests_rc=$?
else
  echo "pytest is not installed on this machine: GPU tests skipped (gpu_latency.py checks fp32 parity itself)" \
    > "$OUTDIR/tests.log"
fi
tests_s=$(( $(date +%s) - start ))

# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "$BENCH_TIMEOUT" python benchmarks/gpu_latency.py --inputs "$IIRP_DEVICE_INPUTS" --out "$OUTDIR" \
  $BENCH_ARGS > "$OUTDIR/benchmark.log" 2>&1
bench_rc=$?
total_s=$(( $(date +%s) - start ))

{
  echo "# Device check"
  echo
  echo "tests: rc=$tests_rc ($tests_s s); benchmark: rc=$bench_rc; total $total_s s. Logs: tests.log, benchmark.log,"
  echo "environment.txt."
  echo
  echo '```'
  tail -n 25 "$OUTDIR/tests.log"
  echo
  echo '```'
  echo
  if [ -f "$OUTDIR/gpu_latency.md" ]; then
    cat "$OUTDIR/gpu_latency.md"
  else
    echo "No gpu_latency.md (benchmark failed or timed out); last lines of benchmark.log:"
    echo
    echo '```'
    tail -n 40 "$OUTDIR/benchmark.log"
    echo
    echo '```'
  fi
} > "$OUTDIR/summary.md"

python - "$OUTDIR" "$tests_rc" "$bench_rc" "$tests_s" "$total_s" <<'EOF'
import json, sys
from pathlib import Path
out, tests_rc, bench_rc, tests_s, total_s = sys.argv[1:]
summary = {"tests_rc": tests_rc, "benchmark_rc": int(bench_rc), "tests_s": int(tests_s), "total_s": int(total_s)}
bench = Path(out) / "gpu_latency.json"
if bench.is_file():
    summary["gpu_latency"] = json.loads(bench.read_text())
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
cat "$OUTDIR/summary.md"
[ "$tests_rc" = 0 ] || [ "$tests_rc" = skipped ] || exit 1
exit "$bench_rc"
