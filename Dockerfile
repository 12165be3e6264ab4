# ingestd: a static musl binary on an empty image.
#
#   docker build --build-arg INGESTD_GIT_REVISION=$(git rev-parse --short=12 HEAD) -t ingestd .

FROM rust:1.95-alpine AS build
# On Alpine the native target is x86_64-unknown-linux-musl, linked
# statically by default: no C library is needed at run time.
RUN apk add --no-cache musl-dev
WORKDIR /src
ARG INGESTD_GIT_REVISION=""
ENV INGESTD_GIT_REVISION=${INGESTD_GIT_REVISION}
COPY Cargo.toml Cargo.lock build.rs schema.sql ./
COPY src ./src
COPY vendor ./vendor
COPY examples ./examples
RUN cargo build --release --locked --bin ingestd \
 && cp target/release/ingestd /ingestd

FROM scratch
COPY --from=build /ingestd /ingestd
# nobody:nogroup; the binary needs no file system access at all.
USER 65534:65534
ENV INGEST_HTTP_ADDR=0.0.0.0:5001
EXPOSE 5001
ENTRYPOINT ["/ingestd"]
# The image has no shell and no curl, so the binary probes itself:
# `ingestd healthcheck` GETs /readyz on INGEST_HTTP_ADDR (over loopback)
# within 1 s and exits 0 only on a 200. The relay and worker roles serve no
# HTTP; run them with the check off (`--no-healthcheck`, or Compose's
# `healthcheck: disable: true`).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/ingestd", "healthcheck"]
