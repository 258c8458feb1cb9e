#!/bin/bash
# Run 34 (seventh session), the landed kernel (c110dd3). Stage "a": every ffi GPU test (fa2 and
# fa3), compute-sanitizer memcheck of fa3, and jaxinfer-bench prefill_causal (fa3, cuDNN) three
# times. Stage "b": the full tables, jaxinfer-bench prefill_causal and append on every backend and
# benchmarks/ffi_gpu.py (fa3 and cuDNN, every workload).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
new python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
cli() { timeout 150 python3 -m jaxinfer.bench --size full --repeats 10 --no-progress --no-ceilings "$@" 2>&1; }
if [ "$1" = a ]; then
  new timeout 200 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
    | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -2
  new timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
    python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_fa3.txt 2>&1
  echo "memcheck rc=$?"; tail -1 $OUT/memcheck_fa3.txt
  for r in 1 2 3; do
    new cli --workloads prefill_causal --backends fa3,cudnn --out /tmp/cli$r > $OUT/bench_cli$r.txt
    grep "^prefill" $OUT/bench_cli$r.txt | tr '\n' ' '; echo
  done
else
  new cli --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla --out /tmp/cli_all \
    > $OUT/bench_cli_all.txt; tail -13 $OUT/bench_cli_all.txt
  new timeout 220 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,cudnn --isolate \
    --child-timeout 100 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
fi
echo "done $(date +%T)"
