-- ingestd schema. Applied idempotently at start-up and by `ingestd migrate`,
-- inside the schema named by INGEST_DB_SCHEMA (the search_path is set to it).

-- Every accepted event. A row is written in the same transaction as its
-- outbox row, and its status changes only inside a worker transaction.
CREATE TABLE IF NOT EXISTS events (
    id           uuid        PRIMARY KEY,
    payload      jsonb       NOT NULL,
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'processed', 'failed')),
    attempts     integer     NOT NULL DEFAULT 0,
    -- Committed processings; anything above 1 would be a double processing.
    processed_count integer  NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);

-- Events waiting to be published. The relay's claim deletes the rows it
-- takes, in a transaction that commits only after the broker confirmed
-- their messages.
CREATE TABLE IF NOT EXISTS outbox (
    id         bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- No foreign key to events: every row is written in the transaction that
-- writes (or retries) its event, and checking one cost an index lookup and
-- a row lock on the event per insert. Retention deletes the rows of the
-- events it deletes, and the relay drops a row whose event is gone.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_fkey;

CREATE INDEX IF NOT EXISTS outbox_event_id_idx ON outbox (event_id);

-- Retention deletes processed events by age.
CREATE INDEX IF NOT EXISTS events_processed_at_idx ON events (processed_at)
    WHERE status = 'processed';

-- When an attempt last failed (or the sweeper last re-sent the event); the
-- sweeper re-sends pending events idle for longer than INGEST_REDELIVER_AFTER.
ALTER TABLE events ADD COLUMN IF NOT EXISTS attempted_at timestamptz;

-- Pending events by age, for the sweeper; small, since events leave it once
-- processed or failed.
CREATE INDEX IF NOT EXISTS events_pending_idx ON events (created_at)
    WHERE status = 'pending';

-- Failed events by age: the status page lists the latest and counts them
-- (up to a cap) without scanning the table.
CREATE INDEX IF NOT EXISTS events_failed_idx ON events (created_at)
    WHERE status = 'failed';

-- What the client says the event is, and a key for the consumer's own use
-- (ordering, partitioning); both optional and both travel in the message.
ALTER TABLE events ADD COLUMN IF NOT EXISTS type text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS key text;

-- Idempotency-Key headers seen within INGEST_IDEMPOTENCY_TTL. The primary
-- key makes concurrent replays race-safe: one insert wins, the others wait
-- for it and then find its row. The fingerprint (SHA-256 of the body's
-- normalised content) tells a replay from a different request reusing the
-- key. Expired rows are replaced on conflict and purged in the background.
-- With API keys, `key` holds the client's scope (32 hex digits of a SHA-256
-- of its API key, never the key), a space and the header's value, so each
-- API key has keys of its own; without, the header's value alone, as every
-- earlier version stored it. A header value holds no space, so the two
-- forms never meet, and the table needs no other column: a process of an
-- earlier version still runs against it unchanged.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         text        PRIMARY KEY,
    event_id    uuid        NOT NULL,
    fingerprint bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx
    ON idempotency_keys (created_at);

-- A batch sent with an Idempotency-Key: its event ids in the request's
-- order, which a replay answers with (event_id holds the first). NULL for a
-- single event, whose id is event_id. Added in place, so a deployment's
-- existing keys stay valid.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS event_ids uuid[];

-- Outbox rows the broker refused (a nack): how often, and not to be claimed
-- again before not_before, so that one message the broker will not take is
-- retried with backoff and, after a few refusals, fails its event, instead
-- of failing every batch that holds it. Added in place.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS not_before timestamptz;

-- A CloudEvent's context attributes (specversion, id, source, type and the
-- optional and extension attributes; `data_base64: true` when the payload
-- is its data in base64), NULL for a plain event; and the W3C trace
-- context every event is accepted with. Added in place: a process of an
-- earlier version ignores them.
ALTER TABLE events ADD COLUMN IF NOT EXISTS attributes jsonb;
ALTER TABLE events ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS tracestate text;
