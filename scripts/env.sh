# Sourced by the Makefile targets and .ci/run. Makes sure torch 2.11.0 (the libtorch that
# tch 0.24.0 binds) is installed once per machine in a per-user cache, then exports what the
# build needs. Idempotent and safe to run from several clones at once (flock).

SOFTALIGN_TORCH_VERSION=2.11.0
SOFTALIGN_CACHE="${SOFTALIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/softalign}"
_py="${SOFTALIGN_PYTHON:-python3}"
_pyver=$("$_py" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
SOFTALIGN_VENV="$SOFTALIGN_CACHE/torch-$SOFTALIGN_TORCH_VERSION-py$_pyver"
mkdir -p "$SOFTALIGN_CACHE"

_install_torch() {
    echo "softalign: installing torch $SOFTALIGN_TORCH_VERSION into $SOFTALIGN_VENV (once per machine, ~5 GB)" >&2
    rm -rf "$SOFTALIGN_VENV"
    "$_py" -m venv "$SOFTALIGN_VENV"
    "$SOFTALIGN_VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$SOFTALIGN_VENV/bin/python" -m pip install -q "torch==$SOFTALIGN_TORCH_VERSION" "numpy<3" >&2
    touch "$SOFTALIGN_VENV/.softalign-torch-ok"
}

(
    set -euo pipefail
    flock 9
    [ -f "$SOFTALIGN_VENV/.softalign-torch-ok" ] || _install_torch
) 9>"$SOFTALIGN_CACHE/.lock" || { echo "softalign: installing torch failed" >&2; return 1 2>/dev/null || exit 1; }

# Python reference packages for the parity tests (diffusers, transformers); only the test
# command asks for them.
softalign_install_test_requirements() {
    local req="$1"
    local stamp
    stamp="$SOFTALIGN_VENV/.req-$(sha256sum "$req" | cut -c1-16)"
    (
        set -euo pipefail
        flock 9
        if [ ! -f "$stamp" ]; then
            echo "softalign: installing Python test references from $req" >&2
            "$SOFTALIGN_VENV/bin/python" -m pip install -q -r "$req" >&2
            touch "$stamp"
        fi
    ) 9>"$SOFTALIGN_CACHE/.lock"
}

export PATH="$SOFTALIGN_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export SOFTALIGN_PYTHON="$SOFTALIGN_VENV/bin/python"
SOFTALIGN_TORCH_LIB="$("$SOFTALIGN_VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export SOFTALIGN_TORCH_LIB
# CUDA headers for the NCCL backend, where scripts/cuda-headers.sh fetched them.
if [ -f "$SOFTALIGN_CACHE/cuda-headers/.ok" ]; then
    export SOFTALIGN_CUDA_HEADERS="$SOFTALIGN_CACHE/cuda-headers"
fi
