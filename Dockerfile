# syntax=docker/dockerfile:1

# Build stage: compile the release binary.
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole tree (see .dockerignore), so every declared target (benches,
# tests) exists when cargo reads the manifest.
COPY . .
RUN cargo build --release --locked --bin carpool \
 && strip target/release/carpool

# Runtime stage: a small Debian with only CA certificates and the binary.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 carpool \
 && useradd --system --uid 10001 --gid carpool --home-dir /var/lib/carpool --shell /usr/sbin/nologin carpool \
 && mkdir -p /etc/carpool /var/lib/carpool \
 && chown carpool:carpool /var/lib/carpool
COPY --from=build /src/target/release/carpool /usr/local/bin/carpool
COPY config/carpool.toml /etc/carpool/carpool.toml

ENV CARPOOL_SERVER__LISTEN=0.0.0.0:8080 \
    CARPOOL_STORE__URL=sqlite:///var/lib/carpool/carpool.db
VOLUME ["/etc/carpool", "/var/lib/carpool"]
WORKDIR /var/lib/carpool
USER carpool
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/carpool"]
CMD ["serve", "--config", "/etc/carpool/carpool.toml"]
