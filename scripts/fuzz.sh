#!/usr/bin/env bash
# Fuzzes the readers of untrusted bytes (safetensors headers and shard indexes, recipes with
# `extends` and `--set`, the torch pickle reader and its zip, tokenizer files, images, model
# configs) for MINUTES in all, split evenly over the targets, with fresh random seeds, and
# prints how many inputs each target tried. A failure prints the smallest failing input
# proptest found; keep it as a case in tests/fuzz/hostile.rs once fixed.
#
#   scripts/fuzz.sh 30             # 30 minutes over every target
#   scripts/fuzz.sh 5 pickle       # 5 minutes on one target (a name under tests/fuzz/mod.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:?usage: scripts/fuzz.sh MINUTES [TARGET]}"
target="${2:-}"
# shellcheck source=/dev/null
source scripts/env.sh
targets=(safetensors weight_index pickle torch_zip recipe recipe_set tokenizer image config)
[ -n "$target" ] && targets=("$target")
seconds=$(python3 -c "print($minutes * 60 / ${#targets[@]})")
# The test profile (the build `make test` already made): no second, release build.
cargo test --test codecs --no-run
failed=0
log=$(mktemp)
for t in "${targets[@]}"; do
    # One target at a time, on one test thread: the time is the target's alone.
    if SOFTALIGN_FUZZ_SECONDS="$seconds" cargo test --test codecs -q "fuzz::fuzz_::$t" \
        -- --exact --nocapture --test-threads=1 >"$log" 2>&1; then
        grep -E "^fuzz target" "$log"
    else
        echo "fuzz target $t FAILED:"
        grep -vE "^(running|test result|$)" "$log" | tail -40
        failed=1
    fi
done
if [ -z "$target" ]; then
    # The slow checks kept out of the suite (the largest image allowed, decoded in bounded time).
    if ! cargo test --test codecs -q fuzz::hostile -- --ignored >"$log" 2>&1; then
        cat "$log"
        failed=1
    fi
fi
rm -f "$log"
exit "$failed"
