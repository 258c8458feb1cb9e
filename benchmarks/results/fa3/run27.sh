#!/bin/bash
# Run 27 (fifth session): jaxinfer-bench prefill_causal (fa3 and cuDNN) three times on one machine,
# commit 14f7b6a's kernel, for the spread between runs.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1
for r in 1 2 3; do
  nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
  timeout 100 python3 -m jaxinfer.bench --size full --workloads prefill_causal --backends fa3,cudnn --repeats 10 \
    --no-progress --no-ceilings --out /tmp/cli$r > $OUT/bench_cli$r.txt 2>&1; grep "^prefill" $OUT/bench_cli$r.txt
done
