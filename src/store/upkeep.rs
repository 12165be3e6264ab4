//! What keeps the tables small and the figures cheap: retention of
//! processed events, purging of expired idempotency keys, and the counts
//! the status page and `/metrics` show, exact up to a cap and estimated
//! from PostgreSQL's statistics above it.

use std::time::Duration;

use uuid::Uuid;

use crate::store::rfc3339;
use crate::store::{Error, Store};

/// Counts up to this many rows are exact; above it they are estimates
/// from PostgreSQL's statistics, so that reading them stays cheap however
/// large the tables grow.
pub const EXACT_UP_TO: i64 = 10_000;

/// A row count: exact up to [`EXACT_UP_TO`], estimated above.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// The number of rows.
    pub value: i64,
    /// True when `value` is an estimate (the exact count passed the cap).
    pub estimated: bool,
}

impl Count {
    /// An exact count.
    pub fn exact(value: i64) -> Count {
        Count {
            value,
            estimated: false,
        }
    }

    /// An estimate, never below the cap it is known to exceed.
    fn estimate(value: i64) -> Count {
        Count {
            value: value.max(EXACT_UP_TO + 1),
            estimated: true,
        }
    }
}

/// Events by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Waiting to be processed.
    pub pending: Count,
    /// Done.
    pub processed: Count,
    /// Given up on.
    pub failed: Count,
}

/// The outbox as `/metrics` and the status page show it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxFigures {
    /// Rows waiting to be published.
    pub rows: Count,
    /// Age in seconds of the row the relay claims next (the lowest id), if
    /// any.
    pub oldest_age: Option<f64>,
}

/// Estimates the counts by status that passed the cap. `capped[i]` is the
/// count of status `i` stopped at `EXACT_UP_TO + 1` rows, `live` the
/// table's live rows from PostgreSQL's statistics and `freqs[i]` the share
/// of the status from the planner's statistics (the last `ANALYZE`). When
/// only one status passed the cap, it is the live rows less the exact
/// others, which follows the table closely; when several did, each is its
/// share of the live rows.
pub fn estimate_counts(capped: [i64; 3], live: Option<i64>, freqs: [Option<f64>; 3]) -> [Count; 3] {
    let over: Vec<usize> = (0..3).filter(|&i| capped[i] > EXACT_UP_TO).collect();
    let live = live.unwrap_or(0);
    let mut counts = capped.map(Count::exact);
    match over.as_slice() {
        [] => {}
        [only] => {
            let others: i64 = (0..3).filter(|i| i != only).map(|i| capped[i]).sum();
            counts[*only] = Count::estimate(live - others);
        }
        several => {
            for &i in several {
                let share = freqs[i].unwrap_or(0.0);
                counts[i] = Count::estimate((live as f64 * share).round() as i64);
            }
        }
    }
    counts
}

/// A failed event as the status page lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedEvent {
    /// The event's id.
    pub id: Uuid,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Why it failed.
    pub last_error: Option<String>,
}

