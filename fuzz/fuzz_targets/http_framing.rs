//! The framing decision on arbitrary heads (RFC 9112 §6): whatever the
//! `Content-Length` and `Transfer-Encoding` headers say, the server either
//! refuses the head or frames its body in the one way every compliant
//! proxy would. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiny_http::{Framing, HTTPVersion, Header};

fuzz_target!(|data: &[u8]| {
    // Each line is a header: its first byte picks the name, the rest is
    // the value, so that the framing headers come up often.
    let names = [
        "Content-Length",
        "Transfer-Encoding",
        "content-length",
        "TRANSFER-ENCODING",
        "Connection",
        "Upgrade",
    ];
    let headers: Vec<Header> = data
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let (first, value) = line.split_first()?;
            Header::from_bytes(names[*first as usize % names.len()], value).ok()
        })
        .collect();
    let values = |name: &'static str| -> Vec<String> {
        headers
            .iter()
            .filter(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_owned())
            .collect()
    };
    let lengths = values("Content-Length");
    let codings = values("Transfer-Encoding");
    for version in [HTTPVersion(1, 0), HTTPVersion(1, 1)] {
        match Framing::of(&version, &headers) {
            Ok(Framing::Empty) => assert!(lengths.is_empty() && codings.is_empty()),
            Ok(Framing::Length(n)) => {
                assert!(codings.is_empty());
                let elements: Vec<&str> = lengths
                    .iter()
                    .flat_map(|v| v.split(','))
                    .map(|e| e.trim_matches([' ', '\t']))
                    .collect();
                assert!(!elements.is_empty());
                for element in elements {
                    assert!(!element.is_empty() && element.bytes().all(|b| b.is_ascii_digit()));
                    assert_eq!(element.parse::<usize>().ok(), Some(n));
                }
            }
            Ok(Framing::Chunked) => {
                assert!(version == HTTPVersion(1, 1) && lengths.is_empty());
                let list: Vec<String> = codings
                    .iter()
                    .flat_map(|v| v.split(','))
                    .map(|e| e.trim_matches([' ', '\t']).to_ascii_lowercase())
                    .filter(|e| !e.is_empty())
                    .collect();
                assert_eq!(list, ["chunked"]);
            }
            Err(_) => (),
        }
    }
});
