#!/bin/bash
# Run 32 (seventh session): this tree (the partial max / sum start from their first term; the
# proxy fence only after waits for tiles that came through cp.async) against HEAD's kernel
# (5ae9a8b, abtest_old/): fa3 GPU tests and memcheck of this tree, benchmarks/ffi_gpu.py in three
# interleaved rounds, then jaxinfer-bench prefill_causal (fa3 old / new with cuDNN) in two
# interleaved rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
old() { (cd abtest_old && export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old; "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build.txt 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
new timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -2
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
new timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_fa3.txt 2>&1
echo "memcheck rc=$?"; tail -1 $OUT/memcheck_fa3.txt
echo "checked $(date +%T)"
W=prefill_causal,noncausal,paged16_causal
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-12s' "5ae9a8b"; show /tmp/v.json
  new timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-12s' "this tree"; show /tmp/v.json
done | tee $OUT/variants.txt
echo "A/B done $(date +%T)"
cli() { timeout 80 python3 -m jaxinfer.bench --size full --workloads prefill_causal --repeats 10 --no-progress \
  --no-ceilings "$@" 2>&1; }
for r in 1 2; do
  old cli --backends fa3 --out /tmp/cli_old > $OUT/bench_cli_old$r.txt
  printf '5ae9a8b   '; grep "^prefill" $OUT/bench_cli_old$r.txt
  new cli --backends fa3,cudnn --out /tmp/cli$r > $OUT/bench_cli$r.txt
  printf 'this tree '; grep "^prefill" $OUT/bench_cli$r.txt | tr '\n' ' '; echo
done
echo "done $(date +%T)"
