#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs torch and the Python references once,
# then formats-checks, lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
softalign_install_test_requirements requirements-test.txt
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast 2>&1 | tee "${SOFTALIGN_TEST_LOG:-/tmp/softalign-test.log}"
echo "softalign: lint + tests took $(( $(date +%s) - start )) s"
