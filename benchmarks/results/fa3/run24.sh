#!/bin/bash
# Run 24 (fifth session): two Q buffers by default at head_dim 64 and 128, O staged in the
# finished item's Q buffer and written by one TMA store per consumer warpgroup; against HEAD's
# kernel (commit 09d0470, in abtest_old/) and against this tree with one Q buffer (O stored from
# registers, run 23's "this tree"). fa3 GPU tests and memcheck of the default and of the one-Q
# build, an interleaved A/B in three rounds, then jaxinfer-bench prefill_causal (fa3, cuDNN).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc "$@"; }
old() { (cd abtest_old && PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old "$@"); }
Q1="JAXINFER_FA3_QSTAGES_D128=1,JAXINFER_FA3_VSTAGES_D128=3,JAXINFER_FA3_QSTAGES_D64=1"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $Q1; do
  JAXINFER_FA3_DEFINES=$d new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
for d in "" $Q1; do
  JAXINFER_FA3_DEFINES=$d new timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider \
    tests/test_ffi.py -k fa3 2>&1 | tee $OUT/pytest_fa3_${d:0:20}.txt | grep -v -i warn | tail -2
  [ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
  JAXINFER_FA3_DEFINES=$d new timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel \
    --error-exitcode 9 python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_${d:0:20}.txt 2>&1
  echo "memcheck rc=$?"; tail -1 $OUT/memcheck_${d:0:20}.txt
done
W=${VWORK:-prefill_causal,noncausal,d64_causal,gqa_hkv8}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-12s' "09d0470"; show /tmp/v.json
  for d in "" $Q1; do
    JAXINFER_FA3_DEFINES=$d new timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-12s' "${d:+one Q}${d:-this tree}"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
new timeout 100 python3 -m jaxinfer.bench --size full --workloads prefill_causal --backends fa3,cudnn --repeats 10 \
  --no-progress --no-ceilings --out /tmp/cli > $OUT/bench_cli.txt 2>&1; grep "^prefill" $OUT/bench_cli.txt
echo "done $(date +%T)"
