//! What the API writes: new events and their outbox rows in one
//! transaction, in two statements whatever the batch size, and the
//! idempotent variant that replays or refuses what an `Idempotency-Key` or
//! a client-chosen id already stored.

use std::collections::HashSet;
use std::time::Duration;

use postgres::Transaction;
use postgres::error::SqlState;
use postgres::types::{Json, ToSql};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::api::auth::Scope;
use crate::store::{Conn, Error, Store, Wakeup};
use crate::trace::TraceContext;

/// The stored CloudEvents attribute (not one a CloudEvent can have: its
/// name holds an underscore) that says the payload is a string holding the
/// event's data in base64.
pub const BASE64_MARKER: &str = "data_base64";

/// An event validated by the API, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Its id, chosen before the write so the answer can carry it.
    pub id: Uuid,
    /// The client's payload.
    pub payload: Value,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// A key for the consumer's use (ordering, partitioning).
    pub key: Option<String>,
    /// The client chose `id`: if it is already stored, this is a replay
    /// (same content) or a conflict (different content), not an error.
    pub client_id: bool,
    /// A CloudEvent's context attributes (its trace context apart), part of
    /// its content; `None` for a plain event.
    pub attributes: Option<Map<String, Value>>,
    /// The trace context the event was accepted with; the API gives every
    /// event one.
    pub trace: Option<TraceContext>,
}

/// One ingest request, written all or nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The events, in the request's order.
    pub events: Vec<NewEvent>,
    /// The body was an array, even of one event: its answer is a batch's,
    /// and its `Idempotency-Key` stands for the whole list.
    pub batch: bool,
    /// The request's `Idempotency-Key`, in its client's scope.
    pub idempotency_key: Option<IdempotencyKey>,
}

/// An `Idempotency-Key` and the scope of the client that sent it: the same
/// key sent with another API key is another key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Whose key it is.
    pub scope: Scope,
    /// The header's value, visible ASCII (so without a space).
    pub key: String,
}

impl IdempotencyKey {
    /// The key as `idempotency_keys.key` holds it: the key alone in the
    /// open scope, which is how every earlier version stored every key, so
    /// that they and this one agree on open deployments; otherwise the
    /// scope, a space and the key. A client's key holds no space, so a key
    /// of one scope can never be taken for another's, nor for an open one.
    pub fn stored(&self) -> String {
        if self.scope.is_open() {
            self.key.clone()
        } else {
            format!("{} {}", self.scope.as_str(), self.key)
        }
    }
}

impl Submission {
    /// True when some event's id was chosen by the client.
    pub fn has_client_ids(&self) -> bool {
        self.events.iter().any(|e| e.client_id)
    }

    /// True when the submission must be checked against earlier ones, in a
    /// transaction of its own; otherwise it may share a group commit.
    pub fn is_idempotent(&self) -> bool {
        self.idempotency_key.is_some() || self.has_client_ids()
    }
}

/// What became of a submission written with [`Store::insert_idempotent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Every event is stored: `created[i]` tells whether `ids[i]` was
    /// created now (`false`: an earlier request stored the same event).
    Stored {
        /// Event ids in the request's order.
        ids: Vec<Uuid>,
        /// Which ones this request created.
        created: Vec<bool>,
    },
    /// The `Idempotency-Key` was used before for a different body.
    KeyConflict,
    /// The event at this index has a client id (the `Uuid`) already used
    /// for different content.
    IdConflict(usize, Uuid),
}

impl Store {
    /// Writes events and their outbox rows in one statement whatever the
    /// batch size, which is its own transaction: one round trip to the
    /// server instead of four (`BEGIN`, two inserts, `COMMIT`), and it
    /// returns once committed. The commit wakes the relays as `wakeup`
    /// says: the statement carries the `NOTIFY`, or this process's relay
    /// is nudged once it returns. Ids must be new.
    pub fn insert_events(&self, events: &[&NewEvent], wakeup: &Wakeup) -> Result<(), Error> {
        let columns = Columns::of(events.iter().copied());
        let mut conn = self.conn()?;
        let mut params = columns.insert_params().to_vec();
        let channel;
        // Prepared once per connection: the statements of the hot paths
        // cost the server no parse or plan after the first time.
        let insert = match wakeup {
            Wakeup::Local(_) => conn.prepare_cached(INSERT_PLAIN)?,
            Wakeup::Notify => {
                channel = self.notify_channel();
                params.push(&channel);
                conn.prepare_cached(INSERT_NOTIFYING)?
            }
        };
        conn.execute(&insert, &params)?;
        wakeup.nudge();
        Ok(())
    }

