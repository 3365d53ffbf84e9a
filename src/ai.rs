//! AI response cache: key format, `AI.*` argument parsing, TTL table and stats.
//!
//! The key format is shared with existing Python applications, so every
//! detail here (separators, digest lengths, how option values are turned
//! into text, what counts as whitespace) mirrors what CPython does. The
//! vectors in `shared/ai-key-vectors.json` are the reference.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::Md5;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Prefix of every AI cache key.
pub const KEY_PREFIX: &str = "ai_cache:";

/// Errors from key generation and `AI.*` argument parsing. The messages are
/// sent to clients as `-ERR <message>`, so they carry no prefix themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiError {
    #[error("wrong number of arguments for '{0}' command")]
    WrongArity(&'static str),
    #[error("unknown AI command '{0}'")]
    UnknownCommand(String),
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("invalid OPTIONS JSON: {0}")]
    InvalidOptionsJson(String),
    #[error("OPTIONS must be a JSON object")]
    OptionsNotObject,
    #[error("nested value for option '{0}' is not supported")]
    NestedOption(String),
    #[error("unknown flag '{flag}' for '{command}' command")]
    UnknownFlag { flag: String, command: &'static str },
    #[error("{0} given more than once")]
    DuplicateFlag(&'static str),
    #[error("{0} requires a value")]
    MissingFlagValue(&'static str),
    #[error("EX must be a positive integer of at most {max}")]
    InvalidExpire { max: u64 },
}

/// Builds the cache key for one AI request.
///
/// `options` values must be scalars (string, number, bool, null); an empty
/// map and an empty or absent question add nothing to the key.
pub fn ai_key(
    operation: &str,
    text: &str,
    options: Option<&Map<String, Value>>,
    question: Option<&str>,
    threshold: usize,
) -> Result<String, AiError> {
    let opts = options_digest(options, None)?;
    Ok(build_key(
        operation,
        text,
        char_count(text),
        opts,
        question,
        threshold,
    ))
}

/// Assembles a key from its parts. The options digest is computed by the
/// caller beforehand: it is the only fallible part, and failing before
/// hashing a large text keeps bad requests cheap.
fn build_key(
    operation: &str,
    text: &str,
    chars: usize,
    opts: Option<String>,
    question: Option<&str>,
    threshold: usize,
) -> String {
    let inline = chars <= threshold;
    let mut key = String::with_capacity(
        KEY_PREFIX.len() + operation.len() + if inline { text.len() } else { 21 } + 40,
    );
    key.push_str(KEY_PREFIX);
    key.push_str("op:");
    key.push_str(operation);
    key.push_str("|txt:");
    if inline {
        // `|` and `:` are the key's own separators. Copying the runs between
        // them is much faster than pushing characters one at a time.
        let mut run = 0;
        for (i, b) in text.bytes().enumerate() {
            if b == b'|' || b == b':' {
                key.push_str(&text[run..i]);
                key.push('_');
                run = i + 1;
            }
        }
        key.push_str(&text[run..]);
    } else {
        key.push_str("hash:");
        key.push_str(&text_hash(text, chars));
    }
    if let Some(opts) = opts {
        key.push_str("|opts:");
        key.push_str(&opts);
    }
    if let Some(q) = question.filter(|q| !q.is_empty()) {
        key.push_str("|q:");
        key.push_str(&hex_prefix(&Md5::digest(q.as_bytes()), 8));
    }
    key
}

/// First 16 hex digits of SHA-256 over `text`, `len:{chars}`, `words:{words}`,
/// concatenated with no separator (that is what the Python side hashes).
fn text_hash(text: &str, chars: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let suffix = format!("len:{chars}words:{}", word_count(text));
    hasher.update(suffix.as_bytes());
    hex_prefix(&hasher.finalize(), 16)
}

/// MD5 over `k1=v1&k2=v2…` with keys in code-point order and values rendered
/// like Python's `str()`; `None` for absent or empty options.
///
/// `literals` maps keys to the number literals they had in the client's JSON
/// (see `number_literals`); numbers are rendered from those when present.
fn options_digest(
    options: Option<&Map<String, Value>>,
    literals: Option<&HashMap<String, &str>>,
) -> Result<Option<String>, AiError> {
    let Some(map) = options.filter(|m| !m.is_empty()) else {
        return Ok(None);
    };
    // serde_json's map is only sorted without its `preserve_order` feature,
    // which another crate in the graph may switch on; sort explicitly.
    // Byte order of UTF-8 equals code-point order, which is Python's order.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Md5::new();
    let mut buf = String::new();
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            hasher.update(b"&");
        }
        hasher.update(k.as_bytes());
        hasher.update(b"=");
        let text: &str = match v {
            Value::String(s) => s,
            Value::Bool(true) => "True",
            Value::Bool(false) => "False",
            Value::Null => "None",
            Value::Number(n) => {
                buf.clear();
                if let Some(lit) = literals.and_then(|l| l.get(k.as_str())) {
                    py_number_from_literal(lit, &mut buf);
                } else if let Some(i) = n.as_i64() {
                    let _ = write!(buf, "{i}");
                } else if let Some(u) = n.as_u64() {
                    let _ = write!(buf, "{u}");
                } else if let Some(f) = n.as_f64() {
                    buf.push_str(&py_float_repr(f));
                }
                &buf
            }
            Value::Array(_) | Value::Object(_) => return Err(AiError::NestedOption(k.clone())),
        };
        hasher.update(text.as_bytes());
    }
    Ok(Some(hex_prefix(&hasher.finalize(), 8)))
}

/// Python's `str(json.loads(lit))` for a JSON number literal.
fn py_number_from_literal(lit: &str, out: &mut String) {
    if lit.contains(['.', 'e', 'E']) {
        // std's parser rounds correctly, like CPython's float().
        match lit.parse::<f64>() {
            Ok(f) => out.push_str(&py_float_repr(f)),
            Err(_) => out.push_str(lit),
        }
    } else if lit.trim_start_matches('-').bytes().all(|b| b == b'0') {
        // JSON forbids other leading zeros, so only "-0" needs normalising:
        // Python reads it as the integer 0.
        out.push('0');
    } else {
        // Python ints are unbounded; the literal is already canonical.
        out.push_str(lit);
    }
}

