//! Content codings of ingest bodies (`Content-Encoding`): which ones the
//! API takes, and decoding a body under the body limit.
//!
//! A body may come as is (`identity`, or no header), gzip (`gzip`, or its
//! old alias `x-gzip`) or zlib (`deflate`, which RFC 9110 defines as the
//! zlib format of RFC 1950). One coding at most: a client that stacks
//! codings, or names one not listed, is refused before its body is read.
//! Raw deflate without the zlib wrapper, which some old clients sent under
//! `deflate`, is refused as a corrupt body rather than guessed at: a wrong
//! guess would turn garbage into JSON's problem.
//!
//! Decoding streams through flate2's pure-Rust decoders with the output
//! limited to `INGEST_MAX_BODY_BYTES` + 1 bytes: a bomb (a megabyte of gzip
//! that inflates to a gigabyte) is refused once the limit is passed, having
//! cost at most the limit in memory, never inflated first and measured
//! after. The output grows in steps, each reserved first through a callback
//! (the server's memory budget), so that the budget counts the decoded
//! body too. This module knows nothing of HTTP beyond the header's text.

use std::io::{self, Read};

use flate2::bufread::{MultiGzDecoder, ZlibDecoder};

use crate::api::ApiError;

/// The codings a body may be sent in, as a 415 lists them in
/// `Accept-Encoding`; `identity` is always acceptable besides.
pub const ACCEPTED: &str = "gzip, deflate";

/// The first step the decoded body grows by; each later step doubles it.
const FIRST_STEP: usize = 64 * 1024;

/// The most that one read of the decoder writes at once.
const READ_CHUNK: usize = 64 * 1024;

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// As is: no `Content-Encoding`, or `identity`.
    Identity,
    /// `gzip` (or `x-gzip`): RFC 1952, one or more members.
    Gzip,
    /// `deflate`: the zlib format of RFC 1950.
    Deflate,
}

impl Coding {
    /// The coding's name, as a client sends it.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The coding that `values`, every `Content-Encoding` field of a request
/// in order, names: codings are case-insensitive, `identity` entries and
/// empty list elements count for nothing, and more than one other coding
/// is refused like an unknown one.
pub fn coding<'a>(values: impl IntoIterator<Item = &'a str> + Clone) -> Result<Coding, ApiError> {
    let mut found = Coding::Identity;
    for token in values.clone().into_iter().flat_map(|v| v.split(',')) {
        let token = token.trim();
        let this = if token.is_empty() || token.eq_ignore_ascii_case("identity") {
            continue;
        } else if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
            Coding::Gzip
        } else if token.eq_ignore_ascii_case("deflate") {
            Coding::Deflate
        } else {
            return Err(unsupported(values));
        };
        if found != Coding::Identity {
            return Err(unsupported(values));
        }
        found = this;
    }
    Ok(found)
}

/// The error for the fields `values`, joined as one list.
fn unsupported<'a>(values: impl IntoIterator<Item = &'a str>) -> ApiError {
    ApiError::UnsupportedEncoding(values.into_iter().collect::<Vec<_>>().join(", "))
}