    /// Writes a submission that carries client ids or an idempotency key,
    /// all or nothing, in a transaction of its own. A key younger than
    /// `key_ttl`, or a client id already stored, with the same content is a
    /// replay: nothing is written and the stored ids are returned. The same
    /// key or id with different content is a conflict and writes nothing.
    ///
    /// The key is checked first and stands for the whole body: a live key
    /// answers for every event, whatever their ids. A new key is claimed,
    /// and the events are then written as without one (client ids replayed
    /// or refused), in the same transaction, so a refused request does not
    /// use its key up. Unique constraints decide every race: a concurrent
    /// replay waits for the first writer's transaction and then sees its
    /// rows.
    pub fn insert_idempotent(
        &self,
        submission: &Submission,
        key_ttl: Duration,
        wakeup: &Wakeup,
    ) -> Result<Written, Error> {
        let mut conn = self.conn()?;
        // A row seen as a conflict can vanish (an expired key purged, an
        // event deleted by retention) before it is read, and concurrent
        // writers of the same ids can deadlock despite the sorted inserts
        // (PostgreSQL then cancels one): start again in either case.
        for _ in 0..3 {
            match self.try_insert_idempotent(&mut conn, submission, key_ttl, wakeup) {
                Ok(Some(written)) => return Ok(written),
                Ok(None) => {}
                Err(Error::Db(e)) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contended)
    }

    /// One attempt of `insert_idempotent`; `None` means start again.
    fn try_insert_idempotent(
        &self,
        conn: &mut Conn,
        submission: &Submission,
        key_ttl: Duration,
        wakeup: &Wakeup,
    ) -> Result<Option<Written>, Error> {
        let mut tx = conn.transaction()?;
        let columns = Columns::of(submission.events.iter());
        if let Some(written) = claim_key(&mut tx, submission, &columns, key_ttl)? {
            return Ok(Some(written));
        }
        // Rows go in id order, so that two batches sharing ids lock them in
        // the same order and one waits for the other instead of deadlocking.
        let inserted: Vec<Uuid> = tx
            .query(
                &format!("{INSERT_EVENTS} ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id"),
                &columns.insert_params(),
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let new: HashSet<&Uuid> = inserted.iter().collect();
        // An id given twice (a CloudEvent batch may repeat an event) was
        // created at most once, by its first item.
        let mut first = HashSet::new();
        let created: Vec<bool> = columns
            .ids
            .iter()
            .map(|id| first.insert(id) && new.contains(id))
            .collect();
        if created.iter().any(|c| !*c) {
            // Some ids exist: each must hold exactly this item's content,
            // compared as the idempotency fingerprint compares it (jsonb
            // text: key order and spacing do not matter; numbers compare by
            // their stored digits, so 1, 1.0 and 1.00 differ while 1e2 and
            // 100 do not). A CloudEvent's attributes are content too; the
            // trace context is not. NULL means the row is gone.
            let rows = tx.query(
                "SELECT m.ord::int, CASE WHEN e.id IS NULL THEN NULL ELSE \
                        e.payload::text = m.payload::text \
                        AND e.type IS NOT DISTINCT FROM m.type \
                        AND e.key IS NOT DISTINCT FROM m.key \
                        AND e.attributes::text IS NOT DISTINCT FROM m.attributes::text END \
                 FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[], $5::jsonb[]) \
                      WITH ORDINALITY AS m(id, payload, type, key, attributes, ord) \
                 LEFT JOIN events e ON e.id = m.id \
                 WHERE NOT (m.id = ANY($6)) ORDER BY m.ord",
                &[
                    &columns.ids,
                    &columns.payloads,
                    &columns.types,
                    &columns.keys,
                    &columns.attributes,
                    &inserted,
                ],
            )?;
            let mut vanished = false;
            for row in &rows {
                let (ord, same): (i32, Option<bool>) = (row.get(0), row.get(1));
                match same {
                    Some(true) => {}
                    Some(false) => {
                        let index = ord as usize - 1;
                        return Ok(Some(Written::IdConflict(index, columns.ids[index])));
                    }
                    None => vanished = true,
                }
            }
            if vanished {
                return Ok(None);
            }
        }
        tx.execute(
            "INSERT INTO outbox (event_id) SELECT unnest($1::uuid[])",
            &[&inserted],
        )?;
        self.commit_waking(tx, wakeup, !inserted.is_empty())?;
        Ok(Some(Written::Stored {
            ids: columns.ids,
            created,
        }))
    }
}

/// The insert of events, from one array per column ([`Columns::insert_params`]).
macro_rules! insert_events {
    () => {
        "INSERT INTO events \
         (id, payload, type, key, attributes, traceparent, tracestate) \
         SELECT * FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[], $5::jsonb[], \
         $6::text[], $7::text[]) AS m"
    };
}

/// [`insert_events!`] as a constant, for the statements built at run time.
const INSERT_EVENTS: &str = insert_events!();

/// Events and their outbox rows in one statement: the events' insert runs
/// as a data-modifying `WITH`, which PostgreSQL runs to completion whether
/// or not the outer insert reads it, and the outbox rows follow the ids'
/// order, as the relay publishes them.
macro_rules! insert_with_outbox {
    () => {
        concat!(
            "WITH e AS (",
            insert_events!(),
            ") INSERT INTO outbox (event_id) SELECT unnest($1::uuid[])"
        )
    };
}

/// [`insert_with_outbox!`], for a relay in this process.
const INSERT_PLAIN: &str = insert_with_outbox!();

/// [`insert_with_outbox!`] with a `NOTIFY` on the channel `$8`, sent with
/// the commit: the outer insert reads the one row of the notification.
const INSERT_NOTIFYING: &str = concat!(insert_with_outbox!(), " FROM (SELECT pg_notify($8, '')) n");

/// Events as the columns of an `unnest` insert.
struct Columns<'a> {
    ids: Vec<Uuid>,
    payloads: Vec<&'a Value>,
    types: Vec<Option<&'a str>>,
    keys: Vec<Option<&'a str>>,
    attributes: Vec<Option<Json<&'a Map<String, Value>>>>,
    traceparents: Vec<Option<&'a str>>,
    tracestates: Vec<Option<&'a str>>,
    /// The ids the client chose, `None` for generated ones: part of what
    /// an idempotency key's fingerprint covers.
    client_ids: Vec<Option<Uuid>>,
}

impl<'a> Columns<'a> {
    fn of(events: impl Iterator<Item = &'a NewEvent>) -> Columns<'a> {
        let mut c = Columns {
            ids: Vec::new(),
            payloads: Vec::new(),
            types: Vec::new(),
            keys: Vec::new(),
            attributes: Vec::new(),
            traceparents: Vec::new(),
            tracestates: Vec::new(),
            client_ids: Vec::new(),
        };
        for e in events {
            c.ids.push(e.id);
            c.payloads.push(&e.payload);
            c.types.push(e.event_type.as_deref());
            c.keys.push(e.key.as_deref());
            c.attributes.push(e.attributes.as_ref().map(Json));
            let trace = e.trace.as_ref();
            c.traceparents.push(trace.map(|t| t.traceparent.as_str()));
            c.tracestates
                .push(trace.and_then(|t| t.tracestate.as_deref()));
            c.client_ids.push(e.client_id.then_some(e.id));
        }
        c
    }

    /// The parameters of [`insert_events!`] (`$1` to `$7`).
    fn insert_params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.ids,
            &self.payloads,
            &self.types,
            &self.keys,
            &self.attributes,
            &self.traceparents,
            &self.tracestates,
        ]
    }
}

