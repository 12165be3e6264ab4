//! ingestd patch: a decoder for chunked request bodies that bounds what it
//! holds. The `chunked_transfer` decoder used before collected a chunk-size
//! line without limit (a client could grow it for ever) and turned an I/O
//! error met while reading a line end, such as a timeout, into "invalid
//! input".

use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};

/// Longest chunk-size line, extensions included.
const MAX_SIZE_LINE: usize = 4096;

/// Most bytes of trailer fields after the last chunk (they are discarded).
const MAX_TRAILER: usize = 16384;

/// Reads a `Transfer-Encoding: chunked` body and yields its data.
///
/// Malformed framing is an `InvalidData` error, a source that ends early an
/// `UnexpectedEof` error; other errors of the source are passed on as they
/// are.
pub struct ChunkedReader<R> {
    source: R,
    state: State,
}

#[derive(Clone, Copy)]
enum State {
    // before a chunk-size line
    Size,
    // within a chunk's data, this many bytes left
    Data(usize),
    // after a chunk's data, before its CRLF
    DataEnd,
    // after the last chunk and its trailer
    Done,
}

impl<R: Read> ChunkedReader<R> {
    pub fn new(source: R) -> ChunkedReader<R> {
        ChunkedReader {
            source,
            state: State::Size,
        }
    }

    fn read_byte(&mut self) -> IoResult<u8> {
        let mut byte = [0];
        loop {
            match self.source.read(&mut byte) {
                Ok(0) => return Err(ended_early()),
                Ok(_) => return Ok(byte[0]),
                Err(ref e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn read_crlf(&mut self) -> IoResult<()> {
        if self.read_byte()? != b'\r' || self.read_byte()? != b'\n' {
            return Err(invalid("missing CRLF in chunked body"));
        }
        Ok(())
    }

    /// Reads `chunk-size [ chunk-ext ] CRLF` and returns the size.
    ///
    /// Strictly as RFC 9112 §7.1 writes it, since a proxy that reads a size
    /// line differently would frame the body differently: the size starts
    /// the line (no whitespace before it); whitespace after it only before
    /// a `;`; an extension holds no control character but tab, and a
    /// quoted string in it is closed; the line ends in CRLF, never in a bare
    /// LF.
    fn read_size_line(&mut self) -> IoResult<usize> {
        #[derive(PartialEq)]
        enum Part {
            Digits,
            SpaceBeforeExtension,
            Extension,
            Quoted,
            QuotedEscape,
        }
        let mut size: usize = 0;
        let mut digits = 0;
        let mut part = Part::Digits;
        let mut length = 0;

        loop {
            let byte = self.read_byte()?;
            length += 1;
            if length > MAX_SIZE_LINE {
                return Err(invalid("chunk size line too long"));
            }
            let control = (byte < 0x20 && byte != b'\t') || byte == 0x7f;
            part = match part {
                Part::Digits => match byte {
                    b'\r' if digits > 0 => break,
                    b';' if digits > 0 => Part::Extension,
                    b' ' | b'\t' if digits > 0 => Part::SpaceBeforeExtension,
                    _ => {
                        let digit = (byte as char)
                            .to_digit(16)
                            .ok_or_else(|| invalid("bad chunk size"))?;
                        size = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit as usize))
                            .ok_or_else(|| invalid("chunk size too large"))?;
                        digits += 1;
                        Part::Digits
                    }
                },
                Part::SpaceBeforeExtension => match byte {
                    b' ' | b'\t' => Part::SpaceBeforeExtension,
                    b';' => Part::Extension,
                    _ => return Err(invalid("bad chunk size line")),
                },
                Part::Extension => match byte {
                    b'\r' => break,
                    b'"' => Part::Quoted,
                    _ if control => return Err(invalid("control character in a chunk extension")),
                    _ => Part::Extension,
                },
                Part::Quoted => match byte {
                    b'"' => Part::Extension,
                    b'\\' => Part::QuotedEscape,
                    _ if control => return Err(invalid("control character in a chunk extension")),
                    _ => Part::Quoted,
                },
                Part::QuotedEscape if control => {
                    return Err(invalid("control character in a chunk extension"))
                }
                Part::QuotedEscape => Part::Quoted,
            };
        }

        if self.read_byte()? != b'\n' {
            return Err(invalid("bad chunk size line"));
        }
        Ok(size)
    }

    /// Reads and discards trailer fields, up to and including the empty line.
    /// Each must be a field line as in a head: `name: value` with a token
    /// name, no control character but tab, ending in CRLF (RFC 9112 §7.1.2).
    fn read_trailer(&mut self) -> IoResult<()> {
        let mut length = 0;
        let mut line: Vec<u8> = Vec::new();
        loop {
            let byte = self.read_byte()?;
            length += 1;
            if length > MAX_TRAILER {
                return Err(invalid("chunked body trailer too long"));
            }
            if byte == b'\r' {
                if self.read_byte()? != b'\n' {
                    return Err(invalid("missing CRLF in chunked body trailer"));
                }
                if line.is_empty() {
                    return Ok(());
                }
                if !is_field_line(&line) {
                    return Err(invalid("malformed chunked body trailer"));
                }
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
}

/// `token ":" value`, with no control character but tab in the value.
fn is_field_line(line: &[u8]) -> bool {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    match line.iter().position(|b| *b == b':') {
        Some(colon) if colon > 0 => {
            line[..colon].iter().all(|b| tchar(*b))
                && line[colon + 1..]
                    .iter()
                    .all(|b| !((*b < 0x20 && *b != b'\t') || *b == 0x7f))
        }
        _ => false,
    }
}

impl<R: Read> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Size => {
                    let size = self.read_size_line()?;
                    if size == 0 {
                        self.read_trailer()?;
                        self.state = State::Done;
                        return Ok(0);
                    }
                    self.state = State::Data(size);
                }
                State::Data(left) => {
                    let want = left.min(buf.len());
                    let read = self.source.read(&mut buf[..want])?;
                    if read == 0 {
                        return Err(ended_early());
                    }
                    self.state = if read == left {
                        State::DataEnd
                    } else {
                        State::Data(left - read)
                    };
                    return Ok(read);
                }
                State::DataEnd => {
                    self.read_crlf()?;
                    self.state = State::Size;
                }
            }
        }
    }
}

fn invalid(what: &str) -> IoError {
    IoError::new(ErrorKind::InvalidData, what)
}

fn ended_early() -> IoError {
    IoError::new(ErrorKind::UnexpectedEof, "chunked body ended early")
}

#[cfg(test)]
mod tests {
    use super::ChunkedReader;
    use std::io::{ErrorKind, Read};

