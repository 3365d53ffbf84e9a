//! RESP framing: the client request parser, the resumable reply-frame scanner
//! used on upstream sockets, and helpers that build reply frames.
//!
//! Requests are parsed by hand rather than with `redis-protocol` because the
//! limits (`max_bulk_bytes`, `max_multibulk_len`) must be enforced on the
//! headers *before* the body is buffered, and because forwarding needs the
//! exact byte range of every command to pass it upstream untouched. Replies
//! are never decoded on the passthrough path: the scanner only finds frame
//! boundaries, resuming where it stopped, so a 100 MB reply costs one linear
//! pass however it is split across reads (`benches/resp.rs` compares this with
//! `redis-protocol`'s decoder, which restarts from the frame start).

use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// Limits applied while parsing client requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_bytes: usize,
    pub max_multibulk_len: usize,
    pub max_inline_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_bytes: 64 * 1024,
        }
    }
}

/// A protocol violation by the peer. The message is the text of the error
/// reply sent before the connection is closed (Redis closes too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

pub type ArgRanges = smallvec::SmallVec<[Range<usize>; 4]>;

/// One parsed request: byte ranges relative to the start of the buffer that
/// was parsed. `inline` requests have no RESP form in the buffer and must be
/// re-encoded before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRange {
    pub len: usize,
    /// Inline storage covers GET/SET-sized commands without an allocation.
    pub args: ArgRanges,
    pub inline: bool,
}

/// Outcome of one parse attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A complete request of `len` bytes.
    Complete(ParsedRange),
    /// Not enough bytes; no point retrying before the buffer holds `need` bytes.
    Incomplete { need: usize },
}

/// Finds the first CRLF-terminated line starting at `from`; returns the index
/// of '\r'.
#[inline]
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        match buf[i..].iter().position(|&b| b == b'\r') {
            Some(p) => {
                let at = i + p;
                if at + 1 < buf.len() {
                    if buf[at + 1] == b'\n' {
                        return Some(at);
                    }
                    i = at + 1;
                } else {
                    return None;
                }
            }
            None => return None,
        }
    }
    None
}

/// Parses a decimal integer the way Redis' `string2ll` does (no '+', no
/// leading zeros beyond "0", optional '-').
#[inline]
pub fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let (neg, digits) = if s[0] == b'-' {
        (true, &s[1..])
    } else {
        (false, s)
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        let d = (c - b'0') as i64;
        v = if neg {
            v.checked_mul(10)?.checked_sub(d)?
        } else {
            v.checked_mul(10)?.checked_add(d)?
        };
    }
    Some(v)
}

/// Parses one client request from the start of `buf`.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parse, ProtocolError> {
    if buf.is_empty() {
        return Ok(Parse::Incomplete { need: 1 });
    }
    if buf[0] != b'*' {
        return parse_inline(buf, limits);
    }
    let Some(eol) = find_crlf(buf, 1) else {
        if buf.len() > 32 {
            return perr("ERR Protocol error: invalid multibulk length");
        }
        return Ok(Parse::Incomplete {
            need: buf.len() + 1,
        });
    };
    let n = match parse_int(&buf[1..eol]) {
        Some(n) if n <= limits.max_multibulk_len as i64 => n,
        _ => return perr("ERR Protocol error: invalid multibulk length"),
    };
    let mut pos = eol + 2;
    if n <= 0 {
        // Redis treats "*0" and "*-1" as an empty request and skips it.
        return Ok(Parse::Complete(ParsedRange {
            len: pos,
            args: ArgRanges::new(),
            inline: false,
        }));
    }
    let mut args = ArgRanges::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        if pos >= buf.len() {
            return Ok(Parse::Incomplete { need: pos + 4 });
        }
        if buf[pos] != b'$' {
            return perr(format!(
                "ERR Protocol error: expected '$', got '{}'",
                char::from(buf[pos])
            ));
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            if buf.len() - pos > 32 {
                return perr("ERR Protocol error: invalid bulk length");
            }
            return Ok(Parse::Incomplete {
                need: buf.len() + 1,
            });
        };
        let len = match parse_int(&buf[pos + 1..eol]) {
            Some(l) if l >= 0 && l as u64 <= limits.max_bulk_bytes as u64 => l as usize,
            _ => return perr("ERR Protocol error: invalid bulk length"),
        };
        let start = eol + 2;
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(Parse::Incomplete { need: end + 2 });
        }
        if &buf[end..end + 2] != b"\r\n" {
            return perr("ERR Protocol error: bulk string not terminated by CRLF");
        }
        args.push(start..end);
        pos = end + 2;
    }
    Ok(Parse::Complete(ParsedRange {
        len: pos,
        args,
        inline: false,
    }))
}