// SHA-256 of a body's normalised content (jsonb sorts keys, drops
// insignificant whitespace and writes numbers in plain decimal, keeping the
// digits after the point that were sent), over $2 to $6: the payloads,
// types, keys, client-chosen ids (NULL for generated ones) and CloudEvents
// attributes in the request's order. One event hashes `[payload, type,
// key, id]`, as keys stored by earlier versions did, with its attributes
// appended when it has some; a batch hashes `{"batch": [[payload, type,
// key, id(, attributes)], ...]}`, so order matters, and a body of one event
// and a batch of that event differ.
const FINGERPRINT_ONE: &str = "sha256(convert_to((jsonb_build_array(($2::jsonb[])[1], \
                               ($3::text[])[1], ($4::text[])[1], ($5::uuid[])[1]) || \
                               CASE WHEN ($6::jsonb[])[1] IS NULL THEN '[]'::jsonb \
                               ELSE jsonb_build_array(($6::jsonb[])[1]) END)::text, 'UTF8'))";
const FINGERPRINT_BATCH: &str = "sha256(convert_to(jsonb_build_object('batch', \
                                 (SELECT jsonb_agg((jsonb_build_array(p, t, k, i) || \
                                 CASE WHEN a IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(a) END) \
                                 ORDER BY o) \
                                 FROM unnest($2::jsonb[], $3::text[], $4::text[], $5::uuid[], \
                                 $6::jsonb[]) WITH ORDINALITY AS m(p, t, k, i, a, o)))::text, 'UTF8'))";

