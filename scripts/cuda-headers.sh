#!/bin/bash
# Fetches the two CUDA header wheels ProcessGroupNCCL.hpp needs beyond what the torch wheel
# installs (crt/host_config.h from nvidia-cuda-crt, nv/target from nvidia-cuda-cccl: the
# cuda-toolkit[crt,cccl] pins of torch 2.11.0+cu130's cuda-toolkit 13.0.2) into the per-user
# cache. scripts/env.sh then exports SOFTALIGN_CUDA_HEADERS, and the next build compiles
# softalign-distributed's NCCL backend. Only the build machine needs this; about 3 MB.
set -euo pipefail
source "$(dirname "$0")/env.sh"
dest="$SOFTALIGN_CACHE/cuda-headers"
if [ -f "$dest/.ok" ]; then
    echo "$dest"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$SOFTALIGN_PYTHON" -m pip download -q --no-deps -d "$tmp" \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 >&2
rm -rf "$dest" && mkdir -p "$dest"
for w in "$tmp"/*.whl; do
    "$SOFTALIGN_PYTHON" - "$w" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
done
cp -r "$tmp"/x/nvidia/cu13/include/. "$dest"/
touch "$dest/.ok"
echo "$dest"
