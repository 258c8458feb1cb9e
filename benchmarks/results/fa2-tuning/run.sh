#!/bin/bash
# Device run: prebuilt libraries (jc.tar.xz; missing ones built in parallel), GPU tests on one
# variant, then prefill_causal timed for every variant in child processes.
# usage: run.sh VARIANTS_FILE "PYTEST_TAGS" (env OUT; the first tag's tests run before the timings)
set -u
cd "$(dirname "$0")/../.."
V=build/fa2-tuning/$1
defs() { awk -v t="$1" '$1==t {print $2}' $V | sed 's/^-$//'; }
wls() { awk -v t="$1" '$1==t {print ($3 == "" ? "prefill_causal" : $3)}' $V; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv,noheader
tar xJf build/fa2-tuning/jc.tar.xz -C /tmp
export JAXINFER_CACHE_DIR=/tmp/jc
mkdir -p /tmp/r
t=$SECONDS; python3 build/fa2-tuning/prebuild.py sm_90 $V 2>&1 | grep -v '^have'; echo "prebuild $((SECONDS-t)) s"
for pt in ${2%% *}; do
  t=$SECONDS
  JAXINFER_FA2_DEFINES=$(defs $pt) timeout $(( ${BUDGET:-340} - SECONDS > 20 ? ${BUDGET:-340} - SECONDS : 20 )) python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider -k fa2 tests/test_ffi.py > /tmp/r/pytest_$pt.txt 2>&1
  echo "pytest -m gpu -k fa2 tests/test_ffi.py @$pt: rc $? ($((SECONDS-t)) s)"; tail -3 /tmp/r/pytest_$pt.txt
  { echo "=== pytest @$pt defines=$(defs $pt)"; cat /tmp/r/pytest_$pt.txt; } >> $OUT/pytest.txt
done
for tag in $(awk '{print $1}' $V) ${EXTRA:-}; do
  t=$SECONDS
  JAXINFER_FA2_DEFINES=$(defs $tag) timeout 150 python3 build/fa2-tuning/ffi_gpu_snapshot.py --quick --workloads $(wls $tag) --variants '' --no-profile --json /tmp/r/$tag.json > /tmp/r/$tag.log 2>&1
  rc=$?
  { echo "=== $tag rc=$rc defines=$(defs $tag)"; tail -25 /tmp/r/$tag.log; } >> $OUT/children.log
  cat /tmp/r/$tag.json >> $OUT/results.json 2>/dev/null
  python3 - "$tag" "/tmp/r/$tag.json" "$rc" "$((SECONDS-t))" <<'PY'
import json, sys
tag, path, rc, sec = sys.argv[1:]
try:
    for r in json.load(open(path)):
        cd = r.get("cudnn_tflops")
        print(f"{tag:<8} {r['workload']:<15} fa2 {r['fa2_s']*1e3:.3f} ms {r['fa2_tflops']:6.1f} TF/s | cudnn {cd or 0:6.1f} | ratio {r['fa2_tflops']/cd if cd else 0:.3f} | err {r.get('fa2_o_err',-1):.1e}/{r.get('fa2_lse_err',-1):.0e} ok={r.get('fa2_ok')} {r.get('fa2_error','')}", flush=True)
    print(f"{tag} took {sec}s", flush=True)
except Exception as e:
    print(f"{tag:<12} FAILED rc={rc} {type(e).__name__} ({sec}s)", flush=True)
PY
done
for pt in $(echo ${2:-} | cut -s -d" " -f2-); do
  t=$SECONDS
  JAXINFER_FA2_DEFINES=$(defs $pt) timeout $(( ${BUDGET:-340} - SECONDS > 20 ? ${BUDGET:-340} - SECONDS : 20 )) python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider -k fa2 tests/test_ffi.py > /tmp/r/pytest_$pt.txt 2>&1
  echo "pytest -m gpu -k fa2 tests/test_ffi.py @$pt: rc $? ($((SECONDS-t)) s)"; tail -3 /tmp/r/pytest_$pt.txt
  { echo "=== pytest @$pt defines=$(defs $pt)"; cat /tmp/r/pytest_$pt.txt; } >> $OUT/pytest.txt
done
if [ -n "${FULL_PYTEST:-}" ]; then  # the whole file (fa3 cases too), on the default library
  t=$SECONDS
  timeout $(( ${BUDGET:-340} - SECONDS > 20 ? ${BUDGET:-340} - SECONDS : 20 )) python3 -m pytest -m gpu -q --tb=line -p no:cacheprovider tests/test_ffi.py > /tmp/r/pytest_full.txt 2>&1
  echo "pytest -m gpu tests/test_ffi.py (default defines): rc $? ($((SECONDS-t)) s)"; tail -3 /tmp/r/pytest_full.txt
  { echo "=== pytest full file, default defines"; cat /tmp/r/pytest_full.txt; } >> $OUT/pytest.txt
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
