# Build: docker build -t pullcache .
# The final image is debian-slim rather than distroless or scratch: the binary links glibc
# (ring and the system roots via rustls-native-certs) and wants /etc/ssl/certs for the
# public registries.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Everything the manifest names: the library and binary sources, and the benches (Cargo
# refuses a manifest whose [[bench]] files are missing, even to build the binary alone).
# tests/e2e/image.rs builds from exactly these lines.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY src src
COPY benches benches
RUN cargo build --release --locked && strip target/release/pullcache

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --no-create-home pullcache \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/pullcache
COPY --from=build /src/target/release/pullcache /usr/local/bin/pullcache
# Non-root by default, with the cache directory CMD names its own (a volume mounted there
# takes its place). The chart runs it as root because it writes hostPaths
# (/var/lib/pullcache, /etc/containerd/certs.d); every capability is still dropped there.
USER 65532
ENTRYPOINT ["/usr/local/bin/pullcache"]
CMD ["serve", "--listen", "127.0.0.1:5000", "--cache-dir", "/var/lib/pullcache"]
