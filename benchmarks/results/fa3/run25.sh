#!/bin/bash
# Run 25 (fifth session, final, commit 14f7b6a): ffi GPU tests (fa2, fa3), jaxinfer-bench
# prefill_causal and append with every backend, and benchmarks/ffi_gpu.py on every workload for
# fa3 and cuDNN (each backend in its own process).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -2
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
timeout 200 python3 -m jaxinfer.bench --size full --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla \
  --repeats 10 --no-progress --no-ceilings --out /tmp/bench_cli > $OUT/bench_cli.txt 2>&1; tail -13 $OUT/bench_cli.txt
timeout 200 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,cudnn --isolate \
  --child-timeout 90 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
