# `make test` is the whole suite: it installs what the tests need, checks formatting, lints
# and docs, runs unit and end-to-end tests (real registry, real containerd; needs root for
# containerd), then renders and validates the Helm chart against the real binary.
.PHONY: test deps lint chart run

test: deps lint
	cargo test --all-targets
	$(MAKE) chart

deps:
	./tests/install-deps.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

chart:
	cargo build --quiet
	PULLCACHE_BIN=target/debug/pullcache python3 tests/chart/test_chart.py

run:
	cargo run --release -- serve
