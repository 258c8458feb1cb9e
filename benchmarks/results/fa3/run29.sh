#!/bin/bash
# Run 29 (sixth session): the kernel of run 28 (one pipeline across work items). jaxinfer-bench
# prefill_causal, fa3 of HEAD's kernel (0b94fc3, abtest_old/) and of this tree (with cuDNN),
# interleaved in three rounds; then the full tables: jaxinfer-bench prefill_causal and append on
# every backend, and benchmarks/ffi_gpu.py (fa3 and cuDNN, every workload).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
old() { (cd abtest_old && export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old; "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
new python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
cli() { timeout 100 python3 -m jaxinfer.bench --size full --repeats 10 --no-progress --no-ceilings "$@" 2>&1; }
for r in 1 2 3; do
  old cli --workloads prefill_causal --backends fa3 --out /tmp/cli_old > $OUT/bench_cli_old$r.txt
  printf '0b94fc3   '; grep "^prefill" $OUT/bench_cli_old$r.txt
  new cli --workloads prefill_causal --backends fa3,cudnn --out /tmp/cli$r > $OUT/bench_cli$r.txt
  printf 'this tree '; grep "^prefill" $OUT/bench_cli$r.txt | tr '\n' ' '; echo
done
echo "A/B done $(date +%T)"
new cli --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla --out /tmp/cli_all \
  > $OUT/bench_cli_all.txt; tail -13 $OUT/bench_cli_all.txt
new timeout 200 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,cudnn --isolate \
  --child-timeout 90 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
echo "done $(date +%T)"
