# syntax=docker/dockerfile:1.7
#
# mlaserve: OpenAI-compatible server for DeepSeek-style models.
#
#   docker build -t mlaserve .
#   docker run -p 8000:8000 mlaserve                         # serves the demo model in models/
#   docker run -p 8000:8000 -v /path/to/model:/model:ro mlaserve --model /model
#
# Arguments after the image name are added to `mlaserve --host 0.0.0.0 --port 8000` (a later flag
# wins, e.g. `--port 9000`); for another subcommand use `--entrypoint mlaserve`.
#
# Build arguments:
#   CARGO_FEATURES  cargo features of the server, e.g. "cuda" (empty: the CPU build)
#   RUST_IMAGE      the build stage's image; for CUDA one with the CUDA toolkit and Rust
#   RUNTIME_IMAGE   the final stage's image; for CUDA e.g. an nvidia/cuda *-runtime image
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
ARG CARGO_FEATURES=""
WORKDIR /src
COPY . .
# The registry and target folders are BuildKit caches: a rebuild after a source change compiles
# only what changed. The binary is copied out of the cache to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mlaserve --bin mlaserve --features "$CARGO_FEATURES" \
 && install -D -m 0755 target/release/mlaserve /out/mlaserve

FROM ${RUNTIME_IMAGE}
# A fixed, unprivileged user (Kubernetes' runAsNonRoot wants a numeric one).
RUN groupadd --system --gid 10001 mlaserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /opt/mlaserve --no-create-home \
        --shell /usr/sbin/nologin mlaserve
COPY --from=builder /out/mlaserve /usr/local/bin/mlaserve
# The demo model, served when no --model is given: the binary looks for it in the installed layout
# <bin>/../share/mlaserve/models/mlaserve-demo.
COPY models/ /usr/local/share/mlaserve/models/
WORKDIR /opt/mlaserve
USER 10001:10001
ENV RUST_LOG=info
EXPOSE 8000
# No curl in the image: bash speaks the one HTTP request of the check itself. /health answers 200
# as soon as the process listens, also while the model loads (readiness is /ready).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 4 status <&3 && [[ $status == *' 200 '* ]]"]
# SIGTERM drains: /ready turns 503, streams in flight finish within --shutdown-grace (30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mlaserve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
