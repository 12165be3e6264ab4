//! Rate limits per client (`INGEST_RATE_LIMIT`): a token bucket per API
//! key, or per client address when no keys are configured, counted in
//! events, so that a batch costs its size.
//!
//! A request is refused (`429` with `Retry-After`) on its head when its
//! client's bucket is empty, before any body byte is read; otherwise once
//! its events are counted, when the bucket holds fewer than that. A batch
//! larger than the burst passes only from a full bucket and leaves it in
//! debt, so the rate holds without such a batch being refused for ever.
//! Nothing is written for a refused request. This is the client's limit,
//! distinct from `503 busy`, which says the server itself is overloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::IpAddr;

use crate::api::auth::Scope;
use crate::ops::metrics::Metrics;

/// Most clients tracked at once; beyond it, full buckets are forgotten
/// (they would start full again anyway), then the stalest.
const MAX_CLIENTS: usize = 100_000;

/// A configured limit: `rate` events per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Events per second, on average.
    pub rate: f64,
    /// Events a client may send at once after a quiet spell.
    pub burst: f64,
}

impl RateLimit {
    /// Parses `off`, `<n>/s` or `<n>/s,burst=<m>` (the burst defaults to
    /// one second's worth).
    pub fn parse(s: &str) -> Result<Option<RateLimit>, String> {
        let s = s.trim();
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        let mut parts = s.split(',').map(str::trim);
        let rate = parts.next().unwrap_or("");
        let rate: f64 = rate
            .strip_suffix("/s")
            .and_then(|n| n.trim().parse().ok())
            .filter(|n: &f64| n.is_finite() && *n > 0.0)
            .ok_or_else(|| format!("{rate:?} is not a rate such as 1000/s"))?;
        let mut burst = rate.max(1.0);
        for part in parts {
            burst = part
                .strip_prefix("burst=")
                .and_then(|n| n.trim().parse().ok())
                .filter(|n: &f64| n.is_finite() && *n >= 1.0)
                .ok_or_else(|| format!("{part:?} is not burst=<events>, at least 1"))?;
        }
        Ok(Some(RateLimit { rate, burst }))
    }

    /// The `WebHook-Allowed-Rate` of the CloudEvents webhook handshake:
    /// requests per minute, here events per minute, at least 1.
    pub fn per_minute(&self) -> u64 {
        ((self.rate * 60.0).floor() as u64).max(1)
    }
}

/// A client's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Whom a request counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The bucket's key: the API key's scope (a digest, never the key), or
    /// the client's IP address.
    bucket: String,
    /// The label of its refusals in `/metrics`: the first 12 hex digits of
    /// the scope, or `address`, so that addresses do not become labels.
    label: String,
}

impl Client {
    /// The client with this API key's scope when keys are configured,
    /// else the one at this address (behind a proxy, every client is the
    /// proxy).
    pub fn new(scope: Option<Scope>, address: Option<IpAddr>) -> Client {
        match scope {
            Some(scope) if !scope.is_open() => Client {
                bucket: scope.as_str().to_string(),
                label: scope.as_str().chars().take(12).collect(),
            },
            _ => Client {
                bucket: address.map(bucket_of).unwrap_or_default(),
                label: "address".into(),
            },
        }
    }
}

/// The bucket of an address: the address itself for IPv4, its /64 for
/// IPv6, the block one host is given, so that a client cannot take a fresh
/// bucket with each of its addresses.
fn bucket_of(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The buckets of every client.
pub struct Limiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
    metrics: Option<Arc<Metrics>>,
}

