//! ingestd patch: the responses the library itself sends when it refuses a
//! request or a connection.

use std::io::{Result as IoResult, Write};
use std::time::SystemTime;

use httpdate::HttpDate;

use crate::common::StatusCode;

/// A response refusing a request, after which the connection closes.
///
/// It is written as `HTTP/1.1` with `Connection: close` and a JSON body
/// `{"error":"<code>","detail":"<detail>"}`.
pub struct ErrorResponse {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    pub retry_after: Option<u32>,
}

impl ErrorResponse {
    pub fn new(status: u16, code: &'static str, detail: String) -> ErrorResponse {
        ErrorResponse {
            status,
            code,
            detail,
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u32) -> ErrorResponse {
        self.retry_after = Some(seconds);
        self
    }

    pub fn bad_request(detail: &str) -> ErrorResponse {
        ErrorResponse::new(400, "bad_request", detail.to_owned())
    }

    pub fn request_timeout(detail: &str) -> ErrorResponse {
        ErrorResponse::new(408, "request_timeout", detail.to_owned())
    }

    pub fn not_implemented(detail: String) -> ErrorResponse {
        ErrorResponse::new(501, "not_implemented", detail)
    }

    pub fn header_too_large(detail: String) -> ErrorResponse {
        ErrorResponse::new(431, "header_too_large", detail)
    }

    pub fn busy(detail: &str) -> ErrorResponse {
        ErrorResponse::new(503, "busy", detail.to_owned()).with_retry_after(1)
    }

    pub fn too_many_connections(detail: String) -> ErrorResponse {
        ErrorResponse::new(503, "too_many_connections", detail).with_retry_after(1)
    }

    pub fn shutting_down() -> ErrorResponse {
        ErrorResponse::new(
            503,
            "unavailable",
            "the server is shutting down; nothing was written, retry".to_owned(),
        )
        .with_retry_after(1)
    }

    /// The same as a `Response`, for a request that has been handed out.
    pub fn into_response(self) -> crate::Response<std::io::Cursor<Vec<u8>>> {
        let mut response = crate::Response::from_data(self.body().into_bytes())
            .with_status_code(self.status)
            .with_header(crate::Header::from_bytes("Content-Type", "application/json").unwrap())
            .closing();
        if let Some(seconds) = self.retry_after {
            response.add_header(
                crate::Header::from_bytes("Retry-After", seconds.to_string()).unwrap(),
            );
        }
        response
    }

    /// The whole response, head and body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: tiny-http (Rust)\r\nDate: {}\r\n",
            self.status,
            StatusCode(self.status).default_reason_phrase(),
            HttpDate::from(SystemTime::now())
        );
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        out.push_str("Connection: close\r\n");
        if let Some(seconds) = self.retry_after {
            out.push_str(&format!("Retry-After: {}\r\n", seconds));
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }

    /// The JSON body, `{"error":"<code>","detail":"<detail>"}`.
    fn body(&self) -> String {
        format!(
            "{{\"error\":\"{}\",\"detail\":\"{}\"}}",
            json_escape(self.code),
            json_escape(&self.detail)
        )
    }

    /// Writes and flushes the response.
    pub fn write_to<W: Write>(&self, mut writer: W) -> IoResult<()> {
        writer.write_all(&self.to_bytes())?;
        writer.flush()
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ErrorResponse;

    #[test]
    fn json_body() {
        let bytes = ErrorResponse::busy("too \"busy\"").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nRetry-After: 1\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"busy\",\"detail\":\"too \\\"busy\\\"\"}"));
    }
}
