# ingestd: build, run and check. `make test` is the test command.

CARGO ?= cargo
export INGEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres

.PHONY: build run test lint migrate clean

build:
	$(CARGO) build --release --locked

run:
	$(CARGO) run --release --locked

migrate:
	$(CARGO) run --release --locked -- migrate

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps

test: lint
	$(CARGO) test --locked

clean:
	$(CARGO) clean
