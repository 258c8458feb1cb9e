#!/bin/bash
# Run 6 (third session): where does fa3 lose its time? Diagnostic builds (temporary -D switches
# that make the kernel wrong on purpose) timed against the kernel as is, plus ncu per-instruction
# stall sampling (SourceCounters) exported as CSV.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${1:-"base JAXINFER_FA3_DIAG_NOLOAD JAXINFER_FA3_DIAG_NOSOFTMAX JAXINFER_FA3_DIAG_NOLOAD,JAXINFER_FA3_DIAG_NOSOFTMAX JAXINFER_FA3_DIAG_NOFENCE"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
for d in $VARIANTS; do
  [ "$d" = base ] && d=""
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
done
wait
echo "built $(date +%T)"
(timeout 150 ncu --clock-control none -k regex:fa3_forward --launch-count 1 --section WarpStateStats \
  --section SourceCounters --import-source no -f -o $OUT/fa3prof python3 benchmarks/ffi_gpu.py --ncu-case fa3 \
  > $OUT/ncu_log.txt 2>&1; ncu -i $OUT/fa3prof.ncu-rep --page source --csv --print-source sass > $OUT/fa3_source.csv 2>&1;
  ncu -i $OUT/fa3prof.ncu-rep --page details > $OUT/fa3_details.txt 2>&1; rm -f $OUT/fa3prof.ncu-rep; gzip $OUT/fa3_source.csv) &
NCU=$!
wait $NCU
echo "ncu done $(date +%T)"
for d in $VARIANTS; do
  [ "$d" = base ] && dd="" || dd=$d
  echo "variant $d"
  JAXINFER_FA3_DEFINES=$dd timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json $OUT/v_${d//,/+}.json \
    --backends fa3 --workloads prefill_causal,noncausal > $OUT/v_${d//,/+}.log 2>&1
  python3 -c "import json,sys; [print(' ', r.get('workload'), r.get('fa3_tflops', r)) for r in json.load(open(sys.argv[1]))]" $OUT/v_${d//,/+}.json
done
