# Build: docker build -t pullcache .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src src
RUN cargo build --release --locked && strip target/release/pullcache

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pullcache /usr/local/bin/pullcache
# The cache lives on a hostPath in the DaemonSet.
VOLUME /var/lib/pullcache
USER 0
ENTRYPOINT ["/usr/local/bin/pullcache"]
CMD ["serve", "--cache-dir", "/var/lib/pullcache"]
