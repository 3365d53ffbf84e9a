//! Stored format for transparently LZ4-compressed Redis string values.
//!
//! Respite compresses large string values before writing them to Redis and
//! decompresses them on the way back, so clients never see the framing. The
//! bytes that actually live in Redis are either the client's value untouched
//! ("unmarked"), or a *frame*:
//!
//! | offset | size     | field                                             |
//! |--------|----------|---------------------------------------------------|
//! | 0      | 4        | magic `FE 52 53 50` (`"\xFERSP"`)                 |
//! | 4      | 1        | format version, currently `1`                     |
//! | 5      | 1        | algorithm: `0` = raw (stored), `1` = LZ4 block    |
//! | 6      | 1..=10   | original length, unsigned LEB128, minimal form    |
//! | 7..=16 | rest     | payload: the raw value, or one LZ4 block          |
//!
//! The LZ4 payload is a single LZ4 *block* (not the LZ4 frame format, and
//! without `lz4_flex`'s 4-byte size prefix): our header already carries the
//! length, and any LZ4 block decoder can read the payload given that length.
//!
//! The length is a varint rather than a fixed `u32` so the format has no
//! size ceiling of its own (Redis' `proto-max-bulk-len` can be raised past
//! 4 GiB) while costing only 2–3 bytes for typical values. It must be the
//! minimal encoding so that every frame has exactly one byte representation.
//!
//! A value that is not worth compressing but happens to begin with the magic
//! is stored in a raw frame (algorithm `0`), so a reader can always tell the
//! two cases apart: **every** value written through the proxy must go
//! through [`Codec::encode`], not just the large ones.
//!
//! See `docs/compression-format.md` for versioning rules and for which Redis
//! commands see the framed bytes instead of the original value.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// Marks a framed value.
///
/// `0xFE` can never occur anywhere in well-formed UTF-8, so no text value —
/// plain strings, JSON, XML, CSV, decimal integers — can start with it. It
/// also avoids the lead bytes of common binary payloads: gzip (`1F 8B`), zstd
/// (`28 B5 2F FD`), PNG (`89 50`), JPEG (`FF D8`), PDF (`%PDF`), ZIP (`PK`),
/// bzip2 (`BZh`), xz (`FD 37`), the LZ4 frame format (`04 22`), framed
/// snappy (`FF 06`), pickle (`80`), Java serialization (`AC ED`), RDB files
/// (`REDIS`) and `DUMP` payloads (type byte below `0x20`), the UTF-8 BOM
/// (`EF BB BF`) and, because the second byte is `'R'` rather than `0xFF`, the
/// UTF-16 BE BOM (`FE FF`). Formats whose first byte is data are excluded by
/// their own rules: in protobuf the low three bits of the first tag byte
/// would be wire type 6, which does not exist; in CBOR `0xFE` is a reserved,
/// ill-formed initial byte; in `MessagePack` `0xFE` is the complete one-byte
/// document `-2`, so no longer document starts with it; read as a BSON
/// length prefix the magic is ~1.35 GB, far over BSON's 16 MiB limit.
///
/// The ASCII tail makes frames recognisable in `redis-cli` output
/// (`"\xfeRSP\x01\x01..."`). Arbitrary binary values still collide with
/// probability 2^-32, which is why [`Codec::encode`] escapes them.
pub const MAGIC: [u8; 4] = [0xFE, b'R', b'S', b'P'];

/// The only header layout this module reads or writes.
pub const FORMAT_VERSION: u8 = 1;

/// Algorithm id for a payload stored verbatim (the escape for values that
/// start with [`MAGIC`] but are not worth compressing).
pub const ALGORITHM_RAW: u8 = 0;

/// Algorithm id for a payload that is one LZ4 block.
pub const ALGORITHM_LZ4: u8 = 1;

/// Magic, version and algorithm: the part of the header before the length.
const FIXED_HEADER_LEN: usize = MAGIC.len() + 2;

/// A `u64` never needs more than ten 7-bit groups.
const MAX_VARINT_LEN: usize = 10;

const MAX_HEADER_LEN: usize = FIXED_HEADER_LEN + MAX_VARINT_LEN;

/// Upper bound on how much one LZ4 block byte can expand to: a run-length
/// extension byte adds at most 255 to a match length, and every other kind
/// of block byte yields less. Checking it lets a tiny forged block with a
/// large (but under-limit) declared length fail before we allocate.
const LZ4_MAX_EXPANSION: u64 = 255;

