#!/usr/bin/env bash
# The prepared GPU check (issue 18), one command for a session with a lent device: parity of
# SD3, UNet, CLIP, T5 and the VAE in f32 / bf16 / f16 against diffusers and transformers on the
# GPU, then an SD3-medium-shaped and an SD1.5-shaped training and sampling step in softalign and
# in PyTorch + diffusers side by side (scripts/gpu_check.py says what and how).
#
#   scripts/gpu-check.sh [--out DIR] [--bin target/release/softalign] [--device cuda] [--smoke]
#
# The device machine has torch with CUDA but no Rust: build here, carry the release binary; the
# binary finds libtorch through LD_LIBRARY_PATH at the torch that python3 imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
out=gpu-check
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
exec "$PY" scripts/gpu_check.py --out "$out" "${args[@]}"
