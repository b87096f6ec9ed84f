#!/usr/bin/env bash
# G4Seg on a GPU in one go (a few minutes on an H100/H200-class machine): installs what is
# missing, runs `g4seg bench --device cuda` (float16 with a float32 reference on the same
# weights in the same run; a batch of distinct images, masks and class names against its bare
# passes; FLOPs and TFLOP/s per stage; torch operators per refine; eager vs --compile), mask
# preparation on the device (bench/softening_device.py: exactness there, ms per mask), words ->
# masks (bench/text_to_mask.py: first run with 80 templates, cached runs), then the node-vs-core
# comparison when a ComfyUI checkout is given (COMFYUI_PATH), and prints one summary table.
#
#   bash bench/gpu.sh                                   # all of it
#   COMFYUI_PATH=~/ComfyUI bash bench/gpu.sh            # with the ComfyUI node comparison
#   bash bench/gpu.sh --dry-run                         # print the commands, run nothing
#   bash bench/gpu.sh --device cpu --size 64 --batch 2 --repeats 1 --no-install   # the non-CUDA parts on a CPU
#
# Options: --device DEV (cuda), --dtype D (auto = float16 on CUDA), --size N (512), --batch N (8),
# --repeats N (3), --out DIR (bench_out/gpu-DATE), --python PY (default: the active venv, else a
# .venv-gpu made here with the system's packages visible), --checkpoint/--clip FILES for ComfyUI
# (default: random-weight full-size test models built into OUT), --skip-comfy, --no-compile (skip eager
# vs compiled: compiling costs a few minutes), --skip-text (no words -> masks), --no-install, --dry-run.
# On a CPU the compiled half only traces (torch.compile backend eager): a check of the plumbing.
# Random weights cost the same compute as real ones; no weights are downloaded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda DTYPE=auto SIZE=512 BATCH=8 REPEATS=3 OUT="" PY="" CKPT="" CLIPV=""
SKIP_COMFY=0 INSTALL=1 DRY=0 COMPILE=1 TEXT=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --repeats) REPEATS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --checkpoint) CKPT="$2"; shift 2 ;;
    --clip) CLIPV="$2"; shift 2 ;;
    --skip-comfy) SKIP_COMFY=1; shift ;;
    --no-compile) COMPILE=0; shift ;;
    --skip-text) TEXT=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/bench_out/gpu-$(date -u +%Y%m%d-%H%M%S)}"
COMFY="${COMFYUI_PATH:-}"
if [ -n "$COMFY" ] && [ ! -f "$COMFY/main.py" ]; then
  echo "gpu.sh: COMFYUI_PATH=$COMFY has no main.py: point it at a ComfyUI checkout or unset it" >&2; exit 2
fi
[ "$SKIP_COMFY" = 1 ] && COMFY=""
if { [ -n "$CKPT" ] && [ -z "$CLIPV" ]; } || { [ -z "$CKPT" ] && [ -n "$CLIPV" ]; }; then
  echo "gpu.sh: give both --checkpoint and --clip, or neither (random test models are built then)" >&2; exit 2
fi

run() {  # print, then run unless --dry-run
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

# ---- Python: the given one, the active venv, or a venv of our own that sees the system's torch
if [ -z "$PY" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
  else
    PY="$ROOT/.venv-gpu/bin/python"
    [ -x "$PY" ] || run python3 -m venv --system-site-packages "$ROOT/.venv-gpu"
  fi
fi
if [ "$INSTALL" = 1 ]; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    run "$PY" -m pip install -q torch torchvision  # PyPI's Linux wheels carry CUDA
  fi
  run "$PY" -m pip install -q -e "$ROOT"
  [ -n "$COMFY" ] && run "$PY" -m pip install -q -r "$COMFY/requirements.txt"
fi
if [ "$DRY" = 0 ] && [ "${DEVICE%%:*}" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu.sh: $PY's torch sees no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)')):" \
         "install a CUDA build (pip install torch --index-url https://download.pytorch.org/whl/cu124)" \
         "or pass --device cpu" >&2; exit 2; }
fi
run mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- the core: chosen dtype + float32 reference, distinct batch, FLOPs, operators, eager vs compiled
COMPILE_ARGS=()
if [ "$COMPILE" = 1 ]; then
  COMPILE_ARGS=(--compile)
  [ "${DEVICE%%:*}" = cuda ] || COMPILE_ARGS+=(--compile-backend eager)  # no CUDA graphs: trace only
fi
run "$PY" -m g4seg_core.commands.main bench --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --batch "$BATCH" \
    --repeats "$REPEATS" ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"} --json "$OUT/core.json"

# ---- masks prepared on the device: torch signed distance equal to numpy there, ms per mask old vs batched
# (a failed check is reported, and the rest of a paid device run still goes on)
run "$PY" "$ROOT/bench/softening_device.py" --device "$DEVICE" --size "$SIZE" --batch "$BATCH" --repeats "$REPEATS" \
    --json "$OUT/softening.json" || echo "gpu.sh: the mask-preparation check FAILED (above); going on" >&2

# ---- words -> masks: full-size ViT-H/14 towers, first run (80 templates) and cached runs
if [ "$TEXT" = 1 ]; then
  run "$PY" "$ROOT/bench/text_to_mask.py" --device "$DEVICE" --repeats "$REPEATS" --json "$OUT/text.json"
fi

# ---- the ComfyUI node against the core on the same files
if [ -n "$COMFY" ]; then
  if [ -z "$CKPT" ]; then
    run "$PY" "$ROOT/tools/make_test_comfy_models.py" --size full --models "$OUT/models" --comfyui "$COMFY"
    CKPT="$OUT/models/checkpoints/g4seg_test_sd21_full.safetensors"
    CLIPV="$OUT/models/clip_vision/g4seg_test_vitl14.safetensors"
  fi
  run env COMFYUI_PATH="$COMFY" "$PY" "$ROOT/bench/compare_comfyui.py" --checkpoint "$CKPT" --clip "$CLIPV" \
      --comfy-python "$PY" --device "$DEVICE" --size "$SIZE" --rounds 1 --runs 3 --json "$OUT/comfyui.json"
  if [ "$TEXT" = 1 ]; then  # G4SegTextToMask's text tower: batched token rows vs one prompt per call
    run env COMFYUI_PATH="$COMFY" "$PY" "$ROOT/bench/comfy_text.py" --device "${DEVICE%%:*}" --repeats "$REPEATS" \
        --json "$OUT/comfy_text.json"
  fi
fi

[ "$DRY" = 1 ] && exit 0
"$PY" "$ROOT/bench/gpu_summary.py" "$OUT"
