# syntax=docker/dockerfile:1
#
# onrec container image.
#
#   docker build -t onrec:latest .          (BuildKit is required for the cache mounts)
#   docker run --rm -p 8080:8080 -p 50051:50051 onrec:latest
#
# Stage 1 compiles the release binary; stage 2 is a slim Debian runtime that holds only
# the binary, CA certificates and an unprivileged user.

# ---------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

WORKDIR /app

# The whole workspace is needed: the root manifest declares the bench target and the
# proto crate's build.rs compiles proto/ (with protox, so no protoc is installed here).
COPY Cargo.toml Cargo.lock ./
COPY src/ src/
COPY crates/ crates/
COPY proto/ proto/
COPY benches/ benches/
COPY tests/ tests/

# The cache mounts keep downloaded crates and compiled dependencies across builds. Their
# contents are not part of the image layer, so the binary is copied out of the cached
# target dir in the same RUN step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/app/target \
    cargo build --release --locked --bin onrec \
 && install -D -m 0755 /app/target/release/onrec /out/onrec

# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# CA certificates for outbound TLS (e.g. a managed Redis later); nothing else is needed
# at run time. There is no curl here, hence no HEALTHCHECK: Kubernetes probes /healthz
# and /readyz itself. ca-certificates is left unpinned on purpose: it should follow
# Debian's security updates whenever the image is rebuilt.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 onrec \
 && useradd --system --uid 10001 --gid onrec --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin onrec

COPY --from=builder /out/onrec /usr/local/bin/onrec

# Numeric uid:gid so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# Listen on all interfaces inside the container (the binary's defaults are the same;
# stated here so the image documents itself) and log JSON for log collectors.
ENV ONREC_HTTP_ADDR=0.0.0.0:8080 \
    ONREC_GRPC_ADDR=0.0.0.0:50051 \
    ONREC_LOG_FORMAT=json

# 8080: HTTP API, /healthz, /readyz, /metrics, /openapi.json.  50051: gRPC.
EXPOSE 8080 50051

ENTRYPOINT ["/usr/local/bin/onrec"]
CMD ["serve"]
