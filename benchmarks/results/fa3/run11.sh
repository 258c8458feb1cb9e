#!/bin/bash
# Run 11 (third session, final kernel): fa2/fa3 GPU tests, fa3 memcheck, ffi_gpu.py timings of
# fa3 / fa2 / cuDNN / pallas, and the issue's own metric: jaxinfer-bench prefill_causal and append.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_fa3.txt 2>&1
wait
timeout 120 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -3
timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck.txt 2>&1
echo "memcheck rc=$?"; tail -1 $OUT/memcheck.txt
timeout 150 python3 -m jaxinfer.bench --size full --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla \
  --repeats 10 --no-progress --no-ceilings --out $OUT/bench_cli > $OUT/bench_cli.txt 2>&1; tail -12 $OUT/bench_cli.txt
timeout 220 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,fa2,cudnn,pallas --isolate \
  --child-timeout 100 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
