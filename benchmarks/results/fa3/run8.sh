#!/bin/bash
# Run 8 (third session, final): fa3 (TMA + lazy rescaling) and fa2 GPU tests, diagnosis,
# memcheck on fa3, full-size check + timings of fa3 / fa2 / cuDNN / pallas (one process per
# backend), the host planner's plan() timing (benchmarks/plan_gpu.py) and the Pallas GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_fa3.txt 2>&1
wait
timeout 60 python3 benchmarks/plan_gpu.py > $OUT/plan_gpu.log 2>&1; tail -22 $OUT/plan_gpu.log
timeout 60 python3 benchmarks/ffi_gpu.py --diagnose fa3 2>&1 | grep diagnose | tee $OUT/diagnose.txt | cut -c1-110
timeout 120 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -4
timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck.txt 2>&1
echo "memcheck rc=$?"; tail -2 $OUT/memcheck.txt
timeout 230 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,fa2,cudnn,pallas --isolate \
  --child-timeout 100 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -10
timeout 100 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_pallas_attention.py 2>&1 \
  | tee $OUT/pytest_pallas.txt | grep -v -i warn | tail -3
