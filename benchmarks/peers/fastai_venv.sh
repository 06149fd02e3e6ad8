#!/usr/bin/env bash
# Create (idempotently) a scratch venv with fastai for the peer benchmarks in this folder.
#
# fastai is NOT a dependency of disttrain: it lives in its own venv, outside the repo.
#
#   bash benchmarks/peers/fastai_venv.sh            # default: ~/.cache/disttrain/peer-fastai
#   PEER_FASTAI_VENV=/tmp/pf bash benchmarks/peers/fastai_venv.sh
#   "$(bash benchmarks/peers/fastai_venv.sh --print-python)" benchmarks/peers/fastai_mnist.py ...
#
# Environment:
#   PEER_FASTAI_VENV     venv path (default ~/.cache/disttrain/peer-fastai)
#   PEER_PYTHON          interpreter used to create it (default python3)
#   PEER_FASTAI_SPEC     fastai requirement (default "fastai>=2.8,<2.9")
#   PEER_FASTAI_NODEPS   1: always install fastai with --no-deps plus the dependencies that
#                        `import fastai.vision.all` needs (no spacy); default: only when a normal
#                        install cannot be resolved with torch==2.14.1 (fastai 2.8.12 declares
#                        torch<3, so the normal install works and also pulls spacy, unused here)
#   PEER_FORCE           1: reinstall even if the venv already checks out
#
# torch/torchvision are pinned with a constraints file for every pip call, so pip can never
# replace them with another build.
set -euo pipefail

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
VENV="${PEER_FASTAI_VENV:-$HOME/.cache/disttrain/peer-fastai}"
PY="${PEER_PYTHON:-python3}"
FASTAI_SPEC="${PEER_FASTAI_SPEC:-fastai>=2.8,<2.9}"

if [[ "${1:-}" == "--print-python" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

# Everything fastai.vision.all imports, besides torch/torchvision (checked by importing it and
# listing sys.modules: spacy is imported only by fastai.text).
VISION_DEPS=(
    "fastcore>=2.2.22" "fasttransform>=0.0.3" "plum-dispatch<2.10" "fastprogress>=0.2.4"
    "fastdownload>=0.0.8,<2" pandas scikit-learn scipy matplotlib "pillow>=9.0.0" pyyaml
    requests packaging cloudpickle
)

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF'
import sys
import torch, torchvision
import fastai
from fastai.vision.all import ImageDataLoaders, vision_learner  # noqa: F401
tv, tvv = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == tv, f"torch {torch.__version__} != {tv}"
assert torchvision.__version__.split("+")[0] == tvv, f"torchvision {torchvision.__version__} != {tvv}"
EOF
}

versions() {
    "$VENV/bin/python" - <<'EOF'
import sys, importlib.metadata as md
print(f"venv:        {sys.prefix}")
print(f"python:      {sys.version.split()[0]}")
for name in ["torch", "torchvision", "fastai", "fastcore", "fasttransform", "plum-dispatch",
             "fastprogress", "fastdownload", "numpy", "pandas", "scikit-learn", "scipy",
             "matplotlib", "pillow", "spacy"]:
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        v = "(not installed)"
    print(f"{name + ':':<14}{v}")
import torch
print(f"torch cuda build: {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
EOF
}

if [[ "${PEER_FORCE:-0}" != "1" && -x "$VENV/bin/python" ]] && check 2>/dev/null; then
    echo "fastai peer venv already set up at $VENV"
    versions
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

CONS="$(mktemp)"
trap 'rm -f "$CONS"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$CONS"

PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip wheel
"${PIP[@]}" install -c "$CONS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

nodeps_install() {
    "${PIP[@]}" install -c "$CONS" "${VISION_DEPS[@]}"
    "${PIP[@]}" install --no-deps "$FASTAI_SPEC"
}

if [[ "${PEER_FASTAI_NODEPS:-0}" == "1" ]]; then
    nodeps_install
elif ! "${PIP[@]}" install -c "$CONS" "$FASTAI_SPEC"; then
    echo "fastai ($FASTAI_SPEC) does not resolve together with torch==$TORCH_VERSION;" \
         "installing it with --no-deps and its vision dependencies by hand" >&2
    nodeps_install
fi

check
versions
