#!/usr/bin/env bash
# `make demo`: builds softalign (release) and runs the shapes-world demo: SoftREPA and AGSM soft
# tokens trained on the shipped MMDiT base (assets/shapes-mmdit), all three evaluated on the
# held-out prompts; the table prints at the end and report.md + grids land in runs/demo-<time>.
# Arguments pass through to `softalign demo` (see `softalign demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release
exec target/release/softalign demo "$@"
