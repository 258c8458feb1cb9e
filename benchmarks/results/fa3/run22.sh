#!/bin/bash
# Run 22 (fifth session): the wait for P V ordered after the softmax (wgmma_wait_all_after; run 21's
# SASS showed ptxas placing it before every 2^x) as this tree's default, against the old placement
# (JAXINFER_FA3_WAIT_AFTER_SOFTMAX=0, HEAD's kernel) and against the default plus two Q buffers:
# fa3 GPU tests of the default and of the Q2 build, memcheck of the default, an interleaved A/B in
# three rounds, then jaxinfer-bench prefill_causal (fa3 and cuDNN).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
Q2="JAXINFER_FA3_QSTAGES_D128=2,JAXINFER_FA3_VSTAGES_D128=2,JAXINFER_FA3_QSTAGES_D64=2"
VARIANTS=${VARIANTS:-"$Q2 JAXINFER_FA3_WAIT_AFTER_SOFTMAX=0"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
wait
echo "built $(date +%T)"
for d in "" $Q2; do
  JAXINFER_FA3_DEFINES=$d timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py \
    -k fa3 2>&1 | tee $OUT/pytest_fa3_${d:0:20}.txt | grep -v -i warn | tail -2
  [ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
done
timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_fa3.txt 2>&1
echo "memcheck fa3 rc=$?"; tail -1 $OUT/memcheck_fa3.txt
W=${VWORK:-prefill_causal,noncausal,d64_causal,gqa_hkv8}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-28s' "${d:-this tree}" | cut -c1-28 | tr -d '\n'; show /tmp/v.json
  done
done | tee $OUT/variants.txt
timeout 120 python3 -m jaxinfer.bench --size full --workloads prefill_causal --backends fa3,cudnn \
  --repeats 10 --no-progress --no-ceilings --out $OUT/cli > $OUT/bench_cli.txt 2>&1; grep "^prefill" $OUT/bench_cli.txt
echo "done $(date +%T)"
