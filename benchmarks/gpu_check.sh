#!/usr/bin/env bash
# One prepared GPU check (~8 minutes on one H100/H200): GPU tests, throughput of every stage at PixArt-XL/2,
# ours vs diffusers, the attention kernels, the adaLN ablation's memory/throughput, and GPU-days from the results.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine WITH PyPI access: the Python packages the GPU image
#                                                 # lacks (deepspeed, diffusers, pydantic, hjson, ...) -> .whl/
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (no network needed if .whl/ came along)
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run   # anywhere: the parts only echo (tests this script)
#
# Every result is written to benchmarks/results/ and, when $OUT is set, packed under $OUT/benchmarks/results/
# (a tarball of all new result files + the log + the summary, because only a few files come back from $OUT).
# The card's name is in every file (file names carry its slug, e.g. _h100_ / _h200_).
# Each part has its own time limit and the whole run a deadline (GPU_CHECK_BUDGET_S, default 470 s of work);
# a part that fails or times out is logged and the next one runs. Exit code 0 if every part passed, 1 otherwise.
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHL="$REPO/.whl"

# ---------------------------------------------------------------------------------------------------------------
# --fetch-wheels: run where PyPI is reachable. The GPU image has torch, numpy, safetensors, huggingface-hub,
# transformers, matplotlib, pyyaml, psutil, einops, msgpack, ninja, py-cpuinfo, tqdm, httpx, requests, regex, filelock
# (KINDS.md); these are what our benchmarks need beside them. Python 3.12, x86-64 manylinux.
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHL"
  grep -qs '^/.whl/$' "$REPO/.git/info/exclude" || { mkdir -p "$REPO/.git/info"; echo "/.whl/" >>"$REPO/.git/info/exclude"; }
  PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$WHL" \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0 \
    diffusers==0.39.0 importlib-metadata==8.7.0 || exit 1
  # deepspeed publishes only an sdist; build its pure-Python wheel (ops are JIT-built at run time; we need none).
  ls "$WHL"/deepspeed-*.whl >/dev/null 2>&1 || \
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" deepspeed==0.19.8 || exit 1
  ls -la "$WHL"
  exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1  # exercise this script's own logic without a GPU: every part only echoes

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
RES="$REPO/benchmarks/results"
[ "$DRY" -eq 1 ] && RES=$(mktemp -d)  # a dry run leaves the repository's results alone
mkdir -p "$RES"
if [ -n "${OUT:-}" ]; then
  OUTRES="$OUT/benchmarks/results"
else
  OUTRES="$RES"
fi
mkdir -p "$OUTRES"
STAMP_FILE=$(mktemp)  # result files newer than this are this run's
LOG="$OUTRES/gpu_check.log"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
STATUS=()
FAILED=0

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# part NAME LIMIT_S CMD... : run with min(LIMIT, time left - 20 s); skip when under 30 s are left.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 20))
  if [ "$left" -lt 30 ]; then
    log "SKIP $name: out of time (deadline ${BUDGET}s)"
    STATUS+=("$name: skipped (out of time)")
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "START $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    STATUS+=("$name: ok (${dt}s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    STATUS+=("$name: TIMEOUT after ${dt}s")
    FAILED=1
  else
    STATUS+=("$name: FAILED rc=$rc (${dt}s)")
    FAILED=1
  fi
  log "END $name rc=$rc ${dt}s"
}

main() {
log "repo $REPO, results -> $RES and $OUTRES, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -5
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  # Carried wheels (see --fetch-wheels); --no-deps: the image's own torch/numpy stay.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pixart_site \
    "$WHL"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pixart_site" || log "wheel install failed"
fi
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for m in ("deepspeed", "diffusers", "flash_attn", "streaming", "transformers", "yaml", "safetensors", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report and go on: the parts that need it will fail on their own
        print(f"  {m} MISSING ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
EOF
if [ "$DRY" -eq 1 ]; then
  PY="echo [dry-run] python3"
else
  $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { log "no CUDA device: stop"; return 1; }
fi
SLUG=$(python3 -c "from pixart_ds.hardware import device_record; print(device_record()['slug'])" 2>/dev/null || echo gpu)
log "hardware slug: $SLUG"

# 1. GPU tests (modules whose imports are missing on this image are reported, not fatal).
part "pytest -m gpu" 75 $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -x tests/

# 2. Throughput of every stage at the recipe's model, resolution and per-GPU batch (one process each).
for r in stage2_sam256 stage1_imagenet256 stage3_hq256 stage3_hq512 stage3_hq1024; do
  part "throughput $r" 75 $PY benchmarks/throughput.py "recipes/$r.yaml" --warmup 3 --steps 8 --no-progress
done
part "gpu_days" 30 $PY benchmarks/gpu_days.py --hardware "$SLUG"

# 3. Ours vs diffusers at PixArt-XL/2, 256 px, bf16.
part "vs_reference" 90 $PY benchmarks/vs_reference.py --preset PixArt-XL/2 --batch 32 --dtype bf16 --repeats 6

# 4. Attention kernels (benchmarks/gpu_attention.py, when present).
if [ -f benchmarks/gpu_attention.py ]; then
  part "gpu_attention" 60 $PY benchmarks/gpu_attention.py
else
  STATUS+=("gpu_attention: not present")
fi

# 5. adaLN ablation: parameters, memory and throughput of both variants at the same batch (no training here).
part "ablation_adaln (params/memory/throughput)" 130 $PY benchmarks/ablation_adaln.py --skip-training

# 6. The MFU goal without recomputation: stage 2 at a batch that fits without grad checkpointing.
part "throughput stage2 no-recompute" 60 $PY benchmarks/throughput.py recipes/stage2_sam256.yaml \
  --set model.grad_checkpointing=false --set train.micro_batch_size=64 --tag nockpt-b64 --warmup 3 --steps 8 --no-progress
part "gpu_days (final)" 30 $PY benchmarks/gpu_days.py --hardware "$SLUG"

# ---------------------------------------------------------------------------------------------------------------
SUMMARY="$RES/gpu_check_${SLUG}_$(date -u +%Y%m).md"
{
  echo "# GPU check on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s, commit $(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null)."
  echo
  for s in "${STATUS[@]}"; do echo "- $s"; done
  echo
  echo "Results (this run):"
  echo
  find "$RES" -maxdepth 1 -type f -newer "$STAMP_FILE" ! -name "$(basename "$SUMMARY")" -printf '- %f\n' | sort
} >"$SUMMARY"
cat "$SUMMARY"
if [ "$OUTRES" != "$RES" ]; then
  cp "$SUMMARY" "$OUTRES/"
  (cd "$RES" && find . -maxdepth 1 -type f -newer "$STAMP_FILE" -printf '%f\n' | sort | \
    tar -czf "$OUTRES/gpu_results_${SLUG}_$(date -u +%Y%m).tar.gz" -T -) && \
    log "packed $(tar -tzf "$OUTRES/gpu_results_${SLUG}_$(date -u +%Y%m).tar.gz" | wc -l) files into $OUTRES"
  cp "$RES"/gpu_days_"${SLUG}"_*.md "$OUTRES/" 2>/dev/null || true
fi
log "done: $([ $FAILED -eq 0 ] && echo 'all parts passed' || echo 'some parts failed (see above)')"
return $FAILED
}

main 2>&1 | tee "$LOG"
RC=$?
rm -f "$STAMP_FILE"
exit $RC