/// Number literals by key in a flat JSON object that serde_json has already
/// accepted; the last of duplicate keys wins, as in serde_json and Python.
///
/// Python parses numbers from their text: integers of any size stay exact,
/// "-0" is the integer 0 and floats round correctly. serde_json turns big
/// integers and "-0" into floats, and without its `float_roundtrip` feature
/// misrounds about one literal in six with an exponent (e.g. `1e-30`), any
/// of which would change the key. Returns `None` on anything unexpected
/// (such as nesting, which is rejected later anyway).
fn number_literals(json: &[u8]) -> Option<HashMap<String, &str>> {
    let s = std::str::from_utf8(json).ok()?;
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            *i += 1;
        }
    };
    // `i` at an opening quote; returns the index past the closing one.
    let skip_string = |mut i: usize| -> Option<usize> {
        i += 1;
        loop {
            match b.get(i)? {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
    };
    let mut out = HashMap::new();
    skip_ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    skip_ws(&mut i);
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(i)?;
        let key: String = serde_json::from_str(&s[i..key_end]).ok()?;
        i = key_end;
        skip_ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        match b.get(i)? {
            b'"' => {
                i = skip_string(i)?;
                out.remove(&key);
            }
            b'{' | b'[' => return None,
            _ => {
                let start = i;
                while !matches!(
                    b.get(i),
                    None | Some(b',' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    i += 1;
                }
                let lit = &s[start..i];
                if lit.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                    out.insert(key, lit);
                } else {
                    out.remove(&key);
                }
            }
        }
        skip_ws(&mut i);
        match b.get(i)? {
            b',' => {
                i += 1;
                skip_ws(&mut i);
            }
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

fn hex_prefix(digest: &[u8], hex_digits: usize) -> String {
    let mut s = hex::encode(&digest[..hex_digits.div_ceil(2)]);
    s.truncate(hex_digits);
    s
}

/// Python's `repr(float)` (= `str(float)`): shortest round-trip digits,
/// positional notation for decimal exponents in [-4, 16), otherwise
/// scientific with a signed exponent of at least two digits.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` yields the shortest round-trip digits, e.g. "-1.25e-7",
    // but when two such strings are equally near it takes the upper one and
    // CPython the even one (223712169836953.625 -> "...53.62"). Formatting
    // to that many digits rounds exactly, ties to even; keep that result
    // whenever it still reads back as `f`.
    let shortest = format!("{f:e}");
    let digits = shortest
        .bytes()
        .take_while(|&b| b != b'e')
        .filter(u8::is_ascii_digit)
        .count();
    let even = format!("{f:.prec$e}", prec = digits.saturating_sub(1));
    let sci = if even.parse::<f64>() == Ok(f) {
        even
    } else {
        shortest
    };
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return sci;
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    if !(-4..16).contains(&exp) {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs());
    }
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    let mut out = String::with_capacity(digits.len() + 8);
    out.push_str(sign);
    if exp < 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
    out
}

/// Number of Unicode code points, i.e. Python's `len(str)`.
fn char_count(text: &str) -> usize {
    // Counting non-continuation bytes with byte-wide sums per chunk
    // vectorises; `chars().count()` is several times slower on large texts.
    let is_start = |b: u8| u8::from((b as i8) >= -0x40);
    let (chunks, tail) = text.as_bytes().as_chunks::<128>();
    let mut n = 0;
    for c in chunks {
        n += usize::from(c.iter().fold(0u8, |acc, &b| acc + is_start(b)));
    }
    n + tail
        .iter()
        .map(|&b| usize::from(is_start(b)))
        .sum::<usize>()
}

/// Python's `len(text.split())`. Not `char::is_whitespace`: Rust's set
/// differs (it excludes U+001C..=U+001F and includes U+200E/U+200F).
///
/// Decoding character by character would be slower than the SHA-256 that
/// follows, so this counts in two vectorisable passes: words as if only
/// ASCII whitespace existed, then a correction around each of the rare
/// multi-byte whitespace characters.
fn word_count(text: &str) -> usize {
    let b = text.as_bytes();
    let (chunks, tail) = b.as_chunks::<64>();
    let mut words = 0;
    // Whether the byte before the current chunk is ASCII whitespace; the
    // start of the text counts as whitespace.
    let mut prev_space = true;
    for (n, c) in chunks.iter().enumerate() {
        // A word starts at a non-whitespace byte after a whitespace byte. A
        // continuation byte always follows a non-ASCII byte, so it never
        // counts. Flags and sums a byte wide are what vectorise here.
        let mut sp = [0u8; 65];
        sp[0] = u8::from(prev_space);
        for j in 0..64 {
            sp[j + 1] = u8::from(ascii_space(c[j]));
        }
        let mut starts = 0u8;
        for j in 0..64 {
            starts += sp[j] & !sp[j + 1] & 1;
        }
        words += usize::from(starts);
        prev_space = sp[64] != 0;
        if any_lead(c) {
            // Narrow down before going byte by byte.
            for (k, part) in c.as_chunks::<16>().0.iter().enumerate() {
                if !any_lead(part) {
                    continue;
                }
                for (j, &x) in part.iter().enumerate() {
                    if may_lead_space(x) {
                        words = correct_for_multibyte_space(b, n * 64 + k * 16 + j, words);
                    }
                }
            }
        }
    }
    let base = b.len() - tail.len();
    for (j, &c) in tail.iter().enumerate() {
        words += usize::from(prev_space & !ascii_space(c));
        prev_space = ascii_space(c);
        if may_lead_space(c) {
            words = correct_for_multibyte_space(b, base + j, words);
        }
    }
    words
}

/// Whether any byte may lead a multi-byte whitespace character. A `fold`
/// over bytes, unlike `any`, does not stop early and so vectorises.
fn any_lead(c: &[u8]) -> bool {
    c.iter()
        .fold(0u8, |acc, &x| acc | u8::from(may_lead_space(x)))
        != 0
}

/// Adjusts a count made with ASCII whitespace only, which took the character
/// at `b[at..]`, if it is multi-byte whitespace, for part of a word: that
/// counted a start at it when whitespace preceded it, and none at the
/// character after it.
fn correct_for_multibyte_space(b: &[u8], at: usize, mut words: usize) -> usize {
    let Some(len) = multibyte_space_len(&b[at..]) else {
        return words;
    };
    if at == 0 || ascii_space(b[at - 1]) {
        words -= 1;
    }
    if let Some(&next) = b.get(at + len)
        && !ascii_space(next)
        && multibyte_space_len(&b[at + len..]).is_none()
    {
        words += 1;
    }
    words
}

/// ASCII whitespace per Python: \t \n \v \f \r, FS GS RS US and space.
/// Comparisons rather than a table lookup, so that loops vectorise.
fn ascii_space(c: u8) -> bool {
    (c == b' ') | (c.wrapping_sub(0x09) < 5) | (c.wrapping_sub(0x1C) < 4)
}

/// Lead bytes of the multi-byte whitespace characters.
fn may_lead_space(c: u8) -> bool {
    (c == 0xC2) | (c.wrapping_sub(0xE1) < 3)
}

/// Byte length of the character at the start of `s` (valid UTF-8) if it is
/// one of the non-ASCII characters for which Python's `str.isspace()` is
/// true: U+0085, U+00A0, U+1680, U+2000..=U+200A, U+2028, U+2029, U+202F,
/// U+205F, U+3000.
fn multibyte_space_len(s: &[u8]) -> Option<usize> {
    match s {
        [0xC2, 0x85 | 0xA0, ..] => Some(2),
        [0xE1, 0x9A, 0x80, ..]
        | [0xE2, 0x80, 0x80..=0x8A | 0xA8 | 0xA9 | 0xAF, ..]
        | [0xE2, 0x81, 0x9F, ..]
        | [0xE3, 0x80, 0x80, ..] => Some(3),
        _ => None,
    }
}

/// Text-size tier of a request, as in the Python applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Small,
    Medium,
    Large,
    XLarge,
}

