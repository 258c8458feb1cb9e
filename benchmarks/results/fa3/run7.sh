#!/bin/bash
# Run 7 (third session): fa3 with TMA loads (Q always, ragged K/V): correctness (diagnose, pytest -m
# gpu), timings against cuDNN (one process per backend), the NOSOFTMAX diagnostic build, ncu
# per-instruction stall sampling as CSV.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${VARIANTS:-"JAXINFER_FA3_DIAG_NOSOFTMAX"}
BACKENDS=${BACKENDS:-fa3,cudnn}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_${d:-base}.txt 2>&1 &
done
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
tail -3 $OUT/build_base.txt | cut -c1-300
echo "built $(date +%T)"
timeout 60 python3 benchmarks/ffi_gpu.py --diagnose fa3 2>&1 | grep diagnose | tee $OUT/diagnose.txt | cut -c1-150
timeout 150 python3 -m pytest -m gpu -q -x --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -15
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/ffi_gpu.py --out $OUT --backends $BACKENDS --isolate \
  --child-timeout 100 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -14
for d in $VARIANTS; do
  echo "variant $d"
  JAXINFER_FA3_DEFINES=$d timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json $OUT/v.json \
    --backends fa3 --workloads ${VWORK:-prefill_causal,noncausal} > /dev/null 2>&1
  python3 -c "import json,sys; [print(' ', r.get('workload'), r.get('fa3_tflops', r)) for r in json.load(open(sys.argv[1]))]" $OUT/v.json
done
if [ -n "$NCU" ]; then
  timeout 150 ncu --clock-control none -k regex:fa3_forward --launch-count 1 --section WarpStateStats \
    --section SourceCounters --section SpeedOfLight --import-source no -f -o $OUT/fa3prof python3 benchmarks/ffi_gpu.py --ncu-case fa3 \
    > $OUT/ncu_log.txt 2>&1
  ncu -i $OUT/fa3prof.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/fa3_source.csv.gz
  ncu -i $OUT/fa3prof.ncu-rep --page details > $OUT/fa3_details.txt 2>&1; rm -f $OUT/fa3prof.ncu-rep
  grep -E "Duration|Compute \(SM\)|Warp Cycles Per Issued" $OUT/fa3_details.txt
fi
