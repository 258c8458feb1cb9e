#!/bin/bash
# Run 15 (fourth session): persistent fa3 (one CTA per SM, work items from an atomic counter, the
# producer loading the next item's K and Q while the consumers finish). GPU tests, timings of all
# workloads against cuDNN, then the comparison variants interleaved (base, one CTA per item,
# head groups of 8), twice each.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${VARIANTS:-"JAXINFER_FA3_PERSISTENT=0 JAXINFER_FA3_HEAD_GROUP=8"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_${d:-base}.txt 2>&1 &
done
wait
tail -2 $OUT/build_base.txt | cut -c1-300
echo "built $(date +%T)"
timeout 60 python3 benchmarks/ffi_gpu.py --diagnose fa3 2>&1 | grep diagnose | tee $OUT/diagnose.txt | cut -c1-150
timeout 200 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -8
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
timeout 240 python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,cudnn --isolate --child-timeout 110 --quick \
  2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -10
for r in 1 2; do
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json $OUT/v.json \
      --backends fa3 --workloads ${VWORK:-prefill_causal,noncausal} > /dev/null 2>&1
    printf '%-28s' "${d:-base}"
    python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $OUT/v.json
  done
done | tee $OUT/variants.txt