/// Claims the submission's `Idempotency-Key`, if it has one, for its
/// events. `None`: there is no key, or it is now ours (new or expired), and
/// the caller writes the events. `Some`: the key is live, and this is a
/// replay of the whole original answer or a conflict; nothing was written.
fn claim_key(
    tx: &mut Transaction<'_>,
    submission: &Submission,
    columns: &Columns<'_>,
    key_ttl: Duration,
) -> Result<Option<Written>, Error> {
    let (Some(key), Some(first)) = (&submission.idempotency_key, columns.ids.first()) else {
        return Ok(None);
    };
    let key = key.stored();
    let fingerprint = if submission.batch {
        FINGERPRINT_BATCH
    } else {
        FINGERPRINT_ONE
    };
    let content: [&(dyn ToSql + Sync); 6] = [
        &key,
        &columns.payloads,
        &columns.types,
        &columns.keys,
        &columns.client_ids,
        &columns.attributes,
    ];
    // A batch's row keeps every id in `event_ids`; `event_id` holds the
    // first, so that a row always names an event (and a process of an
    // earlier version, which reads only `event_id`, sees a conflict).
    let event_ids = submission.batch.then_some(&columns.ids);
    // On conflict the existing row is locked even when the WHERE fails, so
    // it cannot be purged before it is read below.
    let claimed = tx.query_opt(
        &format!(
            "INSERT INTO idempotency_keys (key, event_id, event_ids, fingerprint) \
             VALUES ($1, $7, $8, {fingerprint}) \
             ON CONFLICT (key) DO UPDATE SET event_id = EXCLUDED.event_id, \
                 event_ids = EXCLUDED.event_ids, fingerprint = EXCLUDED.fingerprint, \
                 created_at = now() \
             WHERE idempotency_keys.created_at < now() - make_interval(secs => $9) \
             RETURNING 1"
        ),
        &[&content[..], &[first, &event_ids, &key_ttl.as_secs_f64()]].concat(),
    )?;
    if claimed.is_some() {
        return Ok(None);
    }
    let row = tx.query_one(
        &format!(
            "SELECT coalesce(event_ids, ARRAY[event_id]), fingerprint = {fingerprint} \
             FROM idempotency_keys WHERE key = $1"
        ),
        &content,
    )?;
    Ok(Some(if row.get::<_, bool>(1) {
        let ids: Vec<Uuid> = row.get(0);
        Written::Stored {
            created: vec![false; ids.len()],
            ids,
        }
    } else {
        Written::KeyConflict
    }))
}
