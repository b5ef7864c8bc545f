# otp-gateway (and otp-sim, the provider simulators): build with the Rust toolchain, run on a
# slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY config config
COPY src src
RUN cargo build --release --locked --bin otp-gateway --bin otp-sim

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/otp-gateway --create-home otp
COPY --from=build /src/target/release/otp-gateway /usr/local/bin/otp-gateway
# The provider simulators of the local stack (docker-compose.yml's otp-sim service).
COPY --from=build /src/target/release/otp-sim /usr/local/bin/otp-sim
USER otp
WORKDIR /var/lib/otp-gateway
# Listening on every interface of the container: API keys are on (auth.mode = "keys", the
# default; "none" is refused off loopback). The first key comes from a bootstrap admin key the
# operator gives: OTP_GATEWAY_AUTH__BOOTSTRAP_ADMIN_KEY, or a secret file named by
# OTP_GATEWAY_AUTH__BOOTSTRAP_ADMIN_KEY_FILE. There is no built-in one.
ENV OTP_GATEWAY_GRPC__LISTEN=0.0.0.0:50051 \
    OTP_GATEWAY_RECEIPTS__LISTEN=0.0.0.0:8088 \
    OTP_GATEWAY_OPS__LISTEN=0.0.0.0:9090 \
    OTP_GATEWAY_STORE__URL=sqlite:///var/lib/otp-gateway/ledger.db \
    OTP_GATEWAY_PROVIDERS__SANDBOX__OUTBOX=/var/lib/otp-gateway/outbox.jsonl
EXPOSE 50051 8088 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["otp-gateway", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["otp-gateway"]
CMD ["serve"]
