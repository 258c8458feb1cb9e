#!/bin/bash
# One device run of the fa3 backend (benchmarks/NOTES-ffi.md, FA3 section): build, small-case
# diagnosis, pytest -m gpu for fa3, full-size checks and timings of fa3 / fa2 / cuDNN / pallas
# (one child process per backend), tuning variants (JAXINFER_FA3_DEFINES, one library each),
# ncu on one fa3 launch, compute-sanitizer memcheck.
# Usage on the device (carry .whl): bash benchmarks/results/fa3/run.sh ["DEFINES_A DEFINES_B ..."]
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${1:-"JAXINFER_FA3_PINGPONG=0 JAXINFER_FA3_VSTAGES_D128=2"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
for d in $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
done
(time python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a) 2>&1 | tail -4
wait
timeout 60 python3 benchmarks/ffi_gpu.py --diagnose fa3 2>&1 | grep diagnose | tee $OUT/diagnose.txt | cut -c1-150
timeout 120 python3 -m pytest -m gpu -q --tb=line -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -15
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/ffi_gpu.py --out $OUT --backends fa3,fa2,cudnn,pallas --isolate \
  --child-timeout 100 --quick 2>&1 | tee $OUT/bench.txt | grep -v -i "warn\|^{" | tail -20
for d in $VARIANTS; do
  echo "variant $d"
  JAXINFER_FA3_DEFINES=$d timeout 60 python3 benchmarks/ffi_gpu.py --quick --backends fa3 \
    --workloads prefill_causal,noncausal 2>&1 | grep -v -i "warn\|^{" | tail -2 | tee -a $OUT/variants.txt
done
timeout 120 ncu --clock-control none -k regex:fa3_forward --launch-count 1 --section SpeedOfLight \
  --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
  python3 benchmarks/ffi_gpu.py --ncu-case fa3 > $OUT/ncu_fa3.txt 2>&1
grep -E "Duration|Warp Cycles Per Issued|Issue Slots|Compute \(SM\)|each warp|represents" $OUT/ncu_fa3.txt | cut -c1-120
timeout 60 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck.txt 2>&1
echo "memcheck rc=$?"; tail -2 $OUT/memcheck.txt
