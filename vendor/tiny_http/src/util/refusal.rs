//! ingestd patch: the library's own refusals of a request or a connection,
//! as values. What a refusal looks like on the wire (status aside) is the
//! application's choice: `Limits::refusal` renders it, and the library only
//! marks the response as the connection's last and writes it.

use std::io::{Cursor, Result as IoResult, Write};

use crate::common::HTTPVersion;
use crate::{Header, Response};

/// Why the server itself refused a request or a connection, before any
/// handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `400`: the request's head or its body's framing is malformed.
    BadRequest(String),
    /// `408`: the head or the body did not arrive in time.
    Timeout(String),
    /// `431`: the head is larger than `Limits::max_head_bytes` or has more
    /// than `Limits::max_headers` lines.
    HeadTooLarge(String),
    /// `501`: a transfer coding the server does not implement.
    NotImplemented(String),
    /// `503`: the budget of buffered bodies (`Limits::buffer_budget`) is
    /// spent for now.
    Busy(String),
    /// `503`: `Limits::max_connections` connections are open already.
    TooManyConnections(usize),
    /// `503`: the server is shutting down; no handler will see the request.
    ShuttingDown,
}

impl Refusal {
    /// The status code the refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Timeout(_) => 408,
            Refusal::HeadTooLarge(_) => 431,
            Refusal::NotImplemented(_) => 501,
            Refusal::Busy(_) | Refusal::TooManyConnections(_) | Refusal::ShuttingDown => 503,
        }
    }

    /// A sentence saying what was refused and why.
    pub fn detail(&self) -> String {
        match self {
            Refusal::BadRequest(d)
            | Refusal::Timeout(d)
            | Refusal::HeadTooLarge(d)
            | Refusal::NotImplemented(d)
            | Refusal::Busy(d) => d.clone(),
            Refusal::TooManyConnections(n) => {
                format!("the server already has {} connections open", n)
            }
            Refusal::ShuttingDown => "the server is shutting down".to_owned(),
        }
    }
}

/// Renders a refusal as a response; `Limits::refusal`.
pub type RefusalHook = fn(&Refusal) -> Response<Cursor<Vec<u8>>>;

/// The rendering used when the application sets none: the status and the
/// detail as plain text.
pub fn plain_refusal(refusal: &Refusal) -> Response<Cursor<Vec<u8>>> {
    Response::from_string(refusal.detail())
        .with_status_code(refusal.status())
        .with_header(Header::from_bytes("Content-Type", "text/plain; charset=utf-8").unwrap())
}

/// Renders `refusal` with `hook`, marks it as the connection's last
/// (`Connection: close`) and writes and flushes it as HTTP/1.1.
pub(crate) fn write_refusal<W: Write>(
    hook: RefusalHook,
    refusal: &Refusal,
    mut writer: W,
) -> IoResult<()> {
    hook(refusal)
        .closing()
        .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::{plain_refusal, write_refusal, Refusal};

    #[test]
    fn a_refusal_is_written_closing_with_its_status() {
        let mut out = Vec::new();
        write_refusal(plain_refusal, &Refusal::TooManyConnections(3), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{}", text);
        assert!(text.contains("\r\nConnection: close\r\n"), "{}", text);
        assert!(text.contains("\r\nContent-Length: 41\r\n"), "{}", text);
        assert!(text.ends_with("\r\n\r\nthe server already has 3 connections open"));
    }

    #[test]
    fn the_hook_decides_the_body() {
        fn json(refusal: &Refusal) -> crate::Response<std::io::Cursor<Vec<u8>>> {
            crate::Response::from_string(format!("{{\"status\":{}}}", refusal.status()))
                .with_status_code(refusal.status())
        }
        let mut out = Vec::new();
        write_refusal(json, &Refusal::Timeout("slow".into()), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 408 "), "{}", text);
        assert!(text.ends_with("\r\n\r\n{\"status\":408}"), "{}", text);
    }
}
