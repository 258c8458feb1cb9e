#!/bin/bash
# Run 13: fa2_ffi.cu and fa3_ffi.cu share their operand checks and binding (ffi_forward.cuh):
# GPU tests of both, memcheck of both, and a timing check.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1
wait
timeout 120 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -3
for b in fa2 fa3; do
  timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
    python3 benchmarks/ffi_gpu.py --memcheck-case --backends $b > $OUT/memcheck_$b.txt 2>&1
  echo "memcheck $b rc=$?"; tail -1 $OUT/memcheck_$b.txt
done
timeout 150 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,fa2,cudnn --isolate --child-timeout 80 --quick \
  --workloads prefill_causal,paged16_causal 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -4