/// Why a framed value could not be decoded.
///
/// The `Display` text is meant to be appended to `ERR respite: ` in a Redis
/// error reply, so it is a single line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// The value ends before the header does.
    #[error("corrupt compressed value (truncated header, {len} bytes)")]
    TruncatedHeader { len: usize },
    /// A header layout from a newer (or unknown) writer.
    #[error("corrupt compressed value (unsupported format version {version})")]
    UnsupportedVersion { version: u8 },
    /// An algorithm id this build does not implement.
    #[error("corrupt compressed value (unknown algorithm id {id})")]
    UnknownAlgorithm { id: u8 },
    /// The length varint overflows `u64` or is not in minimal form.
    #[error("corrupt compressed value (malformed length field)")]
    MalformedLength,
    /// The declared length exceeds [`Codec::max_decompressed_bytes`].
    #[error("compressed value too large (declares {declared} bytes, limit is {limit})")]
    TooLarge { declared: u64, limit: usize },
    /// The declared length is more than the payload could possibly produce.
    #[error(
        "corrupt compressed value (declares {declared} bytes, more than a {payload}-byte lz4 block can hold)"
    )]
    ImpossibleLength { declared: u64, payload: usize },
    /// The payload yields fewer bytes than the header declares.
    #[error("corrupt compressed value (declares {declared} bytes, payload yields {actual})")]
    LengthMismatch { declared: u64, actual: usize },
    /// The LZ4 block would write past the declared length.
    #[error("corrupt compressed value (lz4 block yields more than the declared {declared} bytes)")]
    DecodedTooLong { declared: u64 },
    /// The LZ4 block is malformed.
    #[error("corrupt compressed value (invalid lz4 block: {reason})")]
    InvalidBlock { reason: &'static str },
}

/// Compression policy plus the decoder's safety limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Codec {
    /// Values shorter than this are stored as they are: LZ4 rarely wins on
    /// small inputs and the header would eat what it does win.
    pub min_bytes: usize,
    /// Fraction of the original size a frame must save (header included)
    /// for compression to be kept, e.g. `0.1`. Clamped to `0.0..=1.0`; NaN
    /// disables compression.
    pub min_saving: f64,
    /// Largest original length a frame may declare. Decoding refuses bigger
    /// declarations before allocating, and encoding never compresses values
    /// bigger than this, so a codec can always read what it wrote.
    pub max_decompressed_bytes: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self {
            min_bytes: 1024,
            min_saving: 0.1,
            // Redis' default proto-max-bulk-len: nothing bigger can be SET.
            max_decompressed_bytes: 512 * 1024 * 1024,
        }
    }
}

impl Codec {
    /// Returns the bytes to store for `value`, or `None` to store `value`
    /// itself.
    ///
    /// Call this for every value written, whatever its size: a value that
    /// begins with [`MAGIC`] is always framed (compressed if that pays off,
    /// otherwise in a raw frame) so that [`Codec::decode`] of the stored
    /// bytes returns exactly `value` for any input.
    #[must_use]
    pub fn encode(&self, value: &[u8]) -> Option<Bytes> {
        if let Some(frame) = self.compress(value) {
            return Some(frame);
        }
        is_compressed(value).then(|| raw_frame(value))
    }

    /// Returns the value a client should see for `stored`.
    ///
    /// Unmarked values and raw frames are returned without copying. LZ4
    /// frames are validated before anything is allocated, and the result
    /// must be exactly the declared length.
    ///
    /// # Errors
    ///
    /// A framed value with a bad header, a declared length over
    /// [`Codec::max_decompressed_bytes`], or a payload that does not decode
    /// to exactly the declared length.
    pub fn decode(&self, stored: &Bytes) -> Result<Bytes, CompressError> {
        Ok(match self.decode_parts(stored)? {
            Decoded::Unmarked => stored.clone(),
            Decoded::Raw { offset } => stored.slice(offset..),
            Decoded::Decompressed(value) => Bytes::from(value),
        })
    }

    /// [`Codec::decode`] for callers holding a borrowed slice: borrows
    /// whenever no decompression is needed.
    ///
    /// # Errors
    ///
    /// As for [`Codec::decode`].
    pub fn decode_slice<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, CompressError> {
        Ok(match self.decode_parts(stored)? {
            Decoded::Unmarked => Cow::Borrowed(stored),
            Decoded::Raw { offset } => Cow::Borrowed(&stored[offset..]),
            Decoded::Decompressed(value) => Cow::Owned(value),
        })
    }

    fn decode_parts(&self, stored: &[u8]) -> Result<Decoded, CompressError> {
        Ok(match self.decode_parts_lazy(stored)? {
            // A raw frame's payload is the end of `stored`.
            Lazy::Plain(v) if v.len() == stored.len() => Decoded::Unmarked,
            Lazy::Plain(v) => Decoded::Raw {
                offset: stored.len() - v.len(),
            },
            Lazy::Lz4 { declared, block } => {
                Decoded::Decompressed(self.decompress(declared, block)?)
            }
        })
    }

