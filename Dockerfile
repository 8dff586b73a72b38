# Hearth's container image. Untested here (no container registry is reachable from the machines
# this project is built on): a minimal, conventional build, kept so deploy/kubernetes/ has an image
# to name. Models are mounted at /models, never baked in; the ledger goes to /data.
#
#   docker build -t hearth:cpu .
#   docker build -t hearth:cuda --build-arg FEATURES=cuda \
#       --build-arg BUILD_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04 \
#       --build-arg RUN_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 .
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUN_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG FEATURES=""
# The CUDA images carry no Rust toolchain.
RUN command -v cargo >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal)
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY kernels kernels
COPY benches benches
RUN cargo build --release --bin hearth ${FEATURES:+--features ${FEATURES}}

FROM ${RUN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --create-home hearth
COPY --from=build /src/target/release/hearth /usr/local/bin/hearth
USER 10001
WORKDIR /data
VOLUME ["/models", "/data"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/hearth"]
CMD ["serve", "--config", "/etc/hearth/hearth.toml"]