impl Limiter {
    /// A limiter enforcing `limit`, counting refusals in `metrics`.
    pub fn new(limit: RateLimit, metrics: Option<Arc<Metrics>>) -> Limiter {
        Limiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// On a request's head: `Err(wait)` when the client has nothing left.
    pub fn check_client(&self, client: &Client) -> Result<(), Duration> {
        let result = self.check(&client.bucket);
        self.count(client, result)
    }

    /// Takes `events` from the client's bucket, or says how long until it
    /// could, taking nothing.
    pub fn take_client(&self, client: &Client, events: usize) -> Result<(), Duration> {
        let result = self.take(&client.bucket, events);
        self.count(client, result)
    }

    fn count(&self, client: &Client, result: Result<(), Duration>) -> Result<(), Duration> {
        if let (Err(_), Some(metrics)) = (&result, &self.metrics) {
            metrics.rate_limited(&client.label);
        }
        result
    }

    /// The limit it enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// `Err(wait)` when `client`'s bucket is empty.
    fn check(&self, client: &str) -> Result<(), Duration> {
        self.with_bucket(client, Instant::now(), |bucket, limit| {
            if bucket.tokens >= 1.0 {
                Ok(())
            } else {
                Err(wait(1.0 - bucket.tokens, limit.rate))
            }
        })
    }

    /// Takes `events` from `client`'s bucket, or says how long until it
    /// could (`Err(wait)`), taking nothing.
    fn take(&self, client: &str, events: usize) -> Result<(), Duration> {
        self.take_at(client, events, Instant::now())
    }

    fn take_at(&self, client: &str, events: usize, now: Instant) -> Result<(), Duration> {
        self.with_bucket(client, now, |bucket, limit| {
            let cost = events as f64;
            // A batch beyond the burst needs a full bucket, then owes the rest.
            let needed = cost.min(limit.burst);
            if bucket.tokens >= needed {
                bucket.tokens -= cost;
                Ok(())
            } else {
                Err(wait(needed - bucket.tokens, limit.rate))
            }
        })
    }

    fn with_bucket<T>(
        &self,
        client: &str,
        now: Instant,
        f: impl FnOnce(&mut Bucket, &RateLimit) -> T,
    ) -> T {
        let limit = self.limit;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(client) {
            forget(&mut buckets, &limit, now);
        }
        let bucket = buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate).min(limit.burst);
        bucket.updated = now;
        f(bucket, &limit)
    }
}

/// How long refilling `missing` tokens takes, rounded up to whole seconds
/// as `Retry-After` needs, at least one.
fn wait(missing: f64, rate: f64) -> Duration {
    Duration::from_secs(((missing / rate).ceil() as u64).max(1))
}

/// Drops the buckets that are full by now; if none is, the stalest half.
fn forget(buckets: &mut HashMap<String, Bucket>, limit: &RateLimit, now: Instant) {
    let full = |b: &Bucket| {
        b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * limit.rate
            >= limit.burst
    };
    buckets.retain(|_, b| !full(b));
    if buckets.len() >= MAX_CLIENTS {
        let mut ages: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
        ages.sort();
        let cut = ages[ages.len() / 2];
        buckets.retain(|_, b| b.updated > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(RateLimit::parse("off"), Ok(None));
        assert_eq!(RateLimit::parse(""), Ok(None));
        assert_eq!(
            RateLimit::parse("1000/s,burst=5000"),
            Ok(Some(RateLimit {
                rate: 1000.0,
                burst: 5000.0
            }))
        );
        assert_eq!(
            RateLimit::parse(" 0.5/s "),
            Ok(Some(RateLimit {
                rate: 0.5,
                burst: 1.0
            }))
        );
        for bad in [
            "1000",
            "x/s",
            "0/s",
            "-1/s",
            "10/s,burst=0",
            "10/s,size=3",
            "inf/s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad}");
        }
        let limit = RateLimit::parse("1000/s").unwrap().unwrap();
        assert_eq!(limit.per_minute(), 60_000);
    }

    #[test]
    fn an_ipv6_client_has_one_bucket_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Client::new(None, Some(a)), Client::new(None, Some(b)));
        assert_ne!(Client::new(None, Some(a)), Client::new(None, Some(c)));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(bucket_of(mapped), "192.0.2.7");
    }

    /// Ten events a second, twenty at once.
    fn limiter() -> Limiter {
        Limiter::new(
            RateLimit {
                rate: 10.0,
                burst: 20.0,
            },
            None,
        )
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = limiter();
        let t0 = Instant::now();
        assert_eq!(limiter.take_at("a", 15, t0), Ok(()));
        assert_eq!(limiter.take_at("a", 5, t0), Ok(()));
        // Empty: 10 events take a second to come back.
        assert_eq!(limiter.take_at("a", 10, t0), Err(Duration::from_secs(1)));
        // Another client is unaffected.
        assert_eq!(limiter.take_at("b", 20, t0), Ok(()));
        let later = t0 + Duration::from_millis(1000);
        assert_eq!(limiter.take_at("a", 10, later), Ok(()));
        assert_eq!(limiter.take_at("a", 1, later), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_batch_beyond_the_burst_passes_from_a_full_bucket_and_owes_the_rest() {
        let limiter = limiter();
        let t0 = Instant::now();
        assert_eq!(limiter.take_at("a", 50, t0), Ok(()));
        // 30 owed and 20 to refill: 5 seconds before the next full bucket.
        assert_eq!(limiter.take_at("a", 50, t0), Err(Duration::from_secs(5)));
        assert_eq!(
            limiter.take_at("a", 1, t0 + Duration::from_secs(3)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(
            limiter.take_at("a", 50, t0 + Duration::from_secs(5)),
            Ok(())
        );
    }
}
