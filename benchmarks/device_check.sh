#!/usr/bin/env bash
# One call on a lent CUDA machine (the tool's nvidia-h100-x1 or nvidia-h200: both sm_90): build
# the extension with its CUDA kernels, run the CUDA and Triton tests, time the conv ops against
# the machine's own ceilings (achieved GB/s vs the memory roofline) and the conv benchmark, and
# print a short table last. Step limits add up to 540 s: run it with timeout_s=600, e.g.
#
#   bash benchmarks/device_check.sh            # logs and CSVs under ${OUT:-/tmp/mf_device}
#
# It uses the machine's own python3 and torch (nothing can be installed there: no network). The
# machine's torch (2.11 when last seen) is older than the supported range (>= 2.13): the CMake
# build compiles against it all the same, and the build / info steps say if that fails. opacus is
# not there: the conv benchmark then compares against torch.func vmap only. Each step has its own
# timeout so one slow step cannot eat the lease; every log goes to $OUT, and the table at the end
# says which steps passed.
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
  STATUS+=("$(printf '%-15s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  tail -3 "$OUT/$name.log"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  "$PY" -c "import opacus; print('opacus', opacus.__version__)" 2>/dev/null || echo "opacus: not installed"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. build (sm_90 only; CMake takes the CUDA torch, METAFLUENCE_CUDA=ON insists on it)
step build 170 "$PY" -m pip install -q --no-build-isolation --no-deps \
  --config-settings=cmake.define.METAFLUENCE_CUDA_ARCHS=90 -e . || true
step info 20 "$PY" -c "import metafluence as mf, json; print(json.dumps(mf.build_info(), default=str))" || true

# 2. the CUDA and Triton tests (marked cuda / triton): every op against its reference twin on the
#    GPU, native CUDA and Triton; the CPU tests run where CI runs
step tests 150 "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 -m "cuda or triton" tests/ops || true

# 3. the conv ops alone against the machine's ceilings (copy GB/s, fp32 matmul), per layer of
#    Conv-4 / the ResNet-12 block: Omniglot N=256, mini-ImageNet N=80 (target: per-sample
#    gradients >= 50% of the memory roofline where bytes bound them)
step roofline 60 "$PY" benchmarks/bench_psg_conv.py --device cuda --roofline \
  --models conv4,res12 --inputs 1x28x28 --ns 256 --out "$OUT/psg_conv_roofline.csv" || true
step roofline_84 30 "$PY" benchmarks/bench_psg_conv.py --device cuda --roofline \
  --models conv4 --inputs 3x84x84 --ns 80 --out "$OUT/psg_conv_roofline.csv" || true

# 4. benchmarks (CSV rows under $OUT; the committed CSVs are not touched here)
step bench_psg_lin 30 "$PY" benchmarks/bench_psg_linear.py --device cuda --quick \
  --out "$OUT/psg_linear.csv" || true
# per-sample gradients / dots / norms of whole nets vs one batched fwd+bwd (and vmap, opacus)
step bench_psg_conv 80 "$PY" benchmarks/bench_psg_conv.py --device cuda --threads 1 \
  --models conv4,res12 --inputs 1x28x28,3x84x84 --ns 80 --rounds 3 \
  --out "$OUT/psg_conv.csv" || true

# 5. the table
echo
echo "== device_check summary =="
cat "$OUT/machine.txt"
printf '%s\n' "${STATUS[@]}"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1
grep -m1 "^ceilings" "$OUT/roofline.log" 2>/dev/null
if [ -f "$OUT/psg_conv_roofline.csv" ]; then  # the ops alone: share of the roofline
  "$PY" - "$OUT/psg_conv_roofline.csv" <<'PYEOF'
import csv, sys
print(f"{'model':>5} {'input':>8} {'N':>4} {'layer':>8} {'op':>17} {'backend':>7} {'ms':>8} "
      f"{'GB/s':>7} {'%copy':>6} {'GFLOP/s':>8} {'%floor':>6} {'bound':>7} {'err':>7}")
for r in csv.DictReader(open(sys.argv[1])):
    print(f"{r['model']:>5} {r['input']:>8} {r['N']:>4} {r['layer']:>8} {r['op']:>17} "
          f"{r['backend']:>7} {float(r['median_ms']):8.3f} {r['GB_s']:>7} {r['pct_copy']:>6} "
          f"{r['GFLOP_s']:>8} {r['pct_floor']:>6} {r['bound']:>7} {r['max_rel_err']:>7}")
PYEOF
fi
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
print("GB/s above: bytes that must move / time; compare with the copy ceiling on the line above")
PYEOF
fi
if [ -f "$OUT/psg_conv.csv" ]; then  # whole nets: median ratio to one batched fwd+bwd
  "$PY" - "$OUT/psg_conv.csv" <<'PYEOF'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(f"{r['model']:>6} {r['input']:>8} N={r['N']:>4} {r['method']:>9} {r['median_ms']:>9} ms "
          f"x{r['ratio_median']} vs fwd_bwd  met={r.get('met', '')}")
PYEOF
fi
