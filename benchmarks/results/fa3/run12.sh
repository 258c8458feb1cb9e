#!/bin/bash
# Run 12: the FFI backends' plan copies through jaxinfer.transfer.to_device (was 6 jnp.asarray):
# GPU tests of fa2/fa3 and the CLI's plan time on prefill_causal and append.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1
wait
timeout 120 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py tests/test_plan_device_put.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -3
timeout 150 python3 -m jaxinfer.bench --size full --workloads prefill_causal,append --backends fa3,fa2,pallas \
  --repeats 10 --no-progress --no-ceilings --out $OUT/bench_cli > $OUT/bench_cli.txt 2>&1; grep -B2 -A8 "^workload" $OUT/bench_cli.txt
