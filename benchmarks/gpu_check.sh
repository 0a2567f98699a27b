#!/usr/bin/env bash
# The prepared GPU check for one lent H100/H200 machine, most important measurement first, inside its own deadline.
#
#   make gpu-kit                                      # here, once (needs PyPI): the wheel folder gpu_kit/ (ignored)
#   PIXART_DS_COMMIT=<sha> bash benchmarks/gpu_check.sh   # on the GPU machine, carrying gpu_kit/ (no network needed)
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run     # anywhere: the same parts on a CPU at a tiny size
#
# Parts, in this order (GPU_CHECK_BUDGET_S, default 470 s of work in all; each part gets what is left):
#   1. install the kit: python benchmarks/gpu_kit.py install (pip --no-index --no-deps --target), import check
#   2. benchmarks/gpu_mfu.py: the production train_step of the stage recipes, row after row in one process, with a
#      deadline that leaves room for parts 3-4; one JSON line per finished row (gpu_mfu_<card>.jsonl)
#   3. pytest -m gpu on the GPU test modules (attention kernels against float32 math, the ZeRO-2 step)
#   4. the GPU-days report of each variant whose Table-4 stages all finished (gpu_days_<card>*.md)
# Results go to benchmarks/results/ and, when $OUT is set, to $OUT/benchmarks/results/ (the records, the log, the
# reports: few files, as the device tool returns at most 8). The commit is taken from PIXART_DS_COMMIT when the
# machine has no .git (a device copy of the working tree has none). Exit 0 if every part passed.
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
RES="$REPO/benchmarks/results"
[ "$DRY" -eq 1 ] && RES=$(mktemp -d)  # a dry run leaves the repository's results alone
OUTRES="${OUT:+$OUT/benchmarks/results}"
OUTRES="${OUTRES:-$RES}"
mkdir -p "$RES" "$OUTRES"
LOG="$OUTRES/gpu_check.log"
KIT="${GPU_KIT:-$REPO/gpu_kit}"
SITE="${PIXART_SITE:-/tmp/pixart_site}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIXART_DS_COMMIT="${PIXART_DS_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
PY=python3
STATUS=()
FAILED=0

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }

# part NAME LIMIT_S CMD... : run with min(LIMIT, time left - 10 s); skipped when under 20 s are left.
part() {
  local name=$1 limit=$2
  shift 2
  local l=$(( $(left) - 10 ))
  if [ "$l" -lt 20 ]; then
    log "SKIP $name: out of time"; STATUS+=("$name: skipped (out of time)"); FAILED=1; return
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  log "START $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then STATUS+=("$name: ok (${dt}s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS+=("$name: TIMEOUT after ${dt}s"); FAILED=1
  else STATUS+=("$name: FAILED rc=$rc (${dt}s)"); FAILED=1; fi
  log "END $name rc=$rc ${dt}s"
}

main() {
log "repo $REPO, commit $PIXART_DS_COMMIT, budget ${BUDGET}s, results -> $OUTRES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2

# 1. the kit: no index, no dependencies (the machine's torch/numpy/transformers stay), into a folder on PYTHONPATH
if ls "$KIT"/*.whl >/dev/null 2>&1; then
  part "install kit" 90 $PY benchmarks/gpu_kit.py install --kit "$KIT" --target "$SITE" && export PYTHONPATH="$PYTHONPATH:$SITE"
else
  log "no kit in $KIT (make gpu-kit): using the packages this machine has"
fi
part "import check" 60 $PY benchmarks/gpu_mfu.py --check-imports
SLUG=$($PY -c "from pixart_ds.hardware import device_record; print(device_record()['slug'])" 2>/dev/null || echo gpu)
REC="$RES/gpu_mfu_${SLUG}.jsonl"

# 2. the measurement that matters most, with its own deadline leaving ~110 s for the GPU tests and the reports
if [ "$DRY" -eq 1 ]; then
  part "gpu_mfu (dry run)" 300 $PY benchmarks/gpu_mfu.py --dry-run --out "$REC" --deadline-s 240 \
    --only stage2-shipped stage3-1024-shipped
else
  MFU_DEADLINE=$(( $(left) - 110 ))
  part "gpu_mfu" $((MFU_DEADLINE + 30)) $PY benchmarks/gpu_mfu.py --out "$REC" --deadline-s "$MFU_DEADLINE"
fi

# 3. GPU tests (skipped, not failed, on a machine without CUDA)
part "pytest -m gpu" 80 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_model.py tests/test_gpu_train.py

# 4. GPU-days of every variant whose Table-4 stages all finished (a variant with a stage missing is named, not drawn)
if [ -s "$REC" ]; then
  for v in shipped gpu; do
    $PY benchmarks/gpu_days_report.py "$REC" --variant "$v" --out "$RES" $([ "$DRY" -eq 1 ] && echo --as-measured) \
      || log "gpu_days $v: not every stage measured"
  done
fi

SUMMARY="$OUTRES/gpu_check_${SLUG}.md"
{
  echo "# GPU check on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s of a ${BUDGET} s budget, commit $PIXART_DS_COMMIT."
  echo
  for s in "${STATUS[@]}"; do echo "- $s"; done
} >"$SUMMARY"
cat "$SUMMARY"
if [ "$OUTRES" != "$RES" ]; then
  cp "$REC" "$OUTRES/" 2>/dev/null || true
  cp "$RES"/gpu_days_"${SLUG}"*.md "$RES"/gpu_days_"${SLUG}"*.json "$OUTRES/" 2>/dev/null || true
fi
log "done: $([ $FAILED -eq 0 ] && echo 'all parts passed' || echo 'some parts failed (see above)')"
return $FAILED
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
