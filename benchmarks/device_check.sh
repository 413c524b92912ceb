#!/usr/bin/env bash
# One call on a machine with a CUDA GPU (e.g. the lent H200): build the extension with CUDA,
# run the CUDA tests and the GPU benchmarks, print a short table last. Budget: < 8 minutes.
#
#   bash benchmarks/device_check.sh            # results under ${OUT:-/tmp/mf_device}
#
# It uses the machine's own python3/torch (no installs from a registry: the device machine has no
# network). Each step has its own timeout so one slow step cannot eat the whole lease; every log
# goes to $OUT, and the table at the end says which steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mf_device}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export METAFLUENCE_CUDA=ON TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
STATUS=()

step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  STATUS+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  tail -3 "$OUT/$name.log"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. build (sm_90 only: the H200; CMake picks up the CUDA torch, METAFLUENCE_CUDA=ON insists on it)
step build 300 "$PY" -m pip install -q --no-build-isolation --no-deps \
  --config-settings=cmake.define.METAFLUENCE_CUDA_ARCHS=90 -e . || true
step info 60 "$PY" -c "import metafluence as mf, json; print(json.dumps(mf.build_info(), default=str))" || true

# 2. CUDA tests: every op against its reference on the GPU (tests marked cuda), fuzz included
step tests 240 "$PY" -m pytest -q -x -p no:cacheprovider -m "cuda or not slow" \
  tests/ops tests/fuzz/test_ops_fuzz.py tests/fuzz/test_determinism_ops.py tests/psg || true

# 3. GPU benchmarks (CSV rows under $OUT; the committed CSVs are not touched here)
step bench_psg_lin 120 "$PY" benchmarks/bench_psg_linear.py --device cuda --quick \
  --out "$OUT/psg_linear.csv" || true
# conv per-sample gradients (issue 19): Conv-4 and the ResNet-12 block, N = 80, vs vmap / opacus
step bench_psg_conv 150 "$PY" benchmarks/bench_psg_conv.py --device cuda --threads 1 \
  --models conv4,res12 --inputs 1x28x28,3x84x84 --ns 80 --rounds 3 \
  --out "$OUT/psg_conv.csv" || true

# 4. the table
echo
echo "== device_check summary =="
cat "$OUT/machine.txt"
printf '%s\n' "${STATUS[@]}"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1
if [ -f "$OUT/psg_linear.csv" ]; then
  "$PY" - "$OUT/psg_linear.csv" <<'PYEOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("device") == "cuda"]
size = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
print(f"{'backend':>8} {'dtype':>8} {'N':>5} {'T':>4} {'in':>5} {'out':>5} {'ms':>9} "
      f"{'x einsum':>8} {'GB/s':>7} {'rel err':>8}")
for r in rows[-16:]:
    n, t, i, o = (int(r[k]) for k in ("N", "T", "in", "out"))
    ms = float(r["median_ms"])
    # fewest bytes: read a [N,T,in] and g [N,T,out] once, write [N,out,in] once (HBM roofline)
    gbs = (n * t * (i + o) + n * i * o) * size.get(r["dtype"], 4) / (ms * 1e-3) / 1e9
    print(f"{r['backend']:>8} {r['dtype']:>8} {n:>5} {t:>4} {i:>5} {o:>5} {ms:>9.4f} "
          f"{float(r['speedup_vs_einsum']):>8.2f} {gbs:>7.1f} {r['max_rel_err']:>8}")
print("HBM copy ceiling (H200, KINDS.md): about 4 TB/s; GB/s above is bytes that must move / time")
PYEOF
fi
if [ -f "$OUT/psg_conv.csv" ]; then  # conv per-sample gradients: median ratio to fwd+bwd
  "$PY" - "$OUT/psg_conv.csv" <<'PYEOF'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(f"{r['model']:>6} {r['input']:>8} N={r['N']:>4} {r['method']:>9} {r['median_ms']:>9} ms "
          f"x{r['ratio_median']} vs fwd_bwd  met={r.get('met', '')}")
PYEOF
fi
