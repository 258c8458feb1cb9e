#!/bin/bash
# Run 20 (fourth session): the order of P per head_dim (late at 64 and 128, early at 256, where
# run 19 measured it faster): fa3 GPU tests, then two interleaved rounds against commit a5eaed9
# (early order everywhere, copied into abtest_old/).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc "$@"; }
old() { (cd abtest_old && PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old "$@"); }
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
new timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -2
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
W=${VWORK:-prefill_causal,d256_causal,d64_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2; do
  old timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-16s' "a5eaed9"; show /tmp/v.json
  new timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-16s' "this commit"; show /tmp/v.json
done | tee $OUT/variants.txt