impl Tier {
    const ALL: [Tier; 4] = [Tier::Small, Tier::Medium, Tier::Large, Tier::XLarge];

    /// Name used in stats fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Small => "small",
            Tier::Medium => "medium",
            Tier::Large => "large",
            Tier::XLarge => "xlarge",
        }
    }
}

/// Exclusive upper bounds, in characters, of the small/medium/large tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierBounds {
    pub small: usize,
    pub medium: usize,
    pub large: usize,
}

impl Default for TierBounds {
    fn default() -> Self {
        TierBounds {
            small: 500,
            medium: 5000,
            large: 50000,
        }
    }
}

/// Tier of a text of `chars` code points.
pub fn tier(chars: usize, bounds: &TierBounds) -> Tier {
    if chars < bounds.small {
        Tier::Small
    } else if chars < bounds.medium {
        Tier::Medium
    } else if chars < bounds.large {
        Tier::Large
    } else {
        Tier::XLarge
    }
}

/// The `[ai]` config section. Keys: `text_hash_threshold`, `default_ttl`,
/// `tier_small`, `tier_medium`, `tier_large` and an `[ai.operation_ttls]`
/// table, whose entries are merged over the built-in per-operation TTLs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(try_from = "AiConfigToml", into = "AiConfigToml")]
pub struct AiConfig {
    pub text_hash_threshold: usize,
    pub default_ttl: u64,
    pub operation_ttls: HashMap<String, u64>,
    pub tiers: TierBounds,
}

impl Default for AiConfig {
    fn default() -> Self {
        let operation_ttls = [
            ("summarize", 7200),
            ("sentiment", 86400),
            ("key_points", 7200),
            ("questions", 3600),
            ("qa", 1800),
        ]
        .into_iter()
        .map(|(op, ttl)| (op.to_owned(), ttl))
        .collect();
        AiConfig {
            text_hash_threshold: 1000,
            default_ttl: 3600,
            operation_ttls,
            tiers: TierBounds::default(),
        }
    }
}

impl AiConfig {
    /// TTL in seconds for entries of `operation`.
    pub fn ttl_for(&self, operation: &str) -> u64 {
        self.operation_ttls
            .get(operation)
            .copied()
            .unwrap_or(self.default_ttl)
    }
}

/// The flat on-disk shape; `AiConfig` groups the tier bounds and validates.
#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
struct AiConfigToml {
    text_hash_threshold: usize,
    default_ttl: u64,
    operation_ttls: HashMap<String, u64>,
    tier_small: usize,
    tier_medium: usize,
    tier_large: usize,
}

impl Default for AiConfigToml {
    fn default() -> Self {
        let d = AiConfig::default();
        AiConfigToml {
            text_hash_threshold: d.text_hash_threshold,
            default_ttl: d.default_ttl,
            // Empty: the built-in table is merged in by `try_from`.
            operation_ttls: HashMap::new(),
            tier_small: d.tiers.small,
            tier_medium: d.tiers.medium,
            tier_large: d.tiers.large,
        }
    }
}

impl From<AiConfig> for AiConfigToml {
    fn from(c: AiConfig) -> Self {
        AiConfigToml {
            text_hash_threshold: c.text_hash_threshold,
            default_ttl: c.default_ttl,
            operation_ttls: c.operation_ttls,
            tier_small: c.tiers.small,
            tier_medium: c.tiers.medium,
            tier_large: c.tiers.large,
        }
    }
}

impl TryFrom<AiConfigToml> for AiConfig {
    type Error = String;

    fn try_from(raw: AiConfigToml) -> Result<Self, String> {
        // A zero TTL would turn every AI.SET into an invalid SET … EX 0.
        if raw.default_ttl == 0 {
            return Err("ai.default_ttl must be positive".into());
        }
        if let Some((op, _)) = raw.operation_ttls.iter().find(|(_, ttl)| **ttl == 0) {
            return Err(format!("ai.operation_ttls.{op} must be positive"));
        }
        if !(raw.tier_small <= raw.tier_medium && raw.tier_medium <= raw.tier_large) {
            return Err("ai.tier_small <= ai.tier_medium <= ai.tier_large must hold".into());
        }
        let mut operation_ttls = AiConfig::default().operation_ttls;
        operation_ttls.extend(raw.operation_ttls);
        Ok(AiConfig {
            text_hash_threshold: raw.text_hash_threshold,
            default_ttl: raw.default_ttl,
            operation_ttls,
            tiers: TierBounds {
                small: raw.tier_small,
                medium: raw.tier_medium,
                large: raw.tier_large,
            },
        })
    }
}

/// One parsed key-addressed request (`AI.KEY`, `AI.GET`, `AI.DEL`, `AI.SET`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiRequest {
    pub key: String,
    pub operation: String,
    /// Text length in code points, for tiering.
    pub text_chars: usize,
    /// Time spent building the key (OPTIONS parsing and hashing included).
    pub keygen: Duration,
}

/// A parsed `AI.*` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AiCommand {
    Key(AiRequest),
    Get(AiRequest),
    Del(AiRequest),
    /// `ex: None` means the operation's TTL from `AiConfig::ttl_for`.
    Set {
        req: AiRequest,
        value: Bytes,
        ex: Option<u64>,
    },
    /// `None` invalidates every operation.
    Invalidate(Option<String>),
    Stats,
}

/// Largest `EX` (100 years). Redis itself rejects expiries whose absolute
/// time in milliseconds overflows; this bound stays far from that and from
/// any sensible cache lifetime.
const MAX_EX: u64 = 100 * 365 * 24 * 3600;