    fn decode(input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkedReader::new(input).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn decodes() {
        let hello = decode(b"3\r\nhel\r\nb\r\nlo world!!!\r\n0\r\n\r\n").unwrap();
        assert_eq!(hello, b"hello world!!!");
        assert_eq!(decode(b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n").unwrap(), b"abc");
        assert_eq!(decode(b"A ;x\r\n0123456789\r\n0\r\n\r\n").unwrap(), b"0123456789");
        assert_eq!(decode(b"1;a=\"q;\\\"d\"\r\nz\r\n0\r\n\r\n").unwrap(), b"z");
        assert_eq!(decode(b"0\r\n\r\n").unwrap(), b"");
    }

    #[test]
    fn stops_after_last_chunk() {
        let mut input: &[u8] = b"1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let mut out = Vec::new();
        ChunkedReader::new(&mut input).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"a");
        assert_eq!(input, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn rejects_bad_framing() {
        assert_eq!(decode(b"x\r\n").unwrap_err().kind(), ErrorKind::InvalidData);
        assert_eq!(decode(b"1 2\r\n").unwrap_err().kind(), ErrorKind::InvalidData);
        assert_eq!(decode(b"2\r\nabX\r\n").unwrap_err().kind(), ErrorKind::InvalidData);
        assert_eq!(decode(b"ffffffffffffffffff\r\n").unwrap_err().kind(), ErrorKind::InvalidData);
        let mut long_line = b"1;".to_vec();
        long_line.extend_from_slice(&[b'x'; 5000]);
        assert_eq!(decode(&long_line).unwrap_err().kind(), ErrorKind::InvalidData);
        assert_eq!(decode(b"5\r\nab").unwrap_err().kind(), ErrorKind::UnexpectedEof);
        // What a proxy could read differently: a bare LF or a control
        // character in an extension, whitespace around the size, a trailer
        // line that is not a field or ends in a bare LF.
        for bad in [
            &b"d;x\nZZ\r\n"[..],
            b"1;a\0b\r\nz\r\n0\r\n\r\n",
            b" d\r\n",
            b"A \r\n0123456789\r\n0\r\n\r\n",
            b"1;a=\"open\r\nz\r\n0\r\n\r\n",
            b"0\r\nX: a\nY: b\r\n\r\n",
            b"0\r\nnot a field\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
        ] {
            assert_eq!(
                decode(bad).unwrap_err().kind(),
                ErrorKind::InvalidData,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
