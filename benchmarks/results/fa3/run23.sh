#!/bin/bash
# Run 23 (fifth session): the epilogue's operands (row sums, 1/l, lse, the item's fields) gathered
# before the wait for the last P V, one loop over the plain tiles (no per-tile branch), and, as a
# variant, two Q buffers; against HEAD's kernel (commit 09d0470, copied into abtest_old/). GPU tests
# and memcheck of this tree and of the Q2 build, an interleaved A/B in three rounds, then
# jaxinfer-bench prefill_causal (fa3 and cuDNN) for both builds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc "$@"; }
old() { (cd abtest_old && PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old "$@"); }
Q2="JAXINFER_FA3_QSTAGES_D128=2,JAXINFER_FA3_VSTAGES_D128=2,JAXINFER_FA3_QSTAGES_D64=2"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $Q2; do
  JAXINFER_FA3_DEFINES=$d new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
for d in "" $Q2; do
  JAXINFER_FA3_DEFINES=$d new timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider \
    tests/test_ffi.py -k fa3 2>&1 | tee $OUT/pytest_fa3_${d:0:20}.txt | grep -v -i warn | tail -2
  [ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
  JAXINFER_FA3_DEFINES=$d new timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel \
    --error-exitcode 9 python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_${d:0:20}.txt 2>&1
  echo "memcheck rc=$?"; tail -1 $OUT/memcheck_${d:0:20}.txt
done
W=${VWORK:-prefill_causal,noncausal,d64_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-16s' "09d0470"; show /tmp/v.json
  for d in "" $Q2; do
    JAXINFER_FA3_DEFINES=$d new timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-16s' "${d:+this tree Q2}${d:-this tree}"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
for d in "" $Q2; do
  JAXINFER_FA3_DEFINES=$d new timeout 100 python3 -m jaxinfer.bench --size full --workloads prefill_causal \
    --backends fa3,cudnn --repeats 10 --no-progress --no-ceilings --out /tmp/cli > $OUT/bench_cli_${d:0:20}.txt 2>&1
  echo "${d:+Q2}"; grep "^prefill" $OUT/bench_cli_${d:0:20}.txt
done
echo "done $(date +%T)"