/// Inline commands ("PING\r\n" typed into telnet). Splitting follows Redis'
/// `sdssplitargs`: whitespace separates, double quotes allow escapes, single
/// quotes are literal.
fn parse_inline(buf: &[u8], limits: &Limits) -> Result<Parse, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline_bytes {
            return perr("ERR Protocol error: too big inline request");
        }
        return Ok(Parse::Incomplete {
            need: buf.len() + 1,
        });
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let line = &buf[..line_end];
    let args = split_inline(line)
        .ok_or_else(|| ProtocolError("ERR Protocol error: unbalanced quotes in request".into()))?;
    Ok(Parse::Complete(ParsedRange {
        len: nl + 1,
        args,
        inline: true,
    }))
}

/// Returns argument ranges; quoted arguments with escapes cannot be expressed
/// as ranges of the input, so they are unsupported only in the sense that the
/// range covers the raw quoted text; callers re-encode inline requests via
/// [`inline_args`], which unescapes.
fn split_inline(line: &[u8]) -> Option<ArgRanges> {
    let mut out = ArgRanges::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let start = i;
        if line[i] == b'"' || line[i] == b'\'' {
            let q = line[i];
            i += 1;
            while i < line.len() && line[i] != q {
                if q == b'"' && line[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            if i >= line.len() {
                return None;
            }
            i += 1;
            if i < line.len() && !line[i].is_ascii_whitespace() {
                return None;
            }
        } else {
            while i < line.len() && !line[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        out.push(start..i);
    }
    Some(out)
}

/// Every argument of an inline request (`ranges` from its [`ParsedRange`]).
pub fn inline_args(raw: &[u8], ranges: &[std::ops::Range<usize>]) -> Vec<Bytes> {
    ranges.iter().map(|r| inline_arg(&raw[r.clone()])).collect()
}

/// The value of one inline argument, with quotes removed and escapes applied.
pub fn inline_arg(raw: &[u8]) -> Bytes {
    if raw.len() >= 2 && raw[0] == b'\'' {
        return Bytes::copy_from_slice(&raw[1..raw.len() - 1]);
    }
    if raw.len() < 2 || raw[0] != b'"' {
        return Bytes::copy_from_slice(raw);
    }
    let body = &raw[1..raw.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\\' && i + 1 < body.len() {
            i += 1;
            match body[i] {
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'b' => out.push(8),
                b'a' => out.push(7),
                b'x' if i + 2 < body.len()
                    && body[i + 1].is_ascii_hexdigit()
                    && body[i + 2].is_ascii_hexdigit() =>
                {
                    let h = std::str::from_utf8(&body[i + 1..i + 3]).unwrap_or("0");
                    out.push(u8::from_str_radix(h, 16).unwrap_or(0));
                    i += 2;
                }
                c => out.push(c),
            }
        } else {
            out.push(body[i]);
        }
        i += 1;
    }
    Bytes::from(out)
}

/// Encodes arguments as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut BytesMut) {
    out.put_u8(b'*');
    put_usize(out, args.len());
    out.put_slice(b"\r\n");
    for a in args {
        let a = a.as_ref();
        out.put_u8(b'$');
        put_usize(out, a.len());
        out.put_slice(b"\r\n");
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

#[inline]
fn put_usize(out: &mut BytesMut, n: usize) {
    let mut b = itoa_buf();
    out.put_slice(fmt_u64(&mut b, n as u64));
}

#[inline]
fn itoa_buf() -> [u8; 20] {
    [0u8; 20]
}

#[inline]
fn fmt_u64(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Resumable scanner that finds the end of complete reply frames (RESP2 and
/// RESP3) without decoding them. Call [`FrameScanner::next_frame`] with the
/// same (growing) buffer until it yields an end offset; then the caller
/// consumes that prefix and calls [`FrameScanner::reset`].
#[derive(Debug, Default)]
pub struct FrameScanner {
    /// Offset of the next unscanned element.
    pos: usize,
    /// Remaining element counts of the open aggregates, innermost last.
    stack: Vec<i64>,
    /// Kind of the outermost frame ('>' marks a push).
    first: u8,
}

/// Frames nested deeper than this are rejected; Redis never sends more than a
/// handful of levels and this bounds the scanner's memory.
const MAX_DEPTH: usize = 512;

impl FrameScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets progress; the next call scans from offset 0.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.stack.clear();
        self.first = 0;
    }

    /// Type byte of the frame being scanned (valid once scanning began).
    pub fn frame_type(&self) -> u8 {
        self.first
    }

    /// Moves the scan position back by `n` bytes because the caller consumed
    /// `n` bytes from the front of the buffer while a frame was in progress.
    pub fn shift(&mut self, n: usize) {
        self.pos -= n;
    }

    /// Scans forward; returns `Some(end)` when the frame starting at offset 0
    /// of `buf` is complete and ends at `end`.
    pub fn next_frame(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            let pos = self.pos;
            if pos >= buf.len() {
                return Ok(None);
            }
            let t = buf[pos];
            if pos == 0 {
                self.first = t;
            }
            let Some(eol) = find_crlf(buf, pos + 1) else {
                return Ok(None);
            };
            let line = &buf[pos + 1..eol];
            let mut next = eol + 2;
            let mut children: i64 = 0;
            let mut attribute = false;
            match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
                b'$' | b'!' | b'=' => {
                    let n = parse_int(line).ok_or_else(|| bad_len(t))?;
                    if n >= 0 {
                        next = eol + 2 + n as usize + 2;
                        if buf.len() < next {
                            return Ok(None);
                        }
                    } else if n != -1 {
                        return Err(bad_len(t));
                    }
                }
                b'*' | b'~' | b'>' => {
                    let n = parse_int(line).ok_or_else(|| bad_len(t))?;
                    if n < -1 {
                        return Err(bad_len(t));
                    }
                    children = n.max(0);
                }
                b'%' | b'|' => {
                    let n = parse_int(line).ok_or_else(|| bad_len(t))?;
                    if n < 0 {
                        return Err(bad_len(t));
                    }
                    // A count past i64::MAX / 2 is nonsense, not a
                    // wrapped-around (negative: "complete") aggregate.
                    children = n.checked_mul(2).ok_or_else(|| bad_len(t))?;
                    attribute = t == b'|';
                }
                _ => {
                    return Err(ProtocolError(format!(
                        "unexpected byte 0x{t:02x} in reply stream"
                    )));
                }
            }
            self.pos = next;
            if attribute {
                // An attribute decorates the element that follows it: its
                // entries are scanned, then one more element is expected in
                // the same slot, so the enclosing count is not consumed.
                if self.stack.len() >= MAX_DEPTH {
                    return Err(ProtocolError("reply nested too deeply".into()));
                }
                self.stack.push(children + 1);
                if children == 0 {
                    continue;
                }
                continue;
            }
            if children > 0 {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(ProtocolError("reply nested too deeply".into()));
                }
                self.stack.push(children);
                continue;
            }
            // A complete element: pop finished aggregates.
            loop {
                match self.stack.last_mut() {
                    None => return Ok(Some(self.pos)),
                    Some(rem) => {
                        *rem -= 1;
                        if *rem == 0 {
                            self.stack.pop();
                        } else {
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn bad_len(t: u8) -> ProtocolError {
    ProtocolError(format!(
        "invalid length in reply frame of type '{}'",
        char::from(t)
    ))
}

// ---- reply builders -------------------------------------------------------

pub fn simple(out: &mut BytesMut, s: &str) {
    out.put_u8(b'+');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

/// Error reply. `msg` starts with the error code ("ERR ...", "NOAUTH ...").
/// CR and LF would end the frame early, so they are replaced.
pub fn error(out: &mut BytesMut, msg: &str) {
    out.put_u8(b'-');
    for b in msg.bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

pub fn error_bytes(msg: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 3);
    error(&mut b, msg);
    b.freeze()
}

pub fn int(out: &mut BytesMut, n: i64) {
    out.put_u8(b':');
    if n < 0 {
        out.put_u8(b'-');
    }
    let mut b = itoa_buf();
    out.put_slice(fmt_u64(&mut b, n.unsigned_abs()));
    out.put_slice(b"\r\n");
}

pub fn bulk(out: &mut BytesMut, v: &[u8]) {
    bulk_header(out, v.len());
    out.put_slice(v);
    out.put_slice(b"\r\n");
}

/// `$<len>\r\n`: a bulk string's first line, for a body written after it.
pub fn bulk_header(out: &mut BytesMut, len: usize) {
    out.put_u8(b'$');
    put_usize(out, len);
    out.put_slice(b"\r\n");
}

pub fn null(out: &mut BytesMut, resp3: bool) {
    out.put_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" });
}

pub fn array_header(out: &mut BytesMut, n: usize) {
    out.put_u8(b'*');
    put_usize(out, n);
    out.put_slice(b"\r\n");
}

/// A map header: RESP3 `%n`, RESP2 a flat array of 2n elements.
pub fn map_header(out: &mut BytesMut, n: usize, resp3: bool) {
    if resp3 {
        out.put_u8(b'%');
        put_usize(out, n);
    } else {
        out.put_u8(b'*');
        put_usize(out, n * 2);
    }
    out.put_slice(b"\r\n");
}

/// A bulk of text as Redis sends INFO: a verbatim string in RESP3.
pub fn verbatim_txt(out: &mut BytesMut, text: &[u8], resp3: bool) {
    if resp3 {
        out.put_u8(b'=');
        put_usize(out, text.len() + 4);
        out.put_slice(b"\r\ntxt:");
        out.put_slice(text);
        out.put_slice(b"\r\n");
    } else {
        bulk(out, text);
    }
}

/// Extracts the payload of a single bulk or verbatim frame (used for INFO).
pub fn bulk_payload(frame: &[u8]) -> Option<&[u8]> {
    let t = *frame.first()?;
    if t != b'$' && t != b'=' {
        return None;
    }
    let eol = find_crlf(frame, 1)?;
    let n = parse_int(&frame[1..eol])?;
    if n < 0 {
        return None;
    }
    let body = frame.get(eol + 2..eol + 2 + n as usize)?;
    if t == b'=' { body.get(4..) } else { Some(body) }
}

/// The elements of one whole aggregate frame (array, set, push; a map's
/// keys and values in turn), as slices of it. None when `frame` is not
/// exactly one aggregate (a null array included).
pub fn elements(frame: &Bytes) -> Option<Vec<Bytes>> {
    let t = *frame.first()?;
    let per = match t {
        b'*' | b'~' | b'>' => 1,
        b'%' => 2,
        _ => return None,
    };
    let eol = find_crlf(frame, 1)?;
    let n = usize::try_from(parse_int(&frame[1..eol])?).ok()?;
    let mut pos = eol + 2;
    let count = n.checked_mul(per)?;
    let mut out = Vec::with_capacity(count.min(frame.len() / 3));
    let mut sc = FrameScanner::new();
    for _ in 0..count {
        let end = sc.next_frame(&frame[pos..]).ok()??;
        out.push(frame.slice(pos..pos + end));
        pos += end;
        sc.reset();
    }
    (pos == frame.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_of_aggregates() {
        let e = |f: &'static [u8]| elements(&Bytes::from_static(f));
        let got = e(b"*3\r\n$1\r\na\r\n_\r\n*1\r\n:1\r\n").unwrap();
        assert_eq!(got, [&b"$1\r\na\r\n"[..], b"_\r\n", b"*1\r\n:1\r\n"]);
        assert_eq!(e(b"%1\r\n$1\r\nk\r\n$1\r\nv\r\n").unwrap().len(), 2);
        assert_eq!(e(b"%0\r\n").unwrap().len(), 0);
        // Not exactly one whole aggregate.
        assert!(e(b"*2\r\n$1\r\na\r\n").is_none());
        assert!(e(b"*1\r\n$1\r\na\r\n+extra\r\n").is_none());
        assert!(e(b"*-1\r\n").is_none());
        assert!(e(b"$1\r\na\r\n").is_none());
        assert!(e(b"*9223372036854775807\r\n").is_none());
        assert!(e(b"%9223372036854775807\r\n").is_none());
    }

    fn complete(buf: &[u8]) -> ParsedRange {
        match parse_request(buf, &Limits::default()).unwrap() {
            Parse::Complete(p) => p,
            other => panic!("expected complete, got {other:?}"),
        }
    }

    #[test]
    fn parses_multibulk() {
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest";
        let p = complete(buf);
        assert_eq!(p.len, buf.len() - 4);
        assert_eq!(&buf[p.args[0].clone()], b"GET");
        assert_eq!(&buf[p.args[1].clone()], b"k");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        for i in 0..buf.len() {
            match parse_request(&buf[..i], &Limits::default()).unwrap() {
                Parse::Incomplete { need } => assert!(need > i, "need {need} at {i}"),
                c => panic!("prefix {i} complete: {c:?}"),
            }
        }
        assert_eq!(complete(buf).len, buf.len());
    }

    #[test]
    fn rejects_bad_lengths() {
        let l = Limits {
            max_bulk_bytes: 10,
            max_multibulk_len: 4,
            ..Limits::default()
        };
        for bad in [
            &b"*5\r\n"[..],
            b"*x\r\n",
            b"*1\r\n$11\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$1\r\nab\r\n",
        ] {
            assert!(
                parse_request(bad, &l).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Redis skips empty and negative multibulk counts.
        assert_eq!(complete(b"*0\r\n").args.len(), 0);
        assert_eq!(complete(b"*-5\r\n").args.len(), 0);
    }

    #[test]
    fn inline_commands() {
        let buf = b"set k \"a b\\n\" 'c d'\r\n";
        let p = complete(buf);
        assert!(p.inline);
        let args = inline_args(buf, &p.args);
        assert_eq!(args, vec![&b"set"[..], b"k", b"a b\n", b"c d"]);
        assert!(parse_request(b"get \"k\r\n", &Limits::default()).is_err());
        assert_eq!(complete(b"\r\n").args.len(), 0);
    }

    #[test]
    fn scanner_handles_nesting_and_splits() {
        let frames: Vec<&[u8]> = vec![
            b"+OK\r\n",
            b"$-1\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"%1\r\n+a\r\n~2\r\n#t\r\n,1.5\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n",
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"-ERR bad\r\n",
        ];
        let mut all = Vec::new();
        for f in &frames {
            all.extend_from_slice(f);
        }
        // Feed the stream byte by byte and check that every boundary is found.
        let mut buf = Vec::new();
        let mut sc = FrameScanner::new();
        let mut found = Vec::new();
        for &b in &all {
            buf.push(b);
            while let Some(end) = sc.next_frame(&buf).unwrap() {
                found.push(buf[..end].to_vec());
                buf.drain(..end);
                sc.reset();
            }
        }
        assert!(buf.is_empty());
        assert_eq!(found.len(), frames.len());
        for (a, b) in found.iter().zip(frames) {
            assert_eq!(a.as_slice(), b);
        }
    }

    #[test]
    fn scanner_rejects_garbage() {
        let mut sc = FrameScanner::new();
        assert!(sc.next_frame(b"?x\r\n").is_err());
        sc.reset();
        assert!(sc.next_frame(b"$-5\r\n").is_err());
        let mut deep = Vec::new();
        for _ in 0..(MAX_DEPTH + 2) {
            deep.extend_from_slice(b"*1\r\n");
        }
        sc.reset();
        assert!(sc.next_frame(&deep).is_err());
        // A map count whose doubling overflows (found by fuzzing the fill
        // reply parser): an error, not a panic or a "complete" frame.
        for huge in [
            &b"%9223372036854775807\r\n"[..],
            b"|4611686018427387904\r\n",
        ] {
            sc.reset();
            assert!(sc.next_frame(huge).is_err());
        }
    }

    #[test]
    fn builders() {
        let mut b = BytesMut::new();
        int(&mut b, -42);
        bulk(&mut b, b"x");
        null(&mut b, false);
        null(&mut b, true);
        error(&mut b, "ERR a\r\nb");
        map_header(&mut b, 2, false);
        map_header(&mut b, 2, true);
        verbatim_txt(&mut b, b"hi", true);
        assert_eq!(
            &b[..],
            b":-42\r\n$1\r\nx\r\n$-1\r\n_\r\n-ERR a  b\r\n*4\r\n%2\r\n=6\r\ntxt:hi\r\n"
        );
        assert_eq!(bulk_payload(b"=6\r\ntxt:hi\r\n"), Some(&b"hi"[..]));
        assert_eq!(bulk_payload(b"$2\r\nhi\r\n"), Some(&b"hi"[..]));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int(b"9223372036854775808"), None);
    }
}
