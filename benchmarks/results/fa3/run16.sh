#!/bin/bash
# Run 16 (fourth session): persistent fa3 with ring positions carried across work items and the
# general-tile range per item; head_dim 256 one item per CTA (24/240 registers). GPU tests of
# fa2 and fa3, all workloads against cuDNN, then an interleaved A/B against the previous commit's
# kernel (abtest_old/, a copy of HEAD's package) and two variants, three rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${VARIANTS:-"JAXINFER_FA3_PERSISTENT_D128=0 JAXINFER_FA3_PRODUCER_REGS_D128=40,JAXINFER_FA3_CONSUMER_REGS_D128=232"}
new() { PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc "$@"; }
old() { (cd abtest_old && PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
new python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
new timeout 60 python3 benchmarks/ffi_gpu.py --diagnose fa3 2>&1 | grep diagnose | cut -c1-110
new timeout 200 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -6
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
new timeout 240 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,cudnn --isolate --child-timeout 110 --quick \
  2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -9
W=${VWORK:-prefill_causal,noncausal,d256_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-28s' "previous commit"; show /tmp/v.json
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d new timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-28s' "${d:-this commit}" | cut -c1-28 | tr -d '\n'; show /tmp/v.json
  done
done | tee $OUT/variants.txt
