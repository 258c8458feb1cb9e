#!/bin/bash
# Run 26 (fifth session): where a prefill_causal call's time goes (benchmarks/call_timeline.py):
# untraced per-call time, then a jax.profiler trace of 20 back-to-back calls with SM clock and
# power sampled, for fa3 (commit 14f7b6a's kernel) and cuDNN.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
timeout 200 python3 benchmarks/call_timeline.py --out /tmp/tl 2>&1 | grep -v -i "warn" | tee $OUT/timeline.txt | tail -20
for b in fa3 cudnn; do cp $(ls /tmp/tl/trace_$b/plugins/profile/*/perfetto_trace.json.gz | tail -1) $OUT/trace_$b.json.gz; done
ls -la $OUT