    fn compress(&self, value: &[u8]) -> Option<Bytes> {
        if value.len() < self.min_bytes || value.len() > self.max_decompressed_bytes {
            return None;
        }
        let budget = self.frame_budget(value.len())?;
        let mut header = [0u8; MAX_HEADER_LEN];
        let header_len = write_header(&mut header, ALGORITHM_LZ4, value.len() as u64);
        if header_len >= budget {
            return None;
        }
        // lz4_flex insists on a worst-case-sized output slice even when we
        // will discard anything over budget. A per-thread scratch buffer
        // keeps that slice zeroed once instead of on every write (a 64 KiB
        // memset), and the frame is then one exact-size copy.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            let need = lz4_flex::block::get_maximum_output_size(value.len());
            if buf.len() < need {
                buf.resize(need, 0);
            }
            let block_len = lz4_flex::block::compress_into(value, &mut buf[..need]).ok()?;
            if header_len + block_len > budget {
                return None;
            }
            let mut frame = Vec::with_capacity(header_len + block_len);
            frame.extend_from_slice(&header[..header_len]);
            frame.extend_from_slice(&buf[..block_len]);
            // Large values are rare; don't keep megabytes per thread.
            if buf.len() > 4 << 20 {
                *buf = Vec::new();
            }
            Some(Bytes::from(frame))
        })
    }

    /// Largest frame that still saves `min_saving` of `len`, or `None` if no
    /// frame can.
    fn frame_budget(&self, len: usize) -> Option<usize> {
        let keep = 1.0 - self.min_saving.clamp(0.0, 1.0);
        if keep.is_nan() {
            return None;
        }
        // f64 is exact for any length a process can hold in memory here, and
        // `as` saturates rather than wrapping.
        Some((len as f64 * keep).floor() as usize)
    }

    /// Appends the RESP bulk string of the value a client should see for
    /// `stored` to `out`. Same result as framing [`Codec::decode`]'s value,
    /// but an LZ4 value is decoded straight into `out`: a 64 KiB reply is
    /// then written once instead of decoded and copied.
    ///
    /// # Errors
    ///
    /// As for [`Codec::decode`]; `out` is left as it was.
    pub fn decode_bulk_into(&self, stored: &[u8], out: &mut BytesMut) -> Result<(), CompressError> {
        let value = match self.decode_parts_lazy(stored)? {
            Lazy::Plain(v) => v,
            // Beyond 1 MiB the declared length is only trusted once the
            // block has decoded to it: zeroing it in `out` first would let
            // a forged frame make us touch 255x its size before failing.
            Lazy::Lz4 { declared, block } if declared > 1 << 20 => {
                let value = self.decompress(declared, block)?;
                crate::resp::bulk(out, &value);
                return Ok(());
            }
            Lazy::Lz4 { declared, block } => {
                let len = self.checked_len(declared, block)?;
                let at = out.len();
                out.reserve(len + 24);
                crate::resp::bulk_header(out, len);
                let start = out.len();
                out.resize(start + len, 0);
                match lz4_flex::block::decompress_into(block, &mut out[start..]) {
                    Ok(written) if written == len => {
                        out.put_slice(b"\r\n");
                        return Ok(());
                    }
                    r => {
                        out.truncate(at);
                        return Err(match r {
                            Ok(actual) => CompressError::LengthMismatch { declared, actual },
                            Err(e) => lz4_error(declared, &e),
                        });
                    }
                }
            }
        };
        out.reserve(value.len() + 24);
        crate::resp::bulk(out, value);
        Ok(())
    }

    /// The header checked, but nothing decompressed yet.
    fn decode_parts_lazy<'a>(&self, stored: &'a [u8]) -> Result<Lazy<'a>, CompressError> {
        if !is_compressed(stored) {
            return Ok(Lazy::Plain(stored));
        }
        let header = parse_header(stored)?;
        let payload = &stored[header.len..];
        if header.algorithm == ALGORITHM_RAW {
            check_raw_len(header.declared, payload.len())?;
            return Ok(Lazy::Plain(payload));
        }
        Ok(Lazy::Lz4 {
            declared: header.declared,
            block: payload,
        })
    }

    /// The declared length as a size to allocate, once it is proven sane:
    /// lz4_flex writes into a buffer we size from the header, so the header
    /// must be checked before that buffer exists.
    fn checked_len(&self, declared: u64, block: &[u8]) -> Result<usize, CompressError> {
        let len = usize::try_from(declared)
            .ok()
            .filter(|&len| len <= self.max_decompressed_bytes)
            .ok_or(CompressError::TooLarge {
                declared,
                limit: self.max_decompressed_bytes,
            })?;
        if declared > (block.len() as u64).saturating_mul(LZ4_MAX_EXPANSION) {
            return Err(CompressError::ImpossibleLength {
                declared,
                payload: block.len(),
            });
        }
        Ok(len)
    }

    fn decompress(&self, declared: u64, block: &[u8]) -> Result<Vec<u8>, CompressError> {
        let len = self.checked_len(declared, block)?;
        // `decompress` writes into the new vector's spare capacity (checked
        // against it) instead of a zeroed buffer: zeroing was ~10% of a
        // 64 KiB decode.
        let out = lz4_flex::block::decompress(block, len).map_err(|e| lz4_error(declared, &e))?;
        if out.len() != len {
            return Err(CompressError::LengthMismatch {
                declared,
                actual: out.len(),
            });
        }
        Ok(out)
    }
}

fn lz4_error(declared: u64, e: &lz4_flex::block::DecompressError) -> CompressError {
    match e {
        lz4_flex::block::DecompressError::OutputTooSmall { .. } => {
            CompressError::DecodedTooLong { declared }
        }
        other => CompressError::InvalidBlock {
            reason: lz4_reason(other),
        },
    }
}

/// A stored value before any decompression.
enum Lazy<'a> {
    /// What the client sees: unmarked, or a raw frame's payload.
    Plain(&'a [u8]),
    Lz4 {
        declared: u64,
        block: &'a [u8],
    },
}

