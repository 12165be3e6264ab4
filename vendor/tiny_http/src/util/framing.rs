//! ingestd patch: how a request's body is framed, decided once from its
//! head, strictly as RFC 9112 §6 asks of a server that may sit behind a
//! proxy.
//!
//! A front proxy and this server must agree on where a request ends, or a
//! client can hide a second request inside the first one's body (request
//! smuggling). Every head whose framing two implementations could read
//! differently is refused here, before any of its body is read, and the
//! connection then closes: conflicting or malformed `Content-Length`
//! values, a `Transfer-Encoding` whose final coding is not `chunked`, both
//! headers together, and `Transfer-Encoding` on HTTP/1.0. A coding other
//! than `chunked` is understood but not implemented (`501`). `Upgrade` plays
//! no part: the server never switches protocols, so an upgrade request is
//! framed and answered like any other.

use crate::common::{HTTPVersion, Header};

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length` and no `Transfer-Encoding`).
    Empty,
    /// Exactly this many bytes follow the head.
    Length(usize),
    /// Chunked transfer coding up to its last chunk and trailers.
    Chunked,
}

/// Why a head's framing is refused; the connection closes after the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// Ambiguous or malformed framing: `400`.
    BadRequest(&'static str),
    /// A transfer coding the server does not implement: `501`.
    NotImplemented(String),
}

impl Framing {
    /// The body's framing, from every `Content-Length` and
    /// `Transfer-Encoding` header of the head.
    pub fn of(version: &HTTPVersion, headers: &[Header]) -> Result<Framing, FramingError> {
        let values = |name: &'static str| {
            headers
                .iter()
                .filter(move |h| h.field.equiv(name))
                .map(|h| h.value.as_str())
        };
        let mut transfer_encoding = values("Transfer-Encoding").peekable();
        let mut content_length = values("Content-Length").peekable();

        if transfer_encoding.peek().is_some() {
            if *version < HTTPVersion(1, 1) {
                return Err(FramingError::BadRequest(
                    "Transfer-Encoding is not allowed in an HTTP/1.0 request",
                ));
            }
            if content_length.peek().is_some() {
                return Err(FramingError::BadRequest(
                    "a request must not have both Content-Length and Transfer-Encoding",
                ));
            }
            return chunked(transfer_encoding);
        }
        match content_length.peek() {
            None => Ok(Framing::Empty),
            Some(_) => length(content_length).map(Framing::Length),
        }
    }

    /// The announced length, for a `Content-Length` body.
    pub fn length(&self) -> Option<usize> {
        match *self {
            Framing::Length(length) => Some(length),
            Framing::Empty | Framing::Chunked => None,
        }
    }

    /// True if the request has a body that is not empty, or may have one.
    pub fn has_body(&self) -> bool {
        match *self {
            Framing::Empty | Framing::Length(0) => false,
            Framing::Length(_) | Framing::Chunked => true,
        }
    }
}

/// The elements of comma-separated header values, trimmed of optional
/// whitespace, with empty elements ignored as RFC 9110 §5.6.1 asks.
fn list_elements<'a>(values: impl Iterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    values
        .flat_map(|value| value.split(','))
        .map(|element| element.trim_matches([' ', '\t']))
        .filter(|element| !element.is_empty())
}

fn chunked<'a>(values: impl Iterator<Item = &'a str>) -> Result<Framing, FramingError> {
    let codings: Vec<String> = list_elements(values)
        .map(|coding| coding.to_ascii_lowercase())
        .collect();
    match codings.last().map(String::as_str) {
        None => {
            return Err(FramingError::BadRequest(
                "the Transfer-Encoding header names no transfer coding",
            ))
        }
        Some("chunked") => (),
        Some(_) => {
            return Err(FramingError::BadRequest(
                "the final transfer coding of a request must be chunked",
            ))
        }
    }
    let others = &codings[..codings.len() - 1];
    if others.iter().any(|coding| coding == "chunked") {
        return Err(FramingError::BadRequest(
            "the chunked transfer coding is applied more than once",
        ));
    }
    match others.first() {
        Some(coding) => Err(FramingError::NotImplemented(format!(
            "the transfer coding {} is not supported; send the body chunked or with a Content-Length",
            coding.split(';').next().unwrap_or("").trim()
        ))),
        None => Ok(Framing::Chunked),
    }
}

/// The one length all `Content-Length` values agree on. Each must be one or
/// more digits: no sign, no spaces inside, nothing else. A list of equal
/// values (`13, 13`, what a proxy may make of two equal headers) is that
/// value, as RFC 9110 §8.6 allows; differing values are refused.
fn length<'a>(values: impl Iterator<Item = &'a str>) -> Result<usize, FramingError> {
    let mut agreed = None;
    for element in values.flat_map(|value| value.split(',')) {
        let element = element.trim_matches([' ', '\t']);
        if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FramingError::BadRequest(
                "the Content-Length header is not a valid number",
            ));
        }
        let length: usize = element.parse().map_err(|_| {
            FramingError::BadRequest("the Content-Length header is not a valid number")
        })?;
        match agreed {
            Some(previous) if previous != length => {
                return Err(FramingError::BadRequest(
                    "the request has Content-Length values that differ",
                ))
            }
            _ => agreed = Some(length),
        }
    }
    agreed.ok_or(FramingError::BadRequest(
        "the Content-Length header is not a valid number",
    ))
}

#[cfg(test)]
mod tests {
    use super::{Framing, FramingError};
    use crate::common::{HTTPVersion, Header};

    fn framing(version: (u8, u8), headers: &[(&str, &str)]) -> Result<Framing, FramingError> {
        let headers: Vec<Header> = headers
            .iter()
            .map(|(name, value)| Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap())
            .collect();
        Framing::of(&HTTPVersion::from(version), &headers)
    }

    fn bad(result: Result<Framing, FramingError>) -> bool {
        matches!(result, Err(FramingError::BadRequest(_)))
    }

    #[test]
    fn content_length() {
        assert_eq!(framing((1, 1), &[]), Ok(Framing::Empty));
        assert_eq!(framing((1, 1), &[("Content-Length", "13")]), Ok(Framing::Length(13)));
        assert_eq!(framing((1, 0), &[("content-length", "0")]), Ok(Framing::Length(0)));
        assert_eq!(framing((1, 1), &[("Content-Length", "13, 13")]), Ok(Framing::Length(13)));
        assert_eq!(
            framing((1, 1), &[("Content-Length", "13"), ("Content-Length", "13")]),
            Ok(Framing::Length(13))
        );
        for value in ["+13", "-1", "1_3", "0x0d", "13 1", "", " ", "13,", "1e3", "99999999999999999999999"] {
            assert!(bad(framing((1, 1), &[("Content-Length", value)])), "{value:?}");
        }
        assert!(bad(framing((1, 1), &[("Content-Length", "13"), ("Content-Length", "14")])));
        assert!(bad(framing((1, 1), &[("Content-Length", "13, 14")])));
    }

    #[test]
    fn transfer_encoding() {
        let te = |value| framing((1, 1), &[("Transfer-Encoding", value)]);
        assert_eq!(te("chunked"), Ok(Framing::Chunked));
        assert_eq!(te("Chunked"), Ok(Framing::Chunked));
        assert_eq!(te(" chunked ,"), Ok(Framing::Chunked));
        assert!(bad(te("chunked, gzip")));
        assert!(bad(te("identity")));
        assert!(bad(te("xchunked")));
        assert!(bad(te("chunked, chunked")));
        assert!(bad(te("")));
        assert!(bad(te(",")));
        assert_eq!(
            te("gzip, chunked"),
            Err(FramingError::NotImplemented(
                "the transfer coding gzip is not supported; send the body chunked or with a Content-Length".into()
            ))
        );
        // Several headers make one list.
        assert!(bad(framing(
            (1, 1),
            &[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip")]
        )));
        assert!(matches!(
            framing((1, 1), &[("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]),
            Err(FramingError::NotImplemented(_))
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(bad(framing(
            (1, 1),
            &[("Content-Length", "4"), ("Transfer-Encoding", "chunked")]
        )));
        assert!(bad(framing(
            (1, 1),
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "4")]
        )));
        assert!(bad(framing((1, 0), &[("Transfer-Encoding", "chunked")])));
    }

    #[test]
    fn upgrade_plays_no_part() {
        let headers = [
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("Content-Length", "13"),
        ];
        assert_eq!(framing((1, 1), &headers), Ok(Framing::Length(13)));
        assert_eq!(
            framing((1, 1), &[("Connection", "upgrade"), ("Upgrade", "websocket")]),
            Ok(Framing::Empty)
        );
    }
}
