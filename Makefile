# `make test` is the whole suite: it installs what the tests need, checks formatting, lints
# and docs, runs unit and end-to-end tests (real registry, real containerd; needs root for
# containerd and for the full-disk test's tmpfs), renders and validates the Helm chart
# against the real binary, then runs every fuzz target for a few seconds.
.PHONY: test deps lint chart fuzz bench run
SHELL := /bin/bash

# Seconds each fuzz target runs in `make test`; longer runs: `make fuzz FUZZ_SECONDS=600`.
FUZZ_SECONDS ?= 8
FUZZ_TARGETS = reference digest range www_authenticate manifest route token_response tag_entry origins media_type pins

test: deps lint
	cargo test --all-targets
	$(MAKE) chart
	$(MAKE) fuzz

deps:
	./tests/install-deps.sh

lint:
	cargo fmt --all -- --check
	cargo fmt --manifest-path fuzz/Cargo.toml -- --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

chart:
	cargo build --quiet
	PULLCACHE_BIN=target/debug/pullcache python3 tests/chart/test_chart.py

# Each target starts from its committed corpus (fuzz/corpus/TARGET, read only); what it
# finds goes to a temp dir, and a crash fails the run with the input in fuzz/artifacts/.
fuzz:
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		out=$$(mktemp -d) && \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t $$out corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) 2>&1 | \
			grep -E 'Done [0-9]+ runs|ERROR|panicked|SUMMARY|Test unit written'; \
		status=$${PIPESTATUS[0]}; rm -rf $$out; [ $$status -eq 0 ] || exit $$status; \
	done

# The benchmark harness against nginx and distribution (see BENCHMARKS.md); `bench/run` for
# the full mode.
bench:
	bench/run --quick

run:
	cargo run --release -- serve
