#!/bin/bash
# Run 21 (fifth session): two Q buffers (the next item's Q loads while the consumers run the current
# one) as a variant against this tree's default (one Q buffer): GPU tests of the variant, an
# interleaved A/B in two rounds (with K2/V2 rings, which the two Q buffers need, as a third build),
# then ncu per-instruction stall sampling of the default on prefill_causal.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
Q2="JAXINFER_FA3_QSTAGES_D128=2,JAXINFER_FA3_VSTAGES_D128=2,JAXINFER_FA3_QSTAGES_D64=2"
VARIANTS=${VARIANTS:-"$Q2 JAXINFER_FA3_VSTAGES_D128=2"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
wait
echo "built $(date +%T)"
JAXINFER_FA3_DEFINES=$Q2 timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py \
  -k fa3 2>&1 | tee $OUT/pytest_fa3_q2.txt | grep -v -i warn | tail -3
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
W=${VWORK:-prefill_causal,noncausal,d64_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2; do
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-28s' "${d:-this tree}" | cut -c1-28 | tr -d '\n'; show /tmp/v.json
  done
done | tee $OUT/variants.txt
echo "ncu $(date +%T)"
timeout 120 ncu --clock-control none -k regex:fa3_forward --launch-count 1 --section SpeedOfLight \
  --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis --import-source no \
  -f -o $OUT/prof python3 benchmarks/ffi_gpu.py --ncu-case fa3 --ncu-workload prefill_causal > $OUT/ncu_log.txt 2>&1
ncu -i $OUT/prof.ncu-rep --page source --csv --print-source sass > $OUT/source.csv 2>&1
ncu -i $OUT/prof.ncu-rep --page details > $OUT/details.txt 2>&1
rm -f $OUT/prof.ncu-rep; gzip $OUT/source.csv
grep -E "Duration|Warp Cycles Per Issued|Issue Slots|Compute \(SM\)|Tensor|Pipe" $OUT/details.txt | cut -c1-120 | head -20
echo "done $(date +%T)"
