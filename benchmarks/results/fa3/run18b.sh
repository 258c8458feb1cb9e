#!/bin/bash
# Run 18b (fourth session): FA3's order for P made the only one (run 18a's variant, the switch
# removed): fa3 GPU tests again, then the final figures: jaxinfer-bench (the figure) on
# prefill_causal and append with every backend, and benchmarks/ffi_gpu.py on every workload for
# fa3, fa2, pallas and cuDNN (each backend in its own process).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
timeout 200 python3 -m jaxinfer.bench --size full --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla \
  --repeats 10 --no-progress --no-ceilings --out $OUT/bench_cli > $OUT/bench_cli.txt 2>&1; tail -13 $OUT/bench_cli.txt
timeout 280 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,fa2,cudnn,pallas --isolate \
  --child-timeout 120 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
