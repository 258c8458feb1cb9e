#!/bin/bash
# Run 17 (fourth session): half of the 2^x of mask-free tiles on the FMA pipe (exp2_poly). fa3 GPU
# tests and memcheck on it, an interleaved A/B against the SFU-only build (EXP2_POLY_PCT=0, the
# previous commit's kernel) in three rounds, then jaxinfer-bench (the figure) on
# prefill_causal and append with every backend.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${VARIANTS:-"JAXINFER_FA3_EXP2_POLY_PCT=0"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py -k fa3 2>&1 \
  | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -4
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
timeout 90 compute-sanitizer --tool memcheck --kernel-name kns=_forward_kernel --error-exitcode 9 \
  python3 benchmarks/ffi_gpu.py --memcheck-case --backends fa3 > $OUT/memcheck_fa3.txt 2>&1
echo "memcheck fa3 rc=$?"; tail -1 $OUT/memcheck_fa3.txt
W=${VWORK:-prefill_causal,noncausal,gqa_hkv8,d64_causal}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-28s' "${d:-this commit}"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
timeout 200 python3 -m jaxinfer.bench --size full --workloads prefill_causal,append --backends fa3,fa2,pallas,cudnn,xla \
  --repeats 10 --no-progress --no-ceilings --out $OUT/bench_cli > $OUT/bench_cli.txt 2>&1; tail -13 $OUT/bench_cli.txt
