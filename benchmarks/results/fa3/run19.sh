#!/bin/bash
# Run 19 (fourth session): is FA3's order for P (this commit) worse at head_dim 256 than the order
# it replaced (commit a5eaed9, copied into abtest_old/)? Interleaved A/B in three rounds, then
# jaxinfer-bench prefill_causal (fa3 and cuDNN) twice more, to see how far 550 is from noise.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc "$@"; }
old() { (cd abtest_old && PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old "$@"); }
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
W=${VWORK:-prefill_causal,d256_causal,d64_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-16s' "a5eaed9"; show /tmp/v.json
  new timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-16s' "this commit"; show /tmp/v.json
done | tee $OUT/variants.txt
for r in 1 2; do
  new timeout 120 python3 -m jaxinfer.bench --size full --workloads prefill_causal --backends fa3,cudnn \
    --repeats 10 --no-progress --no-ceilings --out $OUT/cli$r > $OUT/bench_cli$r.txt 2>&1; grep "^prefill" $OUT/bench_cli$r.txt
done
