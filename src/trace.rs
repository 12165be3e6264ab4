//! W3C Trace Context (`traceparent`, `tracestate`): what the API reads from
//! a request or a CloudEvent, what it starts when there is none, and what
//! the relay and the workers pass on. Every event has a `traceparent`, so
//! that it can be followed from the client to the processor, and it keeps
//! the one it was accepted with through retries, replays and re-sends.
//!
//! ingestd does not record spans of its own: it passes the caller's trace
//! context on (as a proxy would; a later version's `traceparent` is kept
//! as version 00, the only one this code knows, and only a request's first
//! `traceparent` and `tracestate` headers are read) and starts a new one,
//! not sampled, for a request that brought none.

use uuid::Uuid;

/// Longest `tracestate` kept, in bytes (the limit the specification asks
/// vendors to propagate at least).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Most list members in a `tracestate`.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The trace context of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// A valid `traceparent`: `00-<trace-id>-<parent-id>-<flags>`.
    pub traceparent: String,
    /// A valid `tracestate`, when the caller sent one with its traceparent.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The caller's context when its `traceparent` is valid; a new trace
    /// otherwise. As the specification says, an invalid `traceparent` is
    /// not an error (it starts a new trace) and takes its `tracestate`
    /// with it; an invalid `tracestate` alone is dropped.
    pub fn from_caller(traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
        match traceparent.and_then(parse_traceparent) {
            Some(traceparent) => TraceContext {
                traceparent,
                tracestate: tracestate.and_then(parse_tracestate),
            },
            None => TraceContext::start(),
        }
    }

    /// A new trace: random trace and parent ids, not sampled.
    pub fn start() -> TraceContext {
        let trace_id = Uuid::new_v4().simple().to_string();
        let parent_id = &Uuid::new_v4().simple().to_string()[16..];
        TraceContext {
            traceparent: format!("00-{trace_id}-{parent_id}-00"),
            tracestate: None,
        }
    }
}

/// How a log line names an event: `event <id>`, then ` trace <trace-id>`
/// when it has one. The JSON log format lifts both into fields
/// (`event_id`, `trace_id`), so one event, or one trace, can be followed
/// through the relay and the workers.
pub struct Subject<'a>(pub Uuid, pub Option<&'a str>);

impl std::fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event {}", self.0)?;
        match self.1.and_then(trace_id) {
            Some(trace) => write!(f, " trace {trace}"),
            None => Ok(()),
        }
    }
}

/// The trace id (32 hex digits) of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.get(3..35)
}

/// A `traceparent` in the form this version of the specification defines,
/// normalised to it: for version `00` exactly `00-<32 hex>-<16 hex>-<2
/// hex>`, lower case, neither id all zeros. A later version may append
/// fields after the flags (`-...`); its first four are kept, as version 00,
/// which is what the specification asks of a reader of an unknown version.
pub fn parse_traceparent(value: &str) -> Option<String> {
    let value = value.trim_matches([' ', '\t']);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let version = value.get(..2)?;
    if !lower_hex(version, 2) || version == "ff" {
        return None;
    }
    let fields = value.get(..55)?;
    let rest = &value[55..];
    if version == "00" && !rest.is_empty() {
        return None;
    }
    if !rest.is_empty() && !rest.starts_with('-') {
        return None;
    }
    let parts: Vec<&str> = fields.split('-').collect();
    let [_, trace, parent, flags] = parts[..] else {
        return None;
    };
    let valid = lower_hex(trace, 32)
        && lower_hex(parent, 16)
        && lower_hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| format!("00-{trace}-{parent}-{flags}"))
}

/// A `tracestate` that follows the specification's grammar: up to
/// [`MAX_TRACESTATE_MEMBERS`] comma-separated `key=value` members (empty
/// ones allowed and dropped), keys unique, at most
/// [`MAX_TRACESTATE_BYTES`]. Returned as the members joined by commas.
pub fn parse_tracestate(value: &str) -> Option<String> {
    let mut members = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let (key, val) = member.split_once('=')?;
        if !valid_key(key) || !valid_value(val) || !keys.insert(key) {
            return None;
        }
        members.push(member);
    }
    let joined = members.join(",");
    let fits = !members.is_empty()
        && members.len() <= MAX_TRACESTATE_MEMBERS
        && joined.len() <= MAX_TRACESTATE_BYTES;
    fits.then_some(joined)
}

/// `simple-key` or `tenant-id@system-id`, as the grammar defines them.
fn valid_key(key: &str) -> bool {
    let part = |s: &str, max: usize, first_digit: bool| {
        let mut bytes = s.bytes();
        let first_ok = match bytes.next() {
            Some(b) => b.is_ascii_lowercase() || (first_digit && b.is_ascii_digit()),
            None => false,
        };
        first_ok
            && s.len() <= max
            && bytes.all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'-' | b'*' | b'/')
            })
    };
    match key.split_once('@') {
        Some((tenant, system)) => part(tenant, 241, true) && part(system, 14, false),
        None => part(key, 256, false),
    }
}

/// 1 to 256 printable ASCII characters but `,` and `=`, not ending in a
/// space.
fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparents() {
        assert_eq!(parse_traceparent(VALID).as_deref(), Some(VALID));
        assert_eq!(
            parse_traceparent(&format!(" {VALID}\t")).as_deref(),
            Some(VALID)
        );
        // A later version's extra fields are dropped; its first four kept.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-ever";
        assert_eq!(parse_traceparent(later).as_deref(), Some(VALID));
        for bad in [
            "",
            "00",
            &VALID.to_uppercase(),
            &format!("{VALID}-00"),
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn tracestates() {
        assert_eq!(
            parse_tracestate("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE,,").as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(
            parse_tracestate("tenant@vendor=x").as_deref(),
            Some("tenant@vendor=x")
        );
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        for bad in [
            "",
            "nokey",
            "Upper=1",
            "a=1,a=2",
            "a=b=c",
            "a=\u{7f}",
            &many.join(","),
            &format!("a={}", "x".repeat(600)),
        ] {
            assert_eq!(parse_tracestate(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn log_subjects_name_the_trace() {
        let id = Uuid::nil();
        assert_eq!(Subject(id, None).to_string(), format!("event {id}"));
        assert_eq!(
            Subject(id, Some(VALID)).to_string(),
            format!("event {id} trace 0af7651916cd43dd8448eb211c80319c")
        );
    }

    #[test]
    fn a_valid_caller_context_is_kept_and_an_invalid_one_replaced() {
        let kept = TraceContext::from_caller(Some(VALID), Some("a=1"));
        assert_eq!(kept.traceparent, VALID);
        assert_eq!(kept.tracestate.as_deref(), Some("a=1"));
        assert_eq!(
            trace_id(&kept.traceparent),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let new = TraceContext::from_caller(Some("nope"), Some("a=1"));
        assert_eq!(
            parse_traceparent(&new.traceparent).as_deref(),
            Some(&*new.traceparent)
        );
        assert!(new.traceparent.ends_with("-00") && new.tracestate.is_none());
        assert_ne!(TraceContext::start(), TraceContext::start());
        // A bad tracestate is dropped, the traceparent kept.
        assert_eq!(
            TraceContext::from_caller(Some(VALID), Some("=")).tracestate,
            None
        );
    }
}