/// Decodes `body`, sent in `coding`, into at most `limit` bytes. Before
/// the output grows by `n` bytes, `reserve(n)` must return true, or the
/// decoding stops with [`ApiError::MemoryBusy`]. A body that decodes to
/// more than `limit` bytes is [`ApiError::DecodedTooLarge`], found after
/// decoding `limit` + 1 bytes and no more; one that is not valid in its
/// coding (corrupt, truncated, followed by other bytes) is
/// [`ApiError::InvalidEncoding`]. An `Identity` body is returned as is.
pub fn decode(
    coding: Coding,
    body: Vec<u8>,
    limit: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u8>, ApiError> {
    if body.is_empty() {
        // An empty body is refused as empty by the parser, whatever it
        // claims to be encoded in.
        return Ok(body);
    }
    let invalid = |why: String| {
        ApiError::InvalidEncoding(format!("the body is not valid {}: {why}", coding.name()))
    };
    match coding {
        Coding::Identity => Ok(body),
        Coding::Gzip => {
            // Every member of the file, as gzip(1) reads them; bytes after
            // the last member are read as a member's header and refused.
            let mut decoder = MultiGzDecoder::new(&body[..]);
            read_limited(&mut decoder, limit, reserve, invalid)
        }
        Coding::Deflate => {
            if !is_zlib_header(&body) {
                return Err(invalid(
                    "the body does not start with a zlib header (HTTP's deflate is the zlib \
                     format of RFC 1950; raw deflate is not accepted)"
                        .into(),
                ));
            }
            let mut decoder = ZlibDecoder::new(&body[..]);
            let decoded = read_limited(&mut decoder, limit, reserve, invalid)?;
            if !decoder.get_ref().is_empty() {
                return Err(invalid("bytes follow the end of the zlib stream".into()));
            }
            Ok(decoded)
        }
    }
}

/// True when `body` starts with a zlib header the decoder can take: the
/// deflate method with a window of at most 32 KiB, a valid check value,
/// and no preset dictionary (which HTTP has no way to name).
fn is_zlib_header(body: &[u8]) -> bool {
    let [cmf, flg, ..] = *body else {
        return false;
    };
    let method_deflate = cmf & 0x0f == 8 && cmf >> 4 <= 7;
    let checked = (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0;
    let no_dictionary = flg & 0x20 == 0;
    method_deflate && checked && no_dictionary
}

/// Reads `decoder` to its end into a vector of at most `limit` bytes,
/// reserving each step before the vector grows.
fn read_limited(
    decoder: &mut dyn Read,
    limit: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
    invalid: impl Fn(String) -> ApiError,
) -> Result<Vec<u8>, ApiError> {
    // One byte past the limit shows that the body is over it.
    let most = limit.saturating_add(1);
    let mut limited = decoder.take(most as u64);
    let mut out: Vec<u8> = Vec::new();
    loop {
        if out.len() == out.capacity() {
            let step = out.capacity().max(FIRST_STEP).min(most - out.len());
            if !reserve(step) {
                return Err(ApiError::MemoryBusy);
            }
            out.reserve_exact(step);
        }
        let filled = out.len();
        let end = out.capacity().min(filled + READ_CHUNK).min(most);
        out.resize(end, 0);
        match limited.read(&mut out[filled..]) {
            Ok(0) => {
                out.truncate(filled);
                break;
            }
            Ok(n) => out.truncate(filled + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => out.truncate(filled),
            Err(e) => return Err(invalid(e.to_string())),
        }
        if out.len() > limit {
            return Err(ApiError::DecodedTooLarge(limit));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn unlimited(coding: Coding, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, ApiError> {
        decode(coding, body, limit, &mut |_| true)
    }

    #[test]
    fn codings_are_named_by_the_header() {
        assert_eq!(coding([]), Ok(Coding::Identity));
        assert_eq!(coding(["identity"]), Ok(Coding::Identity));
        assert_eq!(coding(["gzip"]), Ok(Coding::Gzip));
        assert_eq!(coding(["GZip"]), Ok(Coding::Gzip));
        assert_eq!(coding(["x-gzip"]), Ok(Coding::Gzip));
        assert_eq!(coding(["deflate"]), Ok(Coding::Deflate));
        assert_eq!(coding([" deflate , identity"]), Ok(Coding::Deflate));
        assert_eq!(coding(["identity", "gzip"]), Ok(Coding::Gzip));
        assert_eq!(coding([""]), Ok(Coding::Identity));
        for bad in [
            &["br"][..],
            &["zstd"],
            &["compress"],
            &["gzip;q=1"],
            &["nope"],
        ] {
            assert_eq!(
                coding(bad.iter().copied()),
                Err(ApiError::UnsupportedEncoding(bad[0].into())),
                "{bad:?}"
            );
        }
        // Stacked codings are refused, in one field or several.
        assert_eq!(
            coding(["gzip, gzip"]),
            Err(ApiError::UnsupportedEncoding("gzip, gzip".into()))
        );
        assert_eq!(
            coding(["deflate", "gzip"]),
            Err(ApiError::UnsupportedEncoding("deflate, gzip".into()))
        );
    }

    #[test]
    fn bodies_decode() {
        let json = br#"{"payload":{"order":42}}"#.to_vec();
        assert_eq!(
            unlimited(Coding::Identity, json.clone(), 100),
            Ok(json.clone())
        );
        assert_eq!(unlimited(Coding::Gzip, gzip(&json), 100), Ok(json.clone()));
        assert_eq!(
            unlimited(Coding::Deflate, zlib(&json), 100),
            Ok(json.clone())
        );
        // Several gzip members are one body, as gzip(1) reads them.
        let mut two = gzip(&json[..10]);
        two.extend(gzip(&json[10..]));
        assert_eq!(unlimited(Coding::Gzip, two, 100), Ok(json.clone()));
        // Exactly at the limit is within it.
        assert_eq!(
            unlimited(Coding::Gzip, gzip(&json), json.len()),
            Ok(json.clone())
        );
        assert_eq!(unlimited(Coding::Gzip, Vec::new(), 100), Ok(Vec::new()));
    }

    #[test]
    fn corrupt_bodies_are_invalid() {
        let json = br#"{"payload":"a fairly long text, so that it is compressed"}"#;
        let invalid = |coding, body| {
            matches!(
                unlimited(coding, body, 1000),
                Err(ApiError::InvalidEncoding(_))
            )
        };
        assert!(invalid(Coding::Gzip, json.to_vec()));
        assert!(invalid(Coding::Deflate, json.to_vec()));
        let good = gzip(json);
        assert!(invalid(Coding::Gzip, good[..good.len() - 4].to_vec()));
        assert!(invalid(Coding::Gzip, good[..good.len() / 2].to_vec()));
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0xff;
        assert!(invalid(Coding::Gzip, flipped));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"xyz");
        assert!(invalid(Coding::Gzip, trailing));
        let good = zlib(json);
        assert!(invalid(Coding::Deflate, good[..good.len() - 2].to_vec()));
        let mut trailing = good.clone();
        trailing.push(b'x');
        assert!(invalid(Coding::Deflate, trailing));
        // Raw deflate is not HTTP's deflate, and the detail says so.
        match unlimited(Coding::Deflate, raw_deflate(json), 1000) {
            Err(ApiError::InvalidEncoding(d)) => assert!(d.contains("RFC 1950"), "{d}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_limit() {
        // 64 MiB of zeros, about 64 KiB of gzip, against a 1 MiB limit.
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 17, "{}", bomb.len());
        let limit = 1 << 20;
        let mut reserved = 0;
        let got = decode(Coding::Gzip, bomb, limit, &mut |n| {
            reserved += n;
            true
        });
        assert_eq!(got, Err(ApiError::DecodedTooLarge(limit)));
        // Every byte the output held was reserved first, and no more than
        // the limit and the one byte that shows it passed.
        assert_eq!(reserved, limit + 1);
    }

    #[test]
    fn decoding_stops_when_memory_is_refused() {
        let body = gzip(&vec![b' '; 200_000]);
        let mut steps = Vec::new();
        let got = decode(Coding::Gzip, body, 1 << 20, &mut |n| {
            steps.push(n);
            steps.len() < 2
        });
        assert_eq!(got, Err(ApiError::MemoryBusy));
        assert_eq!(steps, [FIRST_STEP, FIRST_STEP]);
    }
}
