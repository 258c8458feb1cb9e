#!/bin/bash
# Run 33 (seventh session): the register split at head_dim 128. With 232 or 240 consumer
# registers (producer 40 or 24) ptxas waits for P V after the first row's max instead of before it
# (with 224 it reuses P's registers for the max). Variants of this tree: producer/consumer 56/224
# (the default), 40/232, 24/240; benchmarks/ffi_gpu.py in three interleaved rounds, then the fa3
# GPU tests of the fastest variant on prefill_causal, and jaxinfer-bench prefill_causal for it
# and the default (with cuDNN) in two interleaved rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
split() { echo "JAXINFER_FA3_PRODUCER_REGS_D128=$1,JAXINFER_FA3_CONSUMER_REGS_D128=$2"; }
VARIANTS="56/224 40/232 24/240"
for v in $VARIANTS; do
  JAXINFER_FA3_DEFINES=$(split ${v%/*} ${v#*/}) new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a \
    > $OUT/build_${v%/*}.txt 2>&1 &
done
wait
echo "built $(date +%T)"
W=prefill_causal,noncausal,paged16_causal
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f}\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  for v in $VARIANTS; do
    JAXINFER_FA3_DEFINES=$(split ${v%/*} ${v#*/}) new timeout 60 python3 benchmarks/ffi_gpu.py --quick --no-table \
      --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-8s' "$v"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
BEST=$(python3 -c "
import collections, sys
tf = collections.defaultdict(list)
for line in open('$OUT/variants.txt'):
    f = line.split()
    tf[f[0]].append(float(f[2]))
print(max(tf, key=lambda v: sum(tf[v]) / len(tf[v])))")
echo "A/B done $(date +%T); fastest on prefill_causal: $BEST"
BD=$(split ${BEST%/*} ${BEST#*/})
JAXINFER_FA3_DEFINES=$BD new timeout 150 python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_ffi.py \
  -k fa3 2>&1 | tee $OUT/pytest_fa3.txt | grep -v -i warn | tail -2
cli() { timeout 80 python3 -m jaxinfer.bench --size full --workloads prefill_causal --repeats 10 --no-progress \
  --no-ceilings "$@" 2>&1; }
for r in 1 2; do
  new cli --backends fa3 --out /tmp/cli_def > $OUT/bench_cli_default$r.txt
  printf '56/224    '; grep "^prefill" $OUT/bench_cli_default$r.txt
  JAXINFER_FA3_DEFINES=$BD new cli --backends fa3,cudnn --out /tmp/cli$r > $OUT/bench_cli_best$r.txt
  printf '%-10s' "$BEST"; grep "^prefill" $OUT/bench_cli_best$r.txt | tr '\n' ' '; echo
done
echo "done $(date +%T)"