/// Parses the arguments (after the command name) of an `AI.*` command.
/// `cmd_upper` is the command name in upper case, e.g. `AI.GET`.
pub fn parse(cmd_upper: &str, args: &[Bytes], threshold: usize) -> Result<AiCommand, AiError> {
    match cmd_upper {
        "AI.KEY" => {
            parse_request("ai.key", args, threshold, false).map(|(r, _, _)| AiCommand::Key(r))
        }
        "AI.GET" => {
            parse_request("ai.get", args, threshold, false).map(|(r, _, _)| AiCommand::Get(r))
        }
        "AI.DEL" => {
            parse_request("ai.del", args, threshold, false).map(|(r, _, _)| AiCommand::Del(r))
        }
        "AI.SET" => {
            parse_request("ai.set", args, threshold, true).map(|(req, value, ex)| AiCommand::Set {
                req,
                value: value.unwrap_or_default(),
                ex,
            })
        }
        "AI.INVALIDATE" => match args {
            [op] if op.as_ref() == b"*" => Ok(AiCommand::Invalidate(None)),
            [op] => Ok(AiCommand::Invalidate(Some(
                utf8(op, "operation")?.to_owned(),
            ))),
            _ => Err(AiError::WrongArity("ai.invalidate")),
        },
        "AI.STATS" if args.is_empty() => Ok(AiCommand::Stats),
        "AI.STATS" => Err(AiError::WrongArity("ai.stats")),
        other => Err(AiError::UnknownCommand(other.to_owned())),
    }
}

/// `SCAN MATCH` pattern for the keys `AI.INVALIDATE` removes (`None` = all).
pub fn invalidate_pattern(operation: Option<&str>) -> String {
    let Some(op) = operation else {
        return format!("{KEY_PREFIX}*");
    };
    let mut p = String::with_capacity(KEY_PREFIX.len() + op.len() + 8);
    p.push_str(KEY_PREFIX);
    p.push_str("op:");
    for c in op.chars() {
        // Operation names are client-chosen; keep them from acting as globs.
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push_str("|*");
    p
}

fn utf8<'a>(b: &'a Bytes, what: &'static str) -> Result<&'a str, AiError> {
    std::str::from_utf8(b).map_err(|_| AiError::InvalidUtf8(what))
}

/// `<operation> <text> [<value>] [OPTIONS json] [QUESTION q] [EX s]`.
fn parse_request(
    command: &'static str,
    args: &[Bytes],
    threshold: usize,
    is_set: bool,
) -> Result<(AiRequest, Option<Bytes>, Option<u64>), AiError> {
    let positional = if is_set { 3 } else { 2 };
    if args.len() < positional {
        return Err(AiError::WrongArity(command));
    }
    let started = Instant::now();
    let operation = utf8(&args[0], "operation")?;
    let text = utf8(&args[1], "text")?;
    let value = is_set.then(|| args[2].clone());

    let mut options: Option<&Bytes> = None;
    let mut question: Option<&Bytes> = None;
    let mut ex: Option<&Bytes> = None;
    let mut rest = &args[positional..];
    while let [flag, tail @ ..] = rest {
        let (name, slot) = if flag.eq_ignore_ascii_case(b"OPTIONS") {
            ("OPTIONS", &mut options)
        } else if flag.eq_ignore_ascii_case(b"QUESTION") {
            ("QUESTION", &mut question)
        } else if is_set && flag.eq_ignore_ascii_case(b"EX") {
            ("EX", &mut ex)
        } else {
            return Err(AiError::UnknownFlag {
                flag: printable_flag(flag),
                command,
            });
        };
        let [arg, tail @ ..] = tail else {
            return Err(AiError::MissingFlagValue(name));
        };
        if slot.replace(arg).is_some() {
            return Err(AiError::DuplicateFlag(name));
        }
        rest = tail;
    }

    let ex = ex.map(parse_ex).transpose()?;
    let opts = match options {
        None => None,
        Some(raw) => match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(map)) => options_digest(Some(&map), number_literals(raw).as_ref())?,
            Ok(_) => return Err(AiError::OptionsNotObject),
            Err(e) => return Err(AiError::InvalidOptionsJson(e.to_string())),
        },
    };
    let question = question.map(|q| utf8(q, "QUESTION")).transpose()?;
    let text_chars = char_count(text);
    let key = build_key(operation, text, text_chars, opts, question, threshold);
    let req = AiRequest {
        key,
        operation: operation.to_owned(),
        text_chars,
        keygen: started.elapsed(),
    };
    Ok((req, value, ex))
}

fn parse_ex(raw: &Bytes) -> Result<u64, AiError> {
    let err = AiError::InvalidExpire { max: MAX_EX };
    // `u64::from_str` would also take a leading '+'; Redis does not.
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) {
        return Err(err);
    }
    match std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) if (1..=MAX_EX).contains(&n) => Ok(n),
        _ => Err(err),
    }
}

/// A flag as shown in an error reply: lossy UTF-8, bounded length.
fn printable_flag(flag: &[u8]) -> String {
    let s = String::from_utf8_lossy(flag);
    match s.char_indices().nth(32) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.into_owned(),
    }
}

/// Per-operation counters are kept for at most this many distinct names;
/// operation names come from clients and must not grow memory without bound.
const MAX_TRACKED_OPERATIONS: usize = 256;
/// Where operations beyond the cap are counted.
const OTHER_OPERATION: &str = "_other";

#[derive(Default)]
struct OpCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
}

#[derive(Default)]
struct TierCounters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Buckets of a log-linear histogram: four per power of two, so a reported
/// percentile is within 25% of the true value.
const HIST_BUCKETS: usize = 252;

struct Histogram {
    buckets: [AtomicU64; HIST_BUCKETS],
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn index(v: u64) -> usize {
        if v < 4 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 2
        (e - 1) * 4 + ((v >> (e - 2)) & 3) as usize
    }

    /// Largest value that falls into bucket `idx`.
    fn upper_bound(idx: usize) -> u64 {
        if idx < 4 {
            return idx as u64;
        }
        let e = idx / 4 + 1;
        let m = (idx % 4) as u64;
        // Saturates for the very last bucket, whose bound is u64::MAX.
        ((4 + m + 1) << (e - 2)).wrapping_sub(1)
    }

    fn record(&self, v: u64) {
        self.buckets[Self::index(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// Count and the p50, p90 and p99 bucket bounds (0 when empty).
    fn summary(&self) -> (u64, [u64; 3]) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let mut out = [0; 3];
        if total == 0 {
            return (0, out);
        }
        for (slot, pct) in out.iter_mut().zip([50u64, 90, 99]) {
            let rank = (u128::from(total) * u128::from(pct)).div_ceil(100).max(1) as u64;
            let mut seen = 0;
            for (idx, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    *slot = Self::upper_bound(idx);
                    break;
                }
            }
        }
        (total, out)
    }
}

/// Counters behind `AI.STATS`. Shared across connections; updates are
/// relaxed atomics, plus a read lock to find a per-operation entry.
pub struct AiStats {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    deletes: AtomicU64,
    invalidations: AtomicU64,
    tiers: [TierCounters; 4],
    ops: RwLock<HashMap<String, OpCounters>>,
    keygen: Histogram,
}

impl Default for AiStats {
    fn default() -> Self {
        Self::new()
    }
}

impl AiStats {
    /// All counters at zero.
    pub fn new() -> Self {
        AiStats {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            sets: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            tiers: Default::default(),
            ops: RwLock::new(HashMap::new()),
            keygen: Histogram::new(),
        }
    }

