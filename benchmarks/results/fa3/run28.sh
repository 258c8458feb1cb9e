#!/bin/bash
# Run 28 (sixth session): the consumers issue the next work item's first Q K^T with an item's last
# P V and write O while it runs (one software pipeline across items); against HEAD's kernel
# (commit 0b94fc3, in abtest_old/) and this tree with one Q buffer (Q1: the boundary then waits
# for the next Q). Stage "a": fa3 GPU tests and memcheck of both builds, an interleaved A/B in
# three rounds. Stage "b": all ffi GPU tests, jaxinfer-bench prefill_causal (fa3 old/new, cuDNN)
# twice, interleaved, then once with 50 ms timed repeats (--min-repeat-ms; default 5).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
old() { (cd abtest_old && export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old; "$@"); }
Q1="JAXINFER_FA3_QSTAGES_D128=1,JAXINFER_FA3_VSTAGES_D128=3,JAXINFER_FA3_QSTAGES_D64=1"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
if [ "$1" = a ]; then
  for d in "" $Q1; do
    JAXINFER_FA3_DEFINES=$d new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
  done
  old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
  wait
  echo "built $(date +%T)"
  for d in "" $Q1; do
    JAXINFER_FA3_DEFINES=$d new timeout 200 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider \
      tests/test_ffi.py -k fa3 2>&1 | tee $OUT/pytest_fa3_${d:0:20}.txt | grep -v -i warn | tail -2
    [ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
    JAXINFER_FA3_DEFINES=$d new timeout 120 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel \
      --error-exitcode 9 python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_${d:0:20}.txt 2>&1
    echo "memcheck rc=$?"; tail -1 $OUT/memcheck_${d:0:20}.txt
  done
  echo "checked $(date +%T)"
  W=${VWORK:-prefill_causal,noncausal,d64_causal,gqa_hkv8}
  show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
  for r in 1 2 3; do
    old timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-12s' "0b94fc3"; show /tmp/v.json
    new timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-12s' "this tree"; show /tmp/v.json
  done | tee $OUT/variants.txt
else
  new python3 -m jaxinfer.ffi.build > /dev/null 2>&1 &
  old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
  wait
  new timeout 200 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
    | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -2
  echo "tested $(date +%T)"
  cli() { timeout 100 python3 -m jaxinfer.bench --size full --workloads prefill_causal --repeats 10 --no-progress \
    --no-ceilings "$@" 2>&1; }
  for r in 1 2; do
    nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
    old cli --backends fa3 --out /tmp/cli_old > $OUT/bench_cli_old$r.txt
    printf '0b94fc3   '; grep "^prefill" $OUT/bench_cli_old$r.txt
    new cli --backends fa3,cudnn --out /tmp/cli$r > $OUT/bench_cli$r.txt
    printf 'this tree '; grep "^prefill" $OUT/bench_cli$r.txt | tr '\n' ' '; echo
  done
  new cli --backends fa3,cudnn --out /tmp/cli50 --min-repeat-ms 50 > $OUT/bench_cli_50ms.txt
  printf 'this tree, 50 ms repeats '; grep "^prefill" $OUT/bench_cli_50ms.txt | tr '\n' ' '; echo
fi
echo "done $(date +%T)"
