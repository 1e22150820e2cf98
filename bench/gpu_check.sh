#!/usr/bin/env bash
# The full-size checks that need a GPU (about 3-5 min on one large NVIDIA GPU; every step is capped, 8 min in all):
#   1. bench_fullsize rows on CUDA: SD 1.5 (512²) and SDXL (1024²) in bf16, training with and without gradient
#      checkpointing, against the memory plan;
#   2. the same for SD 1.5 in fp32;
#   3. one warm-up + one measured Trainer epoch of SD 1.5-size random weights through ComfyHost in bf16 (4 images,
#      10 steps, 512²), with and without checkpointing: peak memory against the plan, and bench_train's floors and
#      ratios on the same U-Net and VAE (total / U-Net floors, and / U-Net floors + the bare decode).
#
# Usage, from anywhere:   bash bench/gpu_check.sh
#   PY                  the ComfyUI venv's python (default: `python3 scripts/comfy_host.py python`, which builds the
#                       cached environment when missing: that needs the network)
#   TEXFORCE_COMFY_DIR  a ComfyUI tree to use instead of the cached one
#   OUT                 where the logs and JSON files go (default: /tmp/texforce_gpu_check)
# Exit status: 0 all steps ran, 1 a step failed or timed out, 2 no Python environment, 3 no CUDA device.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/texforce_gpu_check}"
mkdir -p "$OUT"

if [ -z "${PY:-}" ]; then
  PY="$(python3 scripts/comfy_host.py python 2>"$OUT/comfy_host.err")" || PY=""
fi
if [ -z "$PY" ] || ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: no Python environment with torch (PY='${PY:-}'; see $OUT/comfy_host.err). Set PY to the ComfyUI" \
       "venv's python (scripts/comfy_host.py python) and TEXFORCE_COMFY_DIR if ComfyUI is elsewhere." >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PY): nothing measured. These checks need" \
       "an NVIDIA GPU; on the CPU run bench/bench_fullsize.py --skip-too-big instead." >&2
  exit 3
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

failed=0
step() {  # step NAME SECONDS ARGS...: run bench_fullsize with a cap, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (at most ${limit} s): bench_fullsize.py $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" bench/bench_fullsize.py "$@" --json "$OUT/$name.json" 2>&1 \
    | grep -v -e '^USDT' -e 'torchaudio missing' | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ': timed out'))"
    failed=1
  fi
  echo "=== $name: $((SECONDS - t0)) s"
}

# caps: 240 + 100 + 130 s; a row process (one per model and dtype on CUDA) gets --timeout s, then its rows fail
step rows_bf16 240 --device cuda --models sd15 sdxl --dtypes bf16 --checkpointing on off --timeout 150
step rows_fp32_sd15 100 --device cuda --models sd15 --dtypes fp32 --checkpointing on off --timeout 90
step epoch_sd15_bf16 130 --device cuda --epoch --models sd15 --dtypes bf16 --checkpointing off on \
  --epoch-images 4 --epoch-steps 10

echo
echo "gpu_check: results in $OUT ($(ls "$OUT" | tr '\n' ' '))"
exit $failed