    /// An `AI.GET` that found a value.
    pub fn record_hit(&self, operation: &str, tier: Tier) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.tiers[tier as usize]
            .hits
            .fetch_add(1, Ordering::Relaxed);
        self.with_op(operation, |c| &c.hits);
    }

    /// An `AI.GET` that found nothing.
    pub fn record_miss(&self, operation: &str, tier: Tier) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.tiers[tier as usize]
            .misses
            .fetch_add(1, Ordering::Relaxed);
        self.with_op(operation, |c| &c.misses);
    }

    /// A successful `AI.SET`.
    pub fn record_set(&self, operation: &str) {
        self.sets.fetch_add(1, Ordering::Relaxed);
        self.with_op(operation, |c| &c.sets);
    }

    /// Keys removed by an `AI.DEL`.
    pub fn record_delete(&self, keys_removed: u64) {
        self.deletes.fetch_add(keys_removed, Ordering::Relaxed);
    }

    /// Keys removed by an `AI.INVALIDATE`.
    pub fn record_invalidation(&self, keys_removed: u64) {
        self.invalidations
            .fetch_add(keys_removed, Ordering::Relaxed);
    }

    /// Time taken to build one key (`AiRequest::keygen`).
    pub fn record_keygen(&self, elapsed: Duration) {
        self.keygen
            .record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    fn with_op(&self, operation: &str, counter: fn(&OpCounters) -> &AtomicU64) {
        // Counters stay meaningful after a panic elsewhere; ignore poisoning.
        {
            let ops = self.ops.read().unwrap_or_else(PoisonError::into_inner);
            let found = ops.get(operation).or_else(|| {
                // Once full, untracked names must not take the write lock.
                if ops.len() >= MAX_TRACKED_OPERATIONS {
                    ops.get(OTHER_OPERATION)
                } else {
                    None
                }
            });
            if let Some(c) = found {
                counter(c).fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut ops = self.ops.write().unwrap_or_else(PoisonError::into_inner);
        let name = if ops.len() < MAX_TRACKED_OPERATIONS || ops.contains_key(operation) {
            operation
        } else {
            OTHER_OPERATION
        };
        counter(ops.entry(name.to_owned()).or_default()).fetch_add(1, Ordering::Relaxed);
    }

    /// Field/value pairs for the `AI.STATS` reply, in a stable order.
    pub fn render(&self) -> Vec<(String, String)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let hits = load(&self.hits);
        let misses = load(&self.misses);
        let lookups = hits + misses;
        let ratio = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        let (kg_count, [p50, p90, p99]) = self.keygen.summary();
        let mut out: Vec<(String, String)> = [
            ("hits", hits.to_string()),
            ("misses", misses.to_string()),
            ("hit_ratio", format!("{ratio:.4}")),
            ("sets", load(&self.sets).to_string()),
            ("deletes", load(&self.deletes).to_string()),
            ("invalidations", load(&self.invalidations).to_string()),
            ("keygen_count", kg_count.to_string()),
            ("keygen_p50_ns", p50.to_string()),
            ("keygen_p90_ns", p90.to_string()),
            ("keygen_p99_ns", p99.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for t in Tier::ALL {
            let c = &self.tiers[t as usize];
            out.push((
                format!("tier:{}:hits", t.as_str()),
                load(&c.hits).to_string(),
            ));
            out.push((
                format!("tier:{}:misses", t.as_str()),
                load(&c.misses).to_string(),
            ));
        }
        let ops = self.ops.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<&String> = ops.keys().collect();
        names.sort_unstable();
        for name in names {
            let c = &ops[name];
            for (field, v) in [("hits", &c.hits), ("misses", &c.misses), ("sets", &c.sets)] {
                out.push((format!("op:{name}:{field}"), load(v).to_string()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/ai-key-vectors.json");

    fn vectors() -> Vec<Value> {
        let raw =
            std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("reading {VECTORS}: {e}"));
        let doc: Value = serde_json::from_str(&raw).expect("vectors are JSON");
        doc["vectors"].as_array().expect("vectors array").clone()
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter().map(|s| b(s)).collect()
    }

    #[test]
    fn reference_vectors_match() {
        let vs = vectors();
        assert!(vs.len() >= 60, "expected the full vector set");
        for (i, v) in vs.iter().enumerate() {
            let key = ai_key(
                v["operation"].as_str().unwrap(),
                v["text"].as_str().unwrap(),
                v["options"].as_object(),
                v["question"].as_str(),
                v["text_hash_threshold"].as_u64().unwrap() as usize,
            )
            .unwrap();
            assert_eq!(key, v["key"].as_str().unwrap(), "vector {i}");
        }
    }

    #[test]
    fn reference_vectors_through_parse() {
        for (i, v) in vectors().iter().enumerate() {
            let mut a = vec![
                b(v["operation"].as_str().unwrap()),
                b(v["text"].as_str().unwrap()),
            ];
            // Alternate flag spelling and order to exercise both.
            if let Some(q) = v["question"].as_str() {
                a.push(b(if i % 2 == 0 { "question" } else { "QUESTION" }));
                a.push(b(q));
            }
            a.push(b("Options"));
            a.push(b(&v["options"].to_string()));
            let threshold = v["text_hash_threshold"].as_u64().unwrap() as usize;
            let AiCommand::Get(req) = parse("AI.GET", &a, threshold).unwrap() else {
                panic!("not a GET");
            };
            assert_eq!(req.key, v["key"].as_str().unwrap(), "vector {i}");
            assert_eq!(req.operation, v["operation"].as_str().unwrap());
            assert_eq!(req.text_chars, v["text"].as_str().unwrap().chars().count());
        }
    }

    #[test]
    fn hash_stream_format() {
        // text, then "len:N", then "words:N", with no separators.
        let text = "a|b c";
        let mut h = Sha256::new();
        h.update(b"a|b clen:5words:2");
        let expect = hex::encode(h.finalize())[..16].to_owned();
        assert_eq!(
            ai_key("qa", text, None, None, 4).unwrap(),
            format!("ai_cache:op:qa|txt:hash:{expect}")
        );
    }

    #[test]
    fn inline_text_boundary_and_escaping() {
        assert_eq!(
            ai_key("op", "a|b:c", None, None, 5).unwrap(),
            "ai_cache:op:op|txt:a_b_c"
        );
        assert!(
            ai_key("op", "a|b:c", None, None, 4)
                .unwrap()
                .starts_with("ai_cache:op:op|txt:hash:")
        );
        // Code points, not bytes: five characters, 13 bytes.
        assert_eq!(
            ai_key("op", "東京🙂ab", None, None, 5).unwrap(),
            "ai_cache:op:op|txt:東京🙂ab"
        );
        assert_eq!(
            ai_key("op", "", None, None, 0).unwrap(),
            "ai_cache:op:op|txt:"
        );
    }

    #[test]
    fn empty_options_and_question_are_omitted() {
        let empty = Map::new();
        assert_eq!(
            ai_key("op", "t", Some(&empty), Some(""), 10).unwrap(),
            "ai_cache:op:op|txt:t"
        );
    }

    #[test]
    fn option_values_use_python_str() {
        let md5_8 = |s: &str| hex::encode(Md5::digest(s.as_bytes()))[..8].to_owned();
        let map: Map<String, Value> = serde_json::from_str(
            r#"{"z": null, "b": true, "a": false, "n": -3, "u": 18446744073709551615,
                "f": 1.0, "g": 1e-5, "s": "x=y&z", "é": 0.1, "B": 1e16}"#,
        )
        .unwrap();
        let expect = md5_8(
            "B=1e+16&a=False&b=True&f=1.0&g=1e-05&n=-3&s=x=y&z&u=18446744073709551615&z=None&é=0.1",
        );
        assert_eq!(
            ai_key("op", "t", Some(&map), None, 10).unwrap(),
            format!("ai_cache:op:op|txt:t|opts:{expect}")
        );
    }

    #[test]
    fn option_numbers_follow_the_json_text() {
        // serde_json alone gets these wrong: 9007199254740993.0 and 7.0e-23
        // misround, -0 becomes -0.0, the big integer becomes a float.
        // Expected digest from CPython: md5 of
        // ké"=1e+22&t=1e-30&u=0.7&v=-1.5e+300&w=123456789012345678901234567890&x=9007199254740992.0&y=7e-23&z=0
        let json = r#"{"x": 9007199254740993.0, "y": 1e-30, "z": -0, "w": 123456789012345678901234567890, "v": -1.5E+300, "u": 0.7, "t": "1e-30", "y" : 7.0e-23, "k\u00e9\"":1e22}"#;
        let AiCommand::Key(req) =
            parse("AI.KEY", &[b("op"), b("t"), b("OPTIONS"), b(json)], 10).unwrap()
        else {
            panic!("not a KEY")
        };
        assert_eq!(req.key, "ai_cache:op:op|txt:t|opts:df191ed2");
    }

    #[test]
    fn number_literal_scan() {
        let lits = number_literals(
            br#" { "a" : -1.5e3 , "b":"x\"y", "c":true,"a":2,"d":null, "e":[1] } "#,
        );
        assert_eq!(lits, None, "nested values stop the scan");
        let lits = number_literals(br#"{"a":1.5,"a":"s","b":"1","c":-0,"c\\":7}"#).unwrap();
        assert_eq!(lits.get("a"), None, "a later string value wins");
        assert_eq!(lits.get("b"), None);
        assert_eq!(lits.get("c"), Some(&"-0"));
        assert_eq!(lits.get("c\\"), Some(&"7"));
        assert_eq!(number_literals(b"{}").unwrap().len(), 0);
        assert_eq!(number_literals(b" { } ").unwrap().len(), 0);
    }

    #[test]
    fn nested_options_are_rejected() {
        for json in [r#"{"a": 1, "x": [1]}"#, r#"{"x": {"y": 1}}"#] {
            let map: Map<String, Value> = serde_json::from_str(json).unwrap();
            assert_eq!(
                ai_key("op", "t", Some(&map), None, 10),
                Err(AiError::NestedOption("x".into()))
            );
        }
        assert_eq!(
            AiError::NestedOption("x".into()).to_string(),
            "nested value for option 'x' is not supported"
        );
    }

    #[test]
    fn python_float_repr() {
        // (JSON literal, Python's str(json.loads(literal)))
        let cases = [
            ("1.0", "1.0"),
            ("1e-05", "1e-05"),
            ("1e+16", "1e+16"),
            ("0.1", "0.1"),
            ("1e16", "1e+16"),
            ("1e15", "1000000000000000.0"),
            ("123456789012345.6", "123456789012345.6"),
            ("1234567890123456.7", "1234567890123456.8"),
            ("0.0001", "0.0001"),
            ("0.00012345", "0.00012345"),
            ("-0.0", "-0.0"),
            ("-1.5e-07", "-1.5e-07"),
            ("2.5", "2.5"),
            ("1e300", "1e+300"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("100.0", "100.0"),
            ("3.141592653589793", "3.141592653589793"),
            ("1e22", "1e+22"),
            ("9007199254740993.0", "9007199254740992.0"),
            ("0.30000000000000004", "0.30000000000000004"),
            ("1.5e+16", "1.5e+16"),
            ("-1e-4", "-0.0001"),
            ("1.23e-5", "1.23e-05"),
            ("123e3", "123000.0"),
            ("1E2", "100.0"),
            ("0.5e1", "5.0"),
            // Exact tie between two shortest strings: CPython takes the even one.
            ("223712169836953.625", "223712169836953.62"),
            ("-2.5e-320", "-2.5e-320"),
        ];
        for (lit, want) in cases {
            let f: f64 = lit.parse().unwrap();
            assert_eq!(py_float_repr(f), want, "{lit}");
            let mut via_literal = String::new();
            py_number_from_literal(lit, &mut via_literal);
            assert_eq!(via_literal, want, "{lit}");
        }
        assert_eq!(py_float_repr(f64::NAN), "nan");
        assert_eq!(py_float_repr(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn python_split_word_count() {
        // (text, len(text.split())) from CPython.
        let cases = [
            ("", 0),
            ("  ", 0),
            ("a", 1),
            (" a b ", 2),
            ("a\x1cb", 2),
            ("a\x1fb", 2),
            ("a\u{85}b", 2),
            ("a\u{a0}b", 2),
            ("a\u{1680}b", 2),
            ("a\u{2000}b", 2),
            ("a\u{200a}b", 2),
            ("a\u{200b}b", 1),
            ("a\u{2028}b", 2),
            ("a\u{2029}b", 2),
            ("a\u{202f}b", 2),
            ("a\u{205f}b", 2),
            ("a\u{3000}b", 2),
            ("a\u{180e}b", 1),
            ("a\u{feff}b", 1),
            ("a\x0bb\x0cc\rd", 4),
            ("a\u{200e}b", 1),
            ("дан ные 東京  x", 4),
            ("a\x00b", 1),
            // Lead bytes shared with whitespace but other characters.
            ("a\u{a9}b \u{1681} \u{2010}\u{2060}\u{3001}", 3),
        ];
        for (text, want) in cases {
            assert_eq!(word_count(text), want, "{text:?}");
        }
    }

    #[test]
    fn word_count_agrees_with_reference_set_exhaustively() {
        let py_space = |c: char| {
            matches!(c, '\t'..='\r' | '\x1c'..='\x20' | '\u{85}' | '\u{a0}' | '\u{1680}'
                | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}'
                | '\u{3000}')
        };
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let s = format!("x{c}y");
            assert_eq!(word_count(&s), if py_space(c) { 2 } else { 1 }, "{c:?}");
        }
    }

    #[test]
    fn word_count_blocks_agree_with_char_by_char() {
        let reference = |s: &str| {
            let mut words = 0;
            let mut prev_space = true;
            for c in s.chars() {
                let space = matches!(c, '\t'..='\r' | '\x1c'..='\x20' | '\u{85}' | '\u{a0}'
                    | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}'
                    | '\u{202f}' | '\u{205f}' | '\u{3000}');
                words += usize::from(prev_space && !space);
                prev_space = space;
            }
            words
        };
        // Pieces chosen so multi-byte characters straddle the 64-byte blocks
        // in every possible way.
        let pieces = [
            "a", " ", "\u{a0}", "\u{3000}", "東", "é", "\u{2009}", "“", "\t", "🙂", "\u{85}",
            "\u{2028}", "xy", "\u{1680}", "\u{205f}", "\u{3001}",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..3000 {
            let mut s = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut r = seed;
            for _ in 0..len {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(pieces[(r >> 59) as usize % pieces.len()]);
            }
            assert_eq!(word_count(&s), reference(&s), "{s:?}");
        }
    }

    #[test]
    fn char_count_is_code_points() {
        for s in ["", "abc", "naïve", "東京", "🙂x", "данные"] {
            assert_eq!(char_count(s), s.chars().count());
        }
    }

    #[test]
    fn parse_commands() {
        let AiCommand::Set { req, value, ex } = parse(
            "AI.SET",
            &args(&["summarize", "hi", "V", "ex", "60", "QUESTION", "q?"]),
            1000,
        )
        .unwrap() else {
            panic!("not a SET")
        };
        assert_eq!(
            req.key,
            ai_key("summarize", "hi", None, Some("q?"), 1000).unwrap()
        );
        assert_eq!(req.text_chars, 2);
        assert_eq!(value, b("V"));
        assert_eq!(ex, Some(60));

        let AiCommand::Set { ex, .. } = parse("AI.SET", &args(&["a", "b", "c"]), 10).unwrap()
        else {
            panic!("not a SET")
        };
        assert_eq!(ex, None);
        assert!(matches!(
            parse("AI.KEY", &args(&["a", "b"]), 10),
            Ok(AiCommand::Key(_))
        ));
        assert!(matches!(
            parse("AI.DEL", &args(&["a", "b"]), 10),
            Ok(AiCommand::Del(_))
        ));
        assert_eq!(
            parse("AI.INVALIDATE", &args(&["*"]), 10),
            Ok(AiCommand::Invalidate(None))
        );
        assert_eq!(
            parse("AI.INVALIDATE", &args(&["qa"]), 10),
            Ok(AiCommand::Invalidate(Some("qa".into())))
        );
        assert_eq!(parse("AI.STATS", &[], 10), Ok(AiCommand::Stats));
    }

    #[test]
    fn parse_errors() {
        use AiError::*;
        let cases: Vec<(&str, Vec<Bytes>, AiError)> = vec![
            ("AI.KEY", args(&["op"]), WrongArity("ai.key")),
            ("AI.GET", args(&[]), WrongArity("ai.get")),
            ("AI.SET", args(&["op", "t"]), WrongArity("ai.set")),
            ("AI.INVALIDATE", args(&[]), WrongArity("ai.invalidate")),
            (
                "AI.INVALIDATE",
                args(&["a", "b"]),
                WrongArity("ai.invalidate"),
            ),
            ("AI.STATS", args(&["x"]), WrongArity("ai.stats")),
            ("AI.NOPE", args(&[]), UnknownCommand("AI.NOPE".into())),
            (
                "AI.KEY",
                args(&["op", "t", "OPTIONS", "{"]),
                InvalidOptionsJson("EOF while parsing an object at line 1 column 1".into()),
            ),
            (
                "AI.KEY",
                args(&["op", "t", "OPTIONS", "[1]"]),
                OptionsNotObject,
            ),
            (
                "AI.KEY",
                args(&["op", "t", "OPTIONS", "null"]),
                OptionsNotObject,
            ),
            (
                "AI.KEY",
                args(&["op", "t", "OPTIONS", r#"{"x":[]}"#]),
                NestedOption("x".into()),
            ),
            (
                "AI.KEY",
                args(&["op", "t", "EX", "10"]),
                UnknownFlag {
                    flag: "EX".into(),
                    command: "ai.key",
                },
            ),
            (
                "AI.GET",
                args(&["op", "t", "FOO", "1"]),
                UnknownFlag {
                    flag: "FOO".into(),
                    command: "ai.get",
                },
            ),
            (
                "AI.GET",
                args(&["op", "t", "QUESTION"]),
                MissingFlagValue("QUESTION"),
            ),
            (
                "AI.GET",
                args(&["op", "t", "question", "a", "Question", "b"]),
                DuplicateFlag("QUESTION"),
            ),
            (
                "AI.SET",
                args(&["op", "t", "v", "EX", "1", "ex", "2"]),
                DuplicateFlag("EX"),
            ),
        ];
        for (cmd, a, want) in cases {
            assert_eq!(parse(cmd, &a, 10), Err(want), "{cmd} {a:?}");
        }
        for bad in [
            "0",
            "-1",
            "+5",
            "1.5",
            "",
            "abc",
            "3153600001",
            "99999999999999999999999",
        ] {
            assert_eq!(
                parse("AI.SET", &args(&["op", "t", "v", "EX", bad]), 10),
                Err(InvalidExpire { max: MAX_EX }),
                "EX {bad:?}"
            );
        }
        assert!(parse("AI.SET", &args(&["op", "t", "v", "EX", "3153600000"]), 10).is_ok());

        let bad_utf8 = Bytes::from_static(b"\xff");
        assert_eq!(
            parse("AI.GET", &[b("op"), bad_utf8.clone()], 10),
            Err(InvalidUtf8("text"))
        );
        assert_eq!(
            parse("AI.GET", &[bad_utf8.clone(), b("t")], 10),
            Err(InvalidUtf8("operation"))
        );
        assert_eq!(
            parse(
                "AI.GET",
                &[b("op"), b("t"), b("QUESTION"), bad_utf8.clone()],
                10
            ),
            Err(InvalidUtf8("QUESTION"))
        );
        assert!(matches!(
            parse("AI.GET", &[b("op"), b("t"), b("OPTIONS"), bad_utf8], 10),
            Err(InvalidOptionsJson(_))
        ));
        assert_eq!(
            OptionsNotObject.to_string(),
            "OPTIONS must be a JSON object"
        );
        assert!(
            InvalidOptionsJson("x".into())
                .to_string()
                .starts_with("invalid OPTIONS JSON: ")
        );
    }

    #[test]
    fn long_unknown_flags_are_truncated_in_errors() {
        let flag = "F".repeat(1000);
        let Err(AiError::UnknownFlag { flag, .. }) =
            parse("AI.GET", &args(&["op", "t", &flag, "x"]), 10)
        else {
            panic!("expected UnknownFlag")
        };
        assert_eq!(flag, format!("{}...", "F".repeat(32)));
    }

    #[test]
    fn invalidate_patterns() {
        assert_eq!(invalidate_pattern(None), "ai_cache:*");
        assert_eq!(invalidate_pattern(Some("qa")), "ai_cache:op:qa|*");
        assert_eq!(
            invalidate_pattern(Some("a*[b]?\\")),
            r"ai_cache:op:a\*\[b\]\?\\|*"
        );
    }

    #[test]
    fn tiers() {
        let d = TierBounds::default();
        assert_eq!(tier(0, &d), Tier::Small);
        assert_eq!(tier(499, &d), Tier::Small);
        assert_eq!(tier(500, &d), Tier::Medium);
        assert_eq!(tier(4999, &d), Tier::Medium);
        assert_eq!(tier(5000, &d), Tier::Large);
        assert_eq!(tier(49999, &d), Tier::Large);
        assert_eq!(tier(50000, &d), Tier::XLarge);
        assert_eq!(Tier::XLarge.as_str(), "xlarge");
        let custom = TierBounds {
            small: 10,
            medium: 20,
            large: 30,
        };
        assert_eq!(tier(25, &custom), Tier::Large);
    }

    #[test]
    fn ttls_and_config() {
        let c = AiConfig::default();
        assert_eq!(c.text_hash_threshold, 1000);
        for (op, ttl) in [
            ("summarize", 7200),
            ("sentiment", 86400),
            ("key_points", 7200),
            ("questions", 3600),
            ("qa", 1800),
            ("translate", 3600),
        ] {
            assert_eq!(c.ttl_for(op), ttl, "{op}");
        }

        #[derive(Deserialize)]
        struct Root {
            #[serde(default)]
            ai: AiConfig,
        }
        let parse_cfg = |s: &str| toml::from_str::<Root>(s).map(|r| r.ai);
        assert_eq!(parse_cfg("").unwrap(), c);
        assert_eq!(parse_cfg("[ai]\n").unwrap(), c);
        let custom = parse_cfg(
            "[ai]\ntext_hash_threshold = 10\ndefault_ttl = 60\ntier_small = 1\n\
             tier_medium = 2\ntier_large = 3\n[ai.operation_ttls]\nqa = 5\ntranslate = 7\n",
        )
        .unwrap();
        assert_eq!(custom.text_hash_threshold, 10);
        assert_eq!(custom.ttl_for("qa"), 5);
        assert_eq!(custom.ttl_for("translate"), 7);
        assert_eq!(custom.ttl_for("summarize"), 7200, "built-ins are kept");
        assert_eq!(custom.ttl_for("other"), 60);
        assert_eq!(
            custom.tiers,
            TierBounds {
                small: 1,
                medium: 2,
                large: 3
            }
        );
        for bad in [
            "[ai]\nbogus = 1\n",
            "[ai]\ndefault_ttl = 0\n",
            "[ai.operation_ttls]\nqa = 0\n",
            "[ai]\ntier_small = 6000\n",
            "[ai]\ntext_hash_threshold = -1\n",
        ] {
            assert!(parse_cfg(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn histogram_buckets_are_contiguous() {
        let mut prev = None;
        for idx in 0..HIST_BUCKETS {
            let hi = Histogram::upper_bound(idx);
            assert_eq!(Histogram::index(hi), idx, "bucket {idx}");
            if let Some(p) = prev {
                assert_eq!(Histogram::index(p + 1), idx);
            }
            prev = Some(hi);
        }
        assert_eq!(Histogram::index(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(Histogram::upper_bound(HIST_BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn stats_render() {
        let s = AiStats::new();
        let empty: HashMap<String, String> = s.render().into_iter().collect();
        assert_eq!(empty["hit_ratio"], "0.0000");
        assert_eq!(empty["keygen_p99_ns"], "0");

        s.record_hit("qa", Tier::Small);
        s.record_hit("qa", Tier::Small);
        s.record_hit("summarize", Tier::Large);
        s.record_miss("qa", Tier::XLarge);
        s.record_set("qa");
        s.record_delete(1);
        s.record_delete(0);
        s.record_invalidation(7);
        for ns in 1..=100u64 {
            s.record_keygen(Duration::from_nanos(ns * 1000));
        }
        let r = s.render();
        let m: HashMap<&str, &str> = r.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(m["hits"], "3");
        assert_eq!(m["misses"], "1");
        assert_eq!(m["hit_ratio"], "0.7500");
        assert_eq!(m["sets"], "1");
        assert_eq!(m["deletes"], "1");
        assert_eq!(m["invalidations"], "7");
        assert_eq!(m["tier:small:hits"], "2");
        assert_eq!(m["tier:xlarge:misses"], "1");
        assert_eq!(m["tier:medium:hits"], "0");
        assert_eq!(m["op:qa:hits"], "2");
        assert_eq!(m["op:qa:misses"], "1");
        assert_eq!(m["op:qa:sets"], "1");
        assert_eq!(m["op:summarize:hits"], "1");
        assert_eq!(m["keygen_count"], "100");
        // Within the histogram's 25% resolution of the true percentiles.
        for (field, exact) in [
            ("keygen_p50_ns", 50_000.0),
            ("keygen_p90_ns", 90_000.0),
            ("keygen_p99_ns", 99_000.0),
        ] {
            let got: f64 = m[field].parse().unwrap();
            assert!(got >= exact && got <= exact * 1.25, "{field} = {got}");
        }
        // Stable order: global fields first, operations sorted.
        assert_eq!(r[0].0, "hits");
        let op_fields: Vec<&str> = r
            .iter()
            .filter(|(k, _)| k.starts_with("op:"))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(op_fields[0], "op:qa:hits");
        assert_eq!(op_fields[3], "op:summarize:hits");
    }

    #[test]
    fn stats_cap_operation_names() {
        let s = AiStats::new();
        for i in 0..MAX_TRACKED_OPERATIONS + 10 {
            s.record_miss(&format!("op{i}"), Tier::Small);
        }
        s.record_miss("op0", Tier::Small);
        let m: HashMap<String, String> = s.render().into_iter().collect();
        assert_eq!(m[&format!("op:{OTHER_OPERATION}:misses")], "10");
        assert_eq!(m["op:op0:misses"], "2");
        assert_eq!(m["misses"], (MAX_TRACKED_OPERATIONS + 11).to_string());
    }

    #[test]
    fn stats_are_shareable_across_threads() {
        let s = std::sync::Arc::new(AiStats::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.record_hit("qa", Tier::Medium);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let m: HashMap<String, String> = s.render().into_iter().collect();
        assert_eq!(m["op:qa:hits"], "4000");
    }
}
