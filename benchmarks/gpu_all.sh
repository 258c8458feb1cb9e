#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then every benchmark; a short table last.
# Usage there (repo root, nvidia-cutlass wheel carried in .whl/):
#   bash benchmarks/gpu_all.sh [quick]
# Logs and JSON land under $OUT (the device tool's folder) or bench_out/.
set -uo pipefail
out=${OUT:-bench_out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" | tail -15
python3 benchmarks/ffi_gpu.py --quick --out "$out" 2>&1 | tee "$out/ffi.log" | tail -30
python3 benchmarks/pallas_gpu.py --no-sweep 2>&1 | tee "$out/pallas.log" | tail -30
python3 -m jaxinfer.bench --size full --no-progress --out "$out/bench" 2>&1 | tee "$out/bench.log" | tail -60
