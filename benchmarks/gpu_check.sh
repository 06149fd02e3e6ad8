#!/usr/bin/env bash
# The GPU check (one script, < 10 minutes, on a CUDA machine with no network):
#   bash benchmarks/gpu_check.sh [IMAGE_FOLDER]
# Installs disttrain into a venv that reuses the machine's torch, builds a ~5,000-image JPEG folder
# (the ants/bees photos repeated, or IMAGE_FOLDER/train), prepares shards, then prints:
# ResNet-50 training images/s (bf16, channels_last, batch 256) on device-resident synthetic data
# (the ceiling) and through the real pipeline from shards (CPU decode, then nvJPEG decode),
# DeviceAugment images/s and its share of a step, and the batched decoder's images/s; first, what
# train.precision=auto picks on each card; last, benchmarks/overhead.py: disttrain's training loop
# against a bare DDP loop on the same processes (ResNet-50, 224 px, bf16, channels_last, 256 per GPU;
# the published single-A100 figure for this model is about 2,500 images/s in mixed precision).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/disttrain-gpu-check}
mkdir -p "$OUT"
nvidia-smi -L

# -- install (offline): reuse the machine's torch/torchvision, add disttrain without resolving deps
if ! python3 -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu_check: this machine's python3 has no torch; install torch and torchvision first" >&2
    exit 1
fi
python3 -m venv --system-site-packages "$OUT/venv"
PY="$OUT/venv/bin/python"
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD"
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("accelerate", "yaml", "tqdm", "PIL", "numpy", "matplotlib") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    "$PY" -m pip install --quiet $missing 2>/dev/null || { echo "gpu_check: missing modules: $missing (no network?)" >&2; exit 1; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
# what train.precision=auto picks on each card, from that card's own facts (disttrain/dist/precision.py)
"$PY" - <<'EOF'
import torch
from disttrain.dist.precision import device_facts, resolve_precision
for i in range(torch.cuda.device_count()):
    device = torch.device("cuda", i)
    print(f"cuda:{i}: {device_facts(device)} -> auto = {resolve_precision('auto', device).mode}")
EOF

# -- data: IMAGE_FOLDER/train, or ../shared's photos repeated 20 times (symlinks) as train and valid
SRC=${1:-}
if [ -z "$SRC" ]; then
    PHOTOS=../shared/data/hymenoptera/train
    [ -d "$PHOTOS" ] || { echo "gpu_check: give an image folder (no ../shared/data/hymenoptera here)" >&2; exit 1; }
    SRC="$OUT/photos"
    rm -rf "$SRC"
    for split in train valid; do
        for cls in "$PHOTOS"/*/; do
            name=$(basename "$cls")
            mkdir -p "$SRC/$split/$name"
            reps=$([ "$split" = train ] && echo 20 || echo 1)
            for i in $(seq 1 "$reps"); do
                for f in "$cls"*; do ln -s "$(readlink -f "$f")" "$SRC/$split/$name/r${i}_$(basename "$f")"; done
            done
        done
    done
fi
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
time "$PY" -m disttrain.cli prepare "$SRC" "$OUT/shards" --presize 256 --workers "$(nproc)" --no-progress

# -- figures
"$PY" benchmarks/augment.py --batch 256 --size 224 --steps 30
timeout 240 "$PY" benchmarks/gpu_throughput.py --shards "$OUT/shards" --batch 256 --workers "$WORKERS" --decode cpu --steps 30
timeout 180 "$PY" benchmarks/gpu_throughput.py --shards "$OUT/shards" --batch 256 --workers "$WORKERS" --decode gpu --steps 30
GPUS=$(nvidia-smi -L | grep -c '^GPU')
timeout 300 "$PY" benchmarks/overhead.py --case resnet50 --nproc "$GPUS" --folder "$SRC" --shards "$OUT/shards" --epochs 3
