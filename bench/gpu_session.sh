#!/usr/bin/env bash
# One prepared GPU session (issues 6 and 7): run through the device tool with `.comfyui` carried (the pinned host that
# `bash tests/run.sh` extracts there, about 16 MB), e.g.   run: bash bench/gpu_session.sh   carry: [".comfyui"]
# Prints the benchmark table at real sizes (fp16) and the memory modes with their peak memory and agreement.
# Issue 8's GPU run is a separate call (it fits in one command's 10 minutes on its own):
#   python bench/train_synthetic.py --channels 320 --size 256 --steps 1500 \
#       --mixed-precision bf16 --gradient-checkpointing
set -uo pipefail
cd "$(dirname "$0")/.."
C="$(python tests/host.py --find)"
[ -n "$C" ] || { python tests/host.py --why; exit 1; }
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for mode in "" "--lowvram" "--novram"; do
  name=${mode#--}; name=${name:-normal}
  timeout 240 python bench/memory_modes.py --comfyui $C --out "$OUT/mode_$name.pt" -- $mode 2>&1 | grep -E "^mode|Error"
done
python bench/memory_modes.py --compare "$OUT/mode_normal.pt" "$OUT/mode_lowvram.pt" "$OUT/mode_novram.pt"
timeout 420 python bench/dressing_bench.py --comfyui $C --dtype float16 --sizes 768x576,512x384,1024x768 \
  --garments 1,2,4,6 --rows 2,8 --steps 30 --repeats 3 2>&1 | grep -v "it/s"
