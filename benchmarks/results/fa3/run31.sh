#!/bin/bash
# Run 31 (seventh session): is the steady loop bound by the softmax or by the tensor cores?
# Timing-only variants of this tree move 2^x off the MUFU (JAXINFER_FA3_DIAG_EXP=1: half of the
# elements, 2: all, as an FFMA + FMUL; wrong results), against this tree and HEAD's kernel
# (5ae9a8b, abtest_old/; this tree only drops the -inf / 0 starts of the partial max / sum), three
# interleaved rounds on prefill_causal and noncausal. The define was a temporary patch of the
# softmax's 2^x loop, not committed:
#   #if JAXINFER_FA3_DIAG_EXP
#     if (JAXINFER_FA3_DIAG_EXP == 2 || e == 1) x = fmaf(x, scale, -m_use) * 0.01f; else
#   #endif
#     x = exp2_approx(fmaf(x, scale, -m_use)); Then the SM clock, power and throttle reasons
# sampled every 100 ms while fa3 runs prefill_causal back to back for ~4 s.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
old() { (cd abtest_old && export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old; "$@"); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv,noheader
for d in "" JAXINFER_FA3_DIAG_EXP=1 JAXINFER_FA3_DIAG_EXP=2; do
  JAXINFER_FA3_DEFINES=$d new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > $OUT/build_${d: -1}.txt 2>&1 &
done
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
echo "built $(date +%T)"
W=prefill_causal,noncausal
show() { python3 -c "import json,sys; print(' '.join(f\"{r['workload']} {r.get('fa3_tflops', float('nan')):.1f} (err {r.get('fa3_o_err', float('nan')):.1e})\" for r in json.load(open(sys.argv[1]))))" $1; }
for r in 1 2 3; do
  old timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json --backends fa3 --workloads $W > /dev/null 2>&1
  printf '%-14s' "5ae9a8b"; show /tmp/v.json
  for d in "" JAXINFER_FA3_DIAG_EXP=1 JAXINFER_FA3_DIAG_EXP=2; do
    JAXINFER_FA3_DEFINES=$d new timeout 90 python3 benchmarks/ffi_gpu.py --quick --no-table --json /tmp/v.json \
      --backends fa3 --workloads $W > /dev/null 2>&1
    printf '%-14s' "tree${d:+ exp$(echo $d | tail -c 2)}"; show /tmp/v.json
  done
done | tee $OUT/variants.txt
LOOP='
import sys, time, jax; sys.path.insert(0, "benchmarks"); import ffi_gpu as f
fn, args = f.ragged_call("fa3", "prefill_causal")
jax.block_until_ready(fn(*args))
print("loop start", time.time(), flush=True)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 4:
    for _ in range(20): out = fn(*args)
    jax.block_until_ready(out); n += 20
print(f"loop end {time.time()}: {n} calls, {(time.perf_counter() - t) / n * 1e3:.3f} ms/call", flush=True)
'
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 100 > $OUT/smi.txt 2>&1 &
SMI=$!
new timeout 60 python3 -c "$LOOP" 2>&1 | grep loop | tee $OUT/loop.txt
kill $SMI
awk -F', ' '{print $2, $3, $5}' $OUT/smi.txt | sort | uniq -c | sort -rn | head -8
echo "done $(date +%T)"
