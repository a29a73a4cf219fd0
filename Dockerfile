# syntax=docker/dockerfile:1
#
# One image with the three binaries of the workspace: command-service, projection-service and
# bank (the CLI). docker-compose.yml picks the binary per service.
#
#   docker build -t bank-es .
#   docker run --rm bank-es bank --help
#
# Stages:
#   toolchain  Rust plus the native build dependencies of rdkafka (librdkafka is compiled from
#              source by its `cmake-build` feature: cmake, a C/C++ compiler, OpenSSL, zlib, and
#              curl's headers, which its cmake build includes).
#   skeleton   the workspace reduced to what decides the dependency build: every manifest, the
#              lock file and stub sources. Its output only changes when a manifest or the lock
#              file changes, so the next stage's dependency layer stays cached across code edits
#              (the idea of cargo-chef, without installing it). New workspace members are picked
#              up by the glob.
#   builder    builds the dependencies against the skeleton (cached layer), then the real code,
#              with the same `cargo build --release --locked` as everywhere else.
#   runtime    debian:bookworm-slim with the shared libraries the binaries link (OpenSSL, zlib),
#              CA certificates and curl (for compose health checks), running as a non-root user
#              with /data for the SQLite read model (mount a volume there).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS toolchain
# Unpinned on purpose: bookworm's security updates replace these versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cmake g++ make pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src

FROM toolchain AS skeleton
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.toml Cargo.lock /skeleton/; \
    for manifest in */Cargo.toml; do \
        crate="${manifest%/Cargo.toml}"; \
        mkdir -p "/skeleton/$crate/src"; \
        cp "$manifest" "/skeleton/$crate/"; \
        echo 'fn main() {}' > "/skeleton/$crate/src/main.rs"; \
        echo '//! Dependency-layer stub.' > "/skeleton/$crate/src/lib.rs"; \
    done

FROM toolchain AS builder
# The packages whose binaries ship; `bench` and test-only code are not built.
ARG PACKAGES="-p command-service -p projection-service -p cli"
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked ${PACKAGES} \
    && rm -rf ./*/src
COPY . .
# COPY keeps the files' modification times, which may be older than the stub build: touch the
# sources so that cargo rebuilds the workspace crates instead of keeping the stubs.
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked ${PACKAGES} \
    && mkdir -p /out \
    && cp target/release/command-service target/release/projection-service target/release/bank /out/

FROM ${RUNTIME_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 curl zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bank \
    && useradd --system --uid 10001 --gid bank --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin bank \
    && mkdir -p /data \
    && chown bank:bank /data
COPY --from=builder /out/ /usr/local/bin/
# The read model (PROJECTION_DATABASE_URL=sqlite:///data/projection.db) lives here. No VOLUME:
# that would give every container (the CLI's, command-service's) an anonymous volume; mount a
# named volume at /data where it matters (compose does for projection-service). RUST_LOG is not
# set here either: the services default to `info,rdkafka=warn` and the deployment decides.
WORKDIR /data
USER 10001:10001
ENV PROJECTION_DATABASE_URL=sqlite:///data/projection.db
EXPOSE 8080 8090
CMD ["command-service"]