impl Store {
    /// The outbox backlog, cheap at any size: rows counted up to the cap
    /// (through the primary key), beyond it PostgreSQL's live-row count
    /// (`n_live_tup`, which follows inserts and deletes within a second or
    /// so); the age of the lowest id through the primary key.
    pub fn outbox_figures(&self) -> Result<OutboxFigures, Error> {
        let row = self.conn()?.query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) capped), \
                    (SELECT n_live_tup FROM pg_stat_user_tables \
                     WHERE relid = 'outbox'::regclass), \
                    (SELECT extract(epoch FROM now() - created_at)::float8 \
                     FROM outbox ORDER BY id LIMIT 1)",
            &[&(EXACT_UP_TO + 1)],
        )?;
        let capped: i64 = row.get(0);
        let rows = if capped > EXACT_UP_TO {
            Count::estimate(row.get::<_, Option<i64>>(1).unwrap_or(0))
        } else {
            Count::exact(capped)
        };
        Ok(OutboxFigures {
            rows,
            oldest_age: row.get(2),
        })
    }

    /// Deletes up to `limit` processed events older than `age`, and any
    /// outbox row left for them (a re-publish after a relay crash); returns
    /// how many events. Rows another transaction holds are skipped, not
    /// waited for.
    pub fn delete_expired(&self, age: Duration, limit: i64) -> Result<u64, Error> {
        let row = self.conn()?.query_one(
            "WITH gone AS (DELETE FROM events WHERE id IN (SELECT id FROM events \
               WHERE status = 'processed' AND processed_at < now() - make_interval(secs => $1) \
               LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id), \
             rows AS (DELETE FROM outbox WHERE event_id IN (SELECT id FROM gone)) \
             SELECT count(*) FROM gone",
            &[&age.as_secs_f64(), &limit],
        )?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Events by status, cheap at any size: each status is counted up to
    /// the cap through its partial index; above it, see
    /// [`estimate_counts`]. The planner's shares are read only then.
    pub fn count_by_status(&self) -> Result<StatusCounts, Error> {
        let mut conn = self.conn()?;
        let row = conn.query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'pending' LIMIT $1) p), \
                    (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'processed' LIMIT $1) d), \
                    (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'failed' LIMIT $1) f), \
                    (SELECT n_live_tup FROM pg_stat_user_tables \
                     WHERE relid = 'events'::regclass)",
            &[&(EXACT_UP_TO + 1)],
        )?;
        let capped: [i64; 3] = [row.get(0), row.get(1), row.get(2)];
        let mut freqs = [None; 3];
        if capped.iter().filter(|&&c| c > EXACT_UP_TO).count() > 1 {
            for r in conn.query(
                "SELECT m.v, m.f::float8 FROM pg_stats s, \
                 unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS m(v, f) \
                 WHERE s.schemaname = current_schema() AND s.tablename = 'events' \
                 AND s.attname = 'status'",
                &[],
            )? {
                let i = match r.get::<_, &str>(0) {
                    "pending" => 0,
                    "processed" => 1,
                    "failed" => 2,
                    _ => continue,
                };
                freqs[i] = Some(r.get(1));
            }
        }
        let [pending, processed, failed] = estimate_counts(capped, row.get(3), freqs);
        Ok(StatusCounts {
            pending,
            processed,
            failed,
        })
    }

    /// The most recently created failed events, through the partial index
    /// on failed events.
    pub fn recent_failed(&self, limit: i64) -> Result<Vec<FailedEvent>, Error> {
        let rows = self.conn()?.query(
            concat!(
                "SELECT id, ",
                rfc3339!("created_at"),
                ", last_error FROM events WHERE status = 'failed' ",
                "ORDER BY created_at DESC LIMIT $1"
            ),
            &[&limit],
        )?;
        Ok(rows
            .iter()
            .map(|r| FailedEvent {
                id: r.get(0),
                created_at: r.get(1),
                last_error: r.get(2),
            })
            .collect())
    }

    /// Deletes idempotency keys older than `ttl`, at most `limit` of them;
    /// returns how many.
    pub fn purge_idempotency_keys(&self, ttl: Duration, limit: i64) -> Result<u64, Error> {
        Ok(self.conn()?.execute(
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&ttl.as_secs_f64(), &limit],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: i64 = EXACT_UP_TO + 1;

    #[test]
    fn counts_under_the_cap_are_exact() {
        let [p, d, f] = estimate_counts([3, 0, EXACT_UP_TO], Some(99), [None; 3]);
        assert_eq!(
            (p, d, f),
            (Count::exact(3), Count::exact(0), Count::exact(EXACT_UP_TO))
        );
    }

    #[test]
    fn one_status_over_the_cap_is_the_rest_of_the_live_rows() {
        let [p, d, f] = estimate_counts([5, CAP, 2], Some(1_000_000), [None; 3]);
        assert_eq!(p, Count::exact(5));
        assert_eq!(f, Count::exact(2));
        assert_eq!(d.value, 1_000_000 - 7);
        assert!(d.estimated);
        // Statistics that lag behind never bring an estimate under the cap.
        let [_, d, _] = estimate_counts([5, CAP, 2], Some(40), [None; 3]);
        assert_eq!(d, Count::estimate(CAP));
        assert_eq!(d.value, CAP);
    }

    #[test]
    fn several_over_the_cap_share_the_live_rows() {
        let freqs = [Some(0.25), Some(0.75), None];
        let [p, d, f] = estimate_counts([CAP, CAP, 9], Some(2_000_000), freqs);
        assert_eq!((p.value, p.estimated), (500_000, true));
        assert_eq!((d.value, d.estimated), (1_500_000, true));
        assert_eq!(f, Count::exact(9));
        // Without statistics all that is known is that the cap was passed.
        let [p, _, _] = estimate_counts([CAP, CAP, 0], None, [None; 3]);
        assert_eq!((p.value, p.estimated), (CAP, true));
    }
}