/// Whether `value` is framed (LZ4 or raw) and so must go through
/// [`Codec::decode`] before a client sees it. Only looks at the magic.
#[must_use]
pub fn is_compressed(value: &[u8]) -> bool {
    value.starts_with(&MAGIC)
}

/// The length a client would see for `stored`, read from the header without
/// decompressing (for `STRLEN`-style commands).
///
/// Unmarked values report their own length. `None` means the header is
/// unreadable; `Some` does not promise that the LZ4 payload is intact.
#[must_use]
pub fn decoded_len(stored: &[u8]) -> Option<usize> {
    if !is_compressed(stored) {
        return Some(stored.len());
    }
    let header = parse_header(stored).ok()?;
    if header.algorithm == ALGORITHM_RAW {
        check_raw_len(header.declared, stored.len() - header.len).ok()?;
    }
    usize::try_from(header.declared).ok()
}

/// Where the client's bytes are, so `decode` and `decode_slice` can each
/// hand them out without copying.
enum Decoded {
    Unmarked,
    Raw { offset: usize },
    Decompressed(Vec<u8>),
}

struct Header {
    algorithm: u8,
    declared: u64,
    /// Bytes before the payload.
    len: usize,
}

/// Parses and validates a header; the caller has already checked the magic.
fn parse_header(stored: &[u8]) -> Result<Header, CompressError> {
    debug_assert!(is_compressed(stored));
    let truncated = || CompressError::TruncatedHeader { len: stored.len() };
    let (&version, rest) = stored[MAGIC.len()..].split_first().ok_or_else(truncated)?;
    // Checked before the rest because a future version may lay it out
    // differently: its "algorithm" byte would be meaningless to us.
    if version != FORMAT_VERSION {
        return Err(CompressError::UnsupportedVersion { version });
    }
    let (&algorithm, rest) = rest.split_first().ok_or_else(truncated)?;
    if algorithm != ALGORITHM_RAW && algorithm != ALGORITHM_LZ4 {
        return Err(CompressError::UnknownAlgorithm { id: algorithm });
    }
    let (declared, varint_len) = read_varint(rest, stored.len())?;
    Ok(Header {
        algorithm,
        declared,
        len: FIXED_HEADER_LEN + varint_len,
    })
}

fn check_raw_len(declared: u64, actual: usize) -> Result<(), CompressError> {
    if declared == actual as u64 {
        Ok(())
    } else {
        Err(CompressError::LengthMismatch { declared, actual })
    }
}

fn raw_frame(value: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_HEADER_LEN];
    let header_len = write_header(&mut header, ALGORITHM_RAW, value.len() as u64);
    let mut frame = Vec::with_capacity(header_len + value.len());
    frame.extend_from_slice(&header[..header_len]);
    frame.extend_from_slice(value);
    Bytes::from(frame)
}

/// Writes the header into `out` and returns its length.
fn write_header(out: &mut [u8; MAX_HEADER_LEN], algorithm: u8, len: u64) -> usize {
    out[..MAGIC.len()].copy_from_slice(&MAGIC);
    out[MAGIC.len()] = FORMAT_VERSION;
    out[MAGIC.len() + 1] = algorithm;
    FIXED_HEADER_LEN + write_varint(&mut out[FIXED_HEADER_LEN..], len)
}

/// Unsigned LEB128: 7 bits per byte, least significant group first, high bit
/// set on every byte but the last.
fn write_varint(out: &mut [u8], mut value: u64) -> usize {
    let mut i = 0;
    loop {
        let group = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out[i] = group;
            return i + 1;
        }
        out[i] = group | 0x80;
        i += 1;
    }
}

/// Reads a minimal LEB128 `u64`, returning it and the bytes consumed.
/// `frame_len` is only used to describe truncation.
fn read_varint(input: &[u8], frame_len: usize) -> Result<(u64, usize), CompressError> {
    let mut value = 0u64;
    for (i, &byte) in input.iter().enumerate().take(MAX_VARINT_LEN) {
        let group = u64::from(byte & 0x7F);
        // The tenth group only has room for bit 63.
        if i == MAX_VARINT_LEN - 1 && group > 1 {
            return Err(CompressError::MalformedLength);
        }
        value |= group << (7 * i);
        if byte & 0x80 == 0 {
            // A zero final group after other groups is padding: reject it so
            // every length has a single encoding.
            if i > 0 && byte == 0 {
                return Err(CompressError::MalformedLength);
            }
            return Ok((value, i + 1));
        }
    }
    if input.len() >= MAX_VARINT_LEN {
        Err(CompressError::MalformedLength)
    } else {
        Err(CompressError::TruncatedHeader { len: frame_len })
    }
}

