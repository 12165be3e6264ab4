# ingestd: build, run, check and operate. `make test` is the test command.

CARGO ?= cargo
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
export INGEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
STATIC_TARGET ?= $(shell rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl && echo x86_64-unknown-linux-musl || echo x86_64-unknown-linux-gnu)

.PHONY: build run migrate test lint static up down logs docker-check bench bench-smoke stress stress-smoke chaos chaos-smoke cluster-chaos cluster-chaos-smoke fuzz clean fuzz-smoke schemathesis docs

build:
	$(CARGO) build --release --locked

run:
	$(CARGO) run --release --locked --bin ingestd

migrate:
	$(CARGO) run --release --locked --bin ingestd -- migrate

# Lint, docs and the whole test suite, against PostgreSQL on 127.0.0.1:5432
# and RabbitMQ on 127.0.0.1:5672; then the unit tests of the vendored
# tiny_http and amiquip (patched dependencies, not workspace members).
test: lint
	$(CARGO) test --locked
	$(CARGO) test --locked --manifest-path vendor/tiny_http/Cargo.toml --lib --target-dir target
	$(CARGO) test --locked --manifest-path vendor/amiquip/Cargo.toml --lib --target-dir target

lint:
	$(CARGO) fmt -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps
	$(COMPOSE) -f docker-compose.yml config --quiet
	cd fuzz && $(CARGO) fmt -- --check && $(CARGO) clippy --bins -- -D warnings

# Writes the generated docs again (docs/configuration.md, from the table in
# src/config.rs); `make test` fails while they are stale.
docs:
	UPDATE_DOCS=1 $(CARGO) test --locked --test it docs::

# A statically linked, stripped release binary: musl when its target is
# installed, otherwise glibc linked with crt-static.
static:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked --bin ingestd --target $(STATIC_TARGET)
	@file target/$(STATIC_TARGET)/release/ingestd | tee /dev/stderr | grep -q 'static' || (echo "not statically linked" >&2; exit 1)
	@ls -l target/$(STATIC_TARGET)/release/ingestd | awk '{ printf "size: %.2f MB\n", $$5 / 1048576 }'

up:
	$(COMPOSE) up -d --build
	@echo "API on http://localhost:5001, RabbitMQ UI on http://localhost:15672 (ingest/ingest)"

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs -f

# What `make up` builds, checked without a Docker engine: every COPY source
# exists and the crate made of them alone compiles.
docker-check:
	tests/dockerfile_check.sh

bench:
	tests/bench.sh

bench-smoke:
	BENCH_SMOKE=1 BENCH_OUT=target/bench-smoke.json tests/bench.sh

# Load test of a running ingestd; the script builds the load generator.
stress:
	./stress_test.sh $(ARGS)

# stress_test.sh with 2,000 events against an all-in-one ingestd started on
# a free port, with its own schema and queues, and removed afterwards.
stress-smoke:
	tests/stress_smoke.sh

# Restarts the shared PostgreSQL and RabbitMQ: run it alone.
chaos:
	tests/chaos.sh

# The same faults in about a quarter of the time, for CI; run it alone too.
chaos-smoke:
	CHAOS_SMOKE=1 tests/chaos.sh

# Beside the shared services, which it leaves alone: a 3-node RabbitMQ
# cluster and a PostgreSQL primary with a synchronous standby, on their own
# ports, and 2 api, 2 relay and 2 worker processes; kills the queue's leader
# node, the queues' majority, the primary and one process of each role under
# load, then checks every accepted event. Run it alone, as root.
cluster-chaos:
	tests/cluster_chaos.sh

# The same faults with shorter pauses and 100 events/s for 75 s.
cluster-chaos-smoke:
	CLUSTER_CHAOS_SMOKE=1 tests/cluster_chaos.sh

# Fuzzes request parsing and validation, and the framing decision, for
# FUZZ_SECONDS each (nightly and cargo-fuzz required).
FUZZ_SECONDS ?= 60
fuzz:
	cd fuzz && $(CARGO) +nightly fuzz run ingest_request -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536
	cd fuzz && $(CARGO) +nightly fuzz run http_framing -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096

# The fuzzers for a few seconds each, so that they keep building and running.
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=10

# openapi.yaml against a live server with schemathesis (--checks all).
schemathesis:
	tests/schemathesis.sh

clean:
	$(CARGO) clean
