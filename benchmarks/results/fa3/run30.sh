#!/bin/bash
# Run 30 (sixth session): run 28's kernel (one pipeline across work items) against HEAD's
# (0b94fc3, abtest_old/) on short requests, where an item has few KV tiles and the item boundary
# weighs most: benchmarks/ffi_gpu.py's run_workload with B x S patched to 64 x 512 and 16 x 1024
# (causal, H=32, D=128; and paged, page_size 16, at 64 x 512), fa3 only, three interleaved rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
new() { (export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc; "$@"); }
old() { (cd abtest_old && export PYTHONPATH=.:/tmp/site JAXINFER_CACHE_DIR=/tmp/jc_old; "$@"); }
new python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
old python3 -m jaxinfer.ffi.build --kernel fa3 --arch sm_90a > /dev/null 2>&1 &
wait
SHORT='
import sys; sys.path.insert(0, "benchmarks"); import ffi_gpu as f
out = []
for b, s, w in ((64, 512, "prefill_causal"), (16, 1024, "prefill_causal"), (64, 512, "paged16_causal")):
    f.B, f.S = b, s
    r = f.run_workload(w, ["fa3"], check=False)
    tf = r.get("fa3_tflops", float("nan"))
    out.append(f"{w}@{b}x{s} {tf:.1f}")
print(" ".join(out))
'
for r in 1 2 3; do
  printf '0b94fc3   '; old timeout 90 python3 -c "$SHORT" 2>/dev/null | tail -1
  printf 'this tree '; new timeout 90 python3 -c "$SHORT" 2>/dev/null | tail -1
done | tee $OUT/short.txt
echo "done $(date +%T)"