fn lz4_reason(err: &lz4_flex::block::DecompressError) -> &'static str {
    use lz4_flex::block::DecompressError as E;
    match err {
        E::LiteralOutOfBounds => "literal run past end of block",
        E::ExpectedAnotherByte => "block ends mid-sequence",
        E::OffsetZero => "match offset 0",
        E::OffsetOutOfBounds => "match offset before start of output",
        // OutputTooSmall is mapped by the caller; the enum is non_exhaustive.
        _ => "undecodable block",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift64* so failures reproduce without a rand dep.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn json_like(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
            "juliet", "kilo", "lima",
        ];
        let mut rng = Rng(seed | 1);
        let mut out = String::from("[");
        let mut id = 0;
        while out.len() < len {
            id += 1;
            let w = |rng: &mut Rng| WORDS[rng.below(WORDS.len() as u64) as usize];
            out.push_str(&format!(
                r#"{{"id":{id},"name":"{} {}","score":{}.{:02},"tags":["{}","{}"],"active":{}}},"#,
                w(&mut rng),
                w(&mut rng),
                rng.below(1000),
                rng.below(100),
                w(&mut rng),
                w(&mut rng),
                rng.below(2) == 0,
            ));
        }
        out.truncate(len);
        out.into_bytes()
    }

    /// Compresses anything that doesn't expand, so tests reach the LZ4 path
    /// for small and barely-compressible inputs.
    fn eager() -> Codec {
        Codec {
            min_bytes: 0,
            min_saving: 0.0,
            ..Codec::default()
        }
    }

    fn store(codec: &Codec, value: &[u8]) -> Bytes {
        codec
            .encode(value)
            .unwrap_or_else(|| Bytes::copy_from_slice(value))
    }

    fn assert_round_trip(codec: &Codec, value: &[u8]) -> Bytes {
        let stored = store(codec, value);
        let decoded = codec.decode(&stored).expect("decode");
        assert_eq!(&decoded[..], value, "round trip of {} bytes", value.len());
        assert_eq!(decoded_len(&stored), Some(value.len()));
        assert_eq!(&codec.decode_slice(&stored).unwrap()[..], value);
        stored
    }

    fn lz4_frame(declared: u64, block: &[u8]) -> Bytes {
        frame_with(FORMAT_VERSION, ALGORITHM_LZ4, declared, block)
    }

    fn frame_with(version: u8, algorithm: u8, declared: u64, payload: &[u8]) -> Bytes {
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut header, algorithm, declared);
        header[MAGIC.len()] = version;
        [&header[..n], payload].concat().into()
    }

    fn header_len_of(frame: &[u8]) -> usize {
        parse_header(frame).unwrap().len
    }

    #[test]
    fn golden_raw_frame_layout() {
        // Pins the on-disk format: changing these bytes breaks stored data.
        let frame = Codec::default().encode(&MAGIC).unwrap();
        assert_eq!(
            &frame[..],
            &[0xFE, b'R', b'S', b'P', 1, 0, 4, 0xFE, b'R', b'S', b'P']
        );
    }

    #[test]
    fn golden_lz4_frame_header() {
        let value = vec![b'a'; 300];
        let frame = eager().encode(&value).unwrap();
        // 300 = 0b10_0101100 -> LEB128 AC 02.
        assert_eq!(&frame[..8], &[0xFE, b'R', b'S', b'P', 1, 1, 0xAC, 0x02]);
        // Any LZ4 block decoder can read the payload given the header length.
        assert_eq!(
            lz4_flex::block::decompress(&frame[8..], 300).unwrap(),
            value
        );
    }

    #[test]
    fn varint_boundaries() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut buf = [0u8; MAX_VARINT_LEN];
            let n = write_varint(&mut buf, value);
            assert_eq!(read_varint(&buf[..n], 0), Ok((value, n)), "{value}");
        }
        let mut buf = [0u8; MAX_VARINT_LEN];
        assert_eq!(write_varint(&mut buf, u64::MAX), MAX_VARINT_LEN);
    }

    #[test]
    fn round_trips_random_binary_of_many_sizes() {
        let mut rng = Rng(0x5EED);
        for len in [
            0, 1, 2, 3, 4, 5, 11, 12, 13, 15, 16, 63, 64, 65, 255, 256, 1023, 1024, 1025, 4096,
            65_535, 65_536, 65_537, 300_000,
        ] {
            let value = rng.bytes(len);
            for codec in [Codec::default(), eager()] {
                assert_round_trip(&codec, &value);
            }
        }
    }

    #[test]
    fn round_trips_empty() {
        for codec in [Codec::default(), eager()] {
            assert_eq!(codec.encode(b""), None, "a frame can't beat 0 bytes");
            assert_round_trip(&codec, b"");
        }
    }

    #[test]
    fn round_trips_compressible_and_mixed_values() {
        let mut rng = Rng(7);
        let json = json_like(4 << 20, 1);
        let stored = assert_round_trip(&Codec::default(), &json);
        assert!(is_compressed(&stored));
        assert!(stored.len() < json.len() / 2, "{} bytes", stored.len());

        // Alternating compressible and random runs.
        let mut mixed = Vec::new();
        for i in 0..64 {
            if i % 2 == 0 {
                mixed.extend(json_like(2000, i));
            } else {
                mixed.extend(rng.bytes(2000));
            }
        }
        assert_round_trip(&Codec::default(), &mixed);
        assert_round_trip(&eager(), &mixed);

        for len in [1, 1000, 1024, 70_000] {
            assert_round_trip(&eager(), &json_like(len, len as u64));
            assert_round_trip(&eager(), &vec![0u8; len]);
        }
    }

    #[test]
    fn maximal_compression_respects_expansion_bound() {
        // Zeros compress as well as LZ4 can; the ImpossibleLength check must
        // never reject what the encoder itself produced.
        let zeros = vec![0u8; 16 << 20];
        let stored = assert_round_trip(&Codec::default(), &zeros);
        let block = stored.len() - header_len_of(&stored);
        assert!((zeros.len() as u64) <= block as u64 * LZ4_MAX_EXPANSION);
    }

    #[test]
    fn pass_through_is_zero_copy() {
        let value = Bytes::from(vec![b'x'; 10]);
        let decoded = Codec::default().decode(&value).unwrap();
        assert_eq!(decoded.as_ptr(), value.as_ptr());
        assert!(matches!(
            Codec::default().decode_slice(&value).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn raw_frame_decode_is_zero_copy() {
        let value = [&MAGIC[..], b"tiny"].concat();
        let stored = Codec::default().encode(&value).unwrap();
        let decoded = Codec::default().decode(&stored).unwrap();
        assert_eq!(decoded, value);
        assert_eq!(decoded.as_ptr(), stored[header_len_of(&stored)..].as_ptr());
    }

    #[test]
    fn magic_prefixed_values_are_always_framed() {
        let mut rng = Rng(99);
        let codec = Codec::default();
        let cases = [
            MAGIC.to_vec(),
            [&MAGIC[..], b"x"].concat(),
            // Looks like a whole valid frame; must survive as literal bytes.
            codec.encode(&json_like(5000, 3)).unwrap().to_vec(),
            // Looks like a frame with a bad version.
            [&MAGIC[..], &[9, 9, 9]].concat(),
            // Big and incompressible.
            [&MAGIC[..], &rng.bytes(100_000)].concat(),
        ];
        for value in cases {
            let stored = codec.encode(&value).expect("magic-prefixed must be framed");
            assert_eq!(parse_header(&stored).unwrap().algorithm, ALGORITHM_RAW);
            assert_round_trip(&codec, &value);
            assert_round_trip(&eager(), &value);
        }

        // Compressible ones get LZ4 rather than the raw escape.
        let value = [&MAGIC[..], &json_like(10_000, 4)].concat();
        let stored = codec.encode(&value).unwrap();
        assert_eq!(parse_header(&stored).unwrap().algorithm, ALGORITHM_LZ4);
        assert_round_trip(&codec, &value);
    }

    #[test]
    fn double_encoding_is_exact() {
        let codec = eager();
        let value = json_like(3000, 5);
        let once = codec.encode(&value).unwrap();
        let twice = codec.encode(&once).unwrap();
        assert_eq!(codec.decode(&twice).unwrap(), once);
        assert_eq!(codec.decode(&once).unwrap(), value);
    }

    #[test]
    fn partial_magic_is_not_framed() {
        for value in [&b"\xFE"[..], b"\xFER", b"\xFERS", b"\xFERSp", b"\xFFRSP"] {
            assert!(!is_compressed(value));
            assert_eq!(Codec::default().encode(value), None);
            assert_round_trip(&Codec::default(), value);
        }
    }

    #[test]
    fn min_bytes_threshold() {
        let codec = Codec::default();
        assert_eq!(codec.encode(&json_like(1023, 1)), None);
        assert!(codec.encode(&json_like(1024, 1)).is_some());
        let codec = Codec {
            min_bytes: 5000,
            ..Codec::default()
        };
        assert_eq!(codec.encode(&vec![0u8; 4999]), None);
        assert!(codec.encode(&vec![0u8; 5000]).is_some());
    }

    #[test]
    fn min_saving_threshold() {
        // Half compressible, half random: saves a moderate fraction.
        let mut value = json_like(8000, 2);
        value.extend(Rng(3).bytes(8000));
        let frame = eager().encode(&value).unwrap();
        let saving = 1.0 - frame.len() as f64 / value.len() as f64;
        assert!(saving > 0.05 && saving < 0.95, "saving {saving}");

        let with = |min_saving| Codec {
            min_saving,
            ..Codec::default()
        };
        assert_eq!(with(saving - 0.001).encode(&value), Some(frame.clone()));
        assert_eq!(with(saving + 0.001).encode(&value), None);
        // Out-of-range settings are clamped; NaN means never.
        assert_eq!(with(-3.0).encode(&value), Some(frame));
        assert_eq!(with(1.0).encode(&value), None);
        assert_eq!(with(7.0).encode(&value), None);
        assert_eq!(with(f64::NAN).encode(&value), None);
        // Magic-prefixed values are still escaped when compression is off.
        let magic = [&MAGIC[..], &value].concat();
        assert_round_trip(&with(f64::NAN), &magic);
    }

    #[test]
    fn random_data_is_not_compressed_by_default() {
        assert_eq!(Codec::default().encode(&Rng(1).bytes(100_000)), None);
    }

    #[test]
    fn never_compresses_beyond_decode_limit() {
        let codec = Codec {
            max_decompressed_bytes: 4096,
            ..Codec::default()
        };
        assert!(codec.encode(&vec![0u8; 4096]).is_some());
        assert_eq!(codec.encode(&vec![0u8; 4097]), None);
        // Raw frames need no allocation, so the limit doesn't apply to them.
        let magic = [&MAGIC[..], &vec![0u8; 10_000]].concat();
        assert_round_trip(&codec, &magic);
    }

    #[test]
    fn truncated_headers() {
        let codec = Codec::default();
        for stored in [
            MAGIC.to_vec(),
            [&MAGIC[..], &[1]].concat(),
            [&MAGIC[..], &[1, 1]].concat(),
            [&MAGIC[..], &[1, 1, 0x80]].concat(),
            [&MAGIC[..], &[1, 0, 0xFF, 0xFF, 0xFF]].concat(),
        ] {
            let len = stored.len();
            assert_eq!(
                codec.decode(&stored.into()),
                Err(CompressError::TruncatedHeader { len })
            );
        }
    }

    #[test]
    fn every_prefix_of_a_frame_is_rejected() {
        let codec = Codec::default();
        let value = json_like(5000, 6);
        let frame = codec.encode(&value).unwrap();
        for cut in MAGIC.len()..frame.len() {
            assert!(codec.decode(&frame.slice(..cut)).is_err(), "cut at {cut}");
            assert_eq!(
                decoded_len(&frame[..cut]).is_some(),
                cut >= header_len_of(&frame)
            );
        }
        let raw = codec.encode(&[&MAGIC[..], b"payload"].concat()).unwrap();
        for cut in MAGIC.len()..raw.len() {
            assert!(codec.decode(&raw.slice(..cut)).is_err(), "cut at {cut}");
            assert_eq!(decoded_len(&raw[..cut]), None);
        }
    }

    #[test]
    fn bad_version() {
        for version in [0, 2, 0x7F, 0xFF] {
            let stored = frame_with(version, ALGORITHM_LZ4, 3, b"\x30abc");
            assert_eq!(
                Codec::default().decode(&stored),
                Err(CompressError::UnsupportedVersion { version })
            );
            assert_eq!(decoded_len(&stored), None);
        }
    }

    #[test]
    fn bad_algorithm() {
        for id in [2, 3, 0x80, 0xFF] {
            let stored = frame_with(FORMAT_VERSION, id, 3, b"\x30abc");
            assert_eq!(
                Codec::default().decode(&stored),
                Err(CompressError::UnknownAlgorithm { id })
            );
            assert_eq!(decoded_len(&stored), None);
        }
    }

    #[test]
    fn malformed_length_fields() {
        let prefix = [&MAGIC[..], &[FORMAT_VERSION, ALGORITHM_LZ4]].concat();
        for varint in [
            &[0x80, 0x00][..],
            &[0x85, 0x80, 0x00],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02],
            &[
                0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
        ] {
            let stored: Bytes = [&prefix[..], varint, b"\x10a"].concat().into();
            assert_eq!(
                Codec::default().decode(&stored),
                Err(CompressError::MalformedLength),
                "{varint:x?}"
            );
            assert_eq!(decoded_len(&stored), None);
        }
    }

    #[test]
    fn huge_declared_length_fails_before_allocating() {
        let codec = Codec::default();
        let limit = codec.max_decompressed_bytes;
        for declared in [limit as u64 + 1, u32::MAX as u64 + 1, u64::MAX] {
            assert_eq!(
                codec.decode(&lz4_frame(declared, b"\x00")),
                Err(CompressError::TooLarge { declared, limit })
            );
        }
        // Under the limit but impossible for a 2-byte block: rejected before
        // a 400 MB buffer would be zeroed.
        assert_eq!(
            codec.decode(&lz4_frame(400 << 20, b"\x1F\x00")),
            Err(CompressError::ImpossibleLength {
                declared: 400 << 20,
                payload: 2
            })
        );
        // decoded_len reports it (STRLEN can't know without decompressing).
        assert_eq!(
            decoded_len(&lz4_frame(400 << 20, b"\x1F\x00")),
            Some(400 << 20)
        );
    }

    #[test]
    fn length_mismatch_either_way() {
        let codec = Codec::default();
        let value = json_like(5000, 8);
        let block = lz4_flex::block::compress(&value);
        let len = value.len() as u64;
        assert_eq!(
            &codec.decode(&lz4_frame(len, &block)).unwrap()[..],
            &value[..]
        );
        assert_eq!(
            codec.decode(&lz4_frame(len + 1, &block)),
            Err(CompressError::LengthMismatch {
                declared: len + 1,
                actual: value.len()
            })
        );
        assert_eq!(
            codec.decode(&lz4_frame(len - 1, &block)),
            Err(CompressError::DecodedTooLong { declared: len - 1 })
        );
        assert_eq!(
            codec.decode(&lz4_frame(0, &block)),
            Err(CompressError::DecodedTooLong { declared: 0 })
        );

        for declared in [0, 6, 8] {
            let raw = frame_with(FORMAT_VERSION, ALGORITHM_RAW, declared, b"1234567");
            assert_eq!(
                codec.decode(&raw),
                Err(CompressError::LengthMismatch {
                    declared,
                    actual: 7
                })
            );
            assert_eq!(decoded_len(&raw), None);
        }
    }

    #[test]
    fn garbage_blocks_are_errors_not_panics() {
        let codec = Codec::default();
        let mut rng = Rng(0xBAD);
        let mut errors = 0;
        for _ in 0..20_000 {
            let len = rng.below(64) as usize;
            let block = rng.bytes(len);
            let declared = rng.below(4096);
            match codec.decode(&lz4_frame(declared, &block)) {
                Ok(v) => assert_eq!(v.len() as u64, declared),
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 19_000, "{errors}");
        // Declared 0 is the only length an empty block could claim.
        assert!(codec.decode(&lz4_frame(0, b"")).is_err());
        assert_eq!(
            codec.decode(&lz4_frame(1, b"")),
            Err(CompressError::ImpossibleLength {
                declared: 1,
                payload: 0
            })
        );

        // Named cases for each lz4_flex error.
        for (block, want) in [
            (&b"\x10a\x01"[..], "block ends mid-sequence"),
            (b"\x50ab", "literal run past end of block"),
            (b"\x10a\x00\x00", "match offset 0"),
            (b"\x10a\x05\x00", "match offset before start of output"),
        ] {
            assert_eq!(
                codec.decode(&lz4_frame(100, block)),
                Err(CompressError::InvalidBlock { reason: want }),
                "{block:x?}"
            );
        }
    }

    #[test]
    fn decode_bulk_into_frames_what_decode_returns() {
        let codec = Codec::default();
        let mut rng = Rng(0xB01C);
        let mut inputs: Vec<Bytes> = vec![
            Bytes::new(),
            Bytes::from_static(b"plain"),
            Bytes::from(MAGIC.to_vec()),
        ];
        for len in [1, 1023, 1024, 5000, 70_000, (1 << 20) + 1] {
            let v = json_like(len, len as u64);
            inputs.push(codec.encode(&v).unwrap_or_else(|| Bytes::from(v.clone())));
            let mut magic = MAGIC.to_vec();
            magic.extend(rng.bytes(len));
            inputs.push(codec.encode(&magic).unwrap());
        }
        let frame = codec.encode(&json_like(3000, 9)).unwrap();
        for i in 0..frame.len() {
            let mut corrupt = frame.to_vec();
            corrupt[i] ^= 1 << (i % 8);
            inputs.push(Bytes::from(corrupt));
        }
        for _ in 0..2000 {
            let n = rng.below(64) as usize;
            let block = rng.bytes(n);
            inputs.push(lz4_frame(rng.below(4096), &block));
        }
        let (mut ok, mut err) = (0, 0);
        for stored in &inputs {
            let mut out = BytesMut::from(&b"before"[..]);
            let got = codec.decode_bulk_into(stored, &mut out);
            match codec.decode(stored) {
                Ok(v) => {
                    assert_eq!(got, Ok(()));
                    let mut want = BytesMut::from(&b"before"[..]);
                    crate::resp::bulk(&mut want, &v);
                    assert_eq!(out, want);
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(got, Err(e));
                    assert_eq!(&out[..], b"before", "left as it was");
                    err += 1;
                }
            }
        }
        assert!(ok > 20 && err > 1000, "{ok} {err}");
    }

    #[test]
    fn bit_flips_never_panic() {
        // LZ4 blocks carry no checksum, so a flipped literal can decode
        // "successfully"; what matters is no panic and a length-exact result.
        let codec = Codec::default();
        let frame = codec.encode(&json_like(3000, 9)).unwrap();
        for i in 0..frame.len() {
            for bit in 0..8 {
                let mut corrupt = frame.to_vec();
                corrupt[i] ^= 1 << bit;
                let corrupt = Bytes::from(corrupt);
                if let Ok(v) = codec.decode(&corrupt) {
                    assert_eq!(Some(v.len()), decoded_len(&corrupt));
                }
            }
        }
    }

    #[test]
    fn decoded_len_matches_without_decompressing() {
        assert_eq!(decoded_len(b"plain"), Some(5));
        assert_eq!(decoded_len(b""), Some(0));
        let value = json_like(100_000, 10);
        let stored = Codec::default().encode(&value).unwrap();
        assert_eq!(decoded_len(&stored), Some(100_000));
        assert_eq!(decoded_len(&MAGIC), None);
    }

    #[test]
    fn error_messages_fit_a_redis_error_reply() {
        let errors = [
            CompressError::TruncatedHeader { len: 5 },
            CompressError::UnsupportedVersion { version: 2 },
            CompressError::UnknownAlgorithm { id: 9 },
            CompressError::MalformedLength,
            CompressError::TooLarge {
                declared: u64::MAX,
                limit: 1,
            },
            CompressError::ImpossibleLength {
                declared: 1 << 30,
                payload: 2,
            },
            CompressError::LengthMismatch {
                declared: 1,
                actual: 2,
            },
            CompressError::DecodedTooLong { declared: 3 },
            CompressError::InvalidBlock { reason: "x" },
        ];
        for err in errors {
            let msg = err.to_string();
            assert!(!msg.contains(['\r', '\n']), "{msg}");
            assert!(
                msg.starts_with("corrupt compressed value (")
                    || msg.starts_with("compressed value too large (")
            );
            assert!(msg.ends_with(')'), "{msg}");
        }
    }
}
