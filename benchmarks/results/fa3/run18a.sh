#!/bin/bash
# Run 18a (fourth session): FA3's order for P (converted after the softmax, outside the turn) as
# the variant JAXINFER_FA3_LATE_CONVERT=1 against this commit's default: GPU tests of both (fa2
# too), memcheck of both and of fa2, an interleaved A/B in three rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAXINFER_CACHE_DIR=/tmp/jc XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
VARIANTS=${VARIANTS:-"JAXINFER_FA3_LATE_CONVERT=1"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_$RANDOM.txt 2>&1 &
done
python3 -m jaxinfer.ffi.build --kernel fa2 --arch sm_90 > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py 2>&1 \
  | tee $OUT/pytest_ffi.txt | grep -v -i warn | tail -3
[ "${PIPESTATUS[0]}" = 124 ] && { echo "pytest timed out (hang?)"; exit 1; }
for d in $VARIANTS; do
  JAXINFER_FA3_DEFINES=$d timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py \
    -k fa3 2>&1 | tee $OUT/pytest_fa3_variant.txt | grep -v -i warn | tail -3
done
for b in fa2 fa3 fa3-variant; do
  JAXINFER_FA3_DEFINES=$([ $b = fa3-variant ] && echo $VARIANTS) timeout 90 compute-sanitizer --tool memcheck \
    --kernel-name kns=_forward_kernel --error-exitcode 9 \
    python3 benchmarks/ffi_gpu.py --memcheck-case --backends ${b%-variant} > $OUT/memcheck_$b.txt 2>&1
  echo "memcheck $b rc=$?"; tail -1 $OUT/memcheck_$b.txt
done
W=${VWORK:-prefill_causal,noncausal,gqa_hkv8}
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  for d in "" $VARIANTS; do
    JAXINFER_FA3_DEFINES=$d timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-28s' "${d:-this commit}"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
