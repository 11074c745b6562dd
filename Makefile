# The README's two commands. Each installs what it needs (torch 2.11.0 into a per-user cache,
# once per machine) and is safe to run again.
SHELL := /bin/bash

.PHONY: demo test build
demo:
	@bash scripts/demo.sh

test:
	@bash scripts/test.sh

build:
	@source scripts/env.sh && cargo build --release
