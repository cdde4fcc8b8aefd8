# `make test` is the whole suite: it installs what the tests need, checks formatting and
# lints, then runs unit and end-to-end tests (real registry, real containerd; needs root for
# containerd).
.PHONY: test deps lint run

test: deps lint
	cargo test --all-targets

deps:
	./tests/install-deps.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

run:
	cargo run --release -- serve
