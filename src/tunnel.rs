//! The tunnel: a session that issued a push-style command (SUBSCRIBE,
//! MONITOR, CLIENT TRACKING/REPLY) talks to its own upstream connection
//! from then on, because replies stop being one-per-request.
//!
//! Requests still go through the proxy's rules on the way up: the auth gate
//! (a readwrite user may subscribe, but a RESP3 subscriber can send any
//! command, and a RESP2 one is back in normal mode after its last
//! UNSUBSCRIBE), and L1 invalidation of the keys it writes. A refused
//! request cannot simply be answered locally: its reply has to take its
//! place among Redis' replies and pushes. So it is replaced upstream by a
//! command named by an unguessable marker, and the downward direction swaps
//! Redis' `unknown command '<marker>'` error for the refusal. Redis' own
//! ordering does the rest, in every context: RESP2 pub/sub mode checks the
//! command name first, and inside MULTI an unknown command dooms the
//! transaction (EXECABORT), as an ACL refusal does in Redis. Without proxy
//! users nothing is ever swapped and the downward direction stays a plain
//! byte copy.
//!
//! RESET passes through (it also ends subscriptions, MONITOR and tracking on
//! Redis' side), but on Redis it also logs the connection out and selects
//! db 0, while respite's own connections carry the upstream URL's
//! credentials and db. So RESET is followed by AUTH/SELECT with those, and
//! the downward direction drops their replies, which follow `+RESET` at
//! once (RESET has ended every source of pushes), so the client sees Redis'
//! `+RESET` alone.

use crate::auth::{ClientAuth, Verdict};
use crate::command::{self, Args, Class, Local};
use crate::resp::{self, FrameScanner, Parse};
use crate::server::Shared;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// How Redis' error for a marker command begins.
const UNKNOWN: &[u8] = b"-ERR unknown command 'respite-swap-";

/// The reply that replaces Redis' error for one marker command.
struct Swap {
    /// `-ERR unknown command '<marker>'`, the start of that error.
    echo: Bytes,
    reply: Bytes,
    /// Close the client after the reply (protocol errors, as Redis does).
    close: bool,
    /// Not a marker but a RESET: the number of replies after `+RESET` that
    /// belong to the restoring commands (see `restore_commands`).
    restore: usize,
}

/// Redis' reply to RESET.
const RESET_REPLY: &[u8] = b"+RESET\r\n";

/// What a RESET must be followed by to give the connection back the
/// upstream URL's user and db, and how many commands that is; empty when
/// Redis' defaults are those, or when Redis is older than 6.2 (no RESET:
/// its error would not be `+RESET`, and the restoring replies would reach
/// the client).
fn restore_commands(shared: &Shared) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let mut n = 0;
    if let crate::server::Backend::Upstream(u) = &shared.backend {
        if !has_reset(&u.health.version.lock().unwrap_or_else(|e| e.into_inner())) {
            return (out, 0);
        }
        let url = &u.url;
        if let Some(pass) = &url.password {
            match &url.user {
                Some(user) => resp::encode_command(
                    &[&b"AUTH"[..], user.as_bytes(), pass.as_bytes()],
                    &mut out,
                ),
                None => resp::encode_command(&[&b"AUTH"[..], pass.as_bytes()], &mut out),
            }
            n += 1;
        }
        if url.db != 0 {
            resp::encode_command(&[&b"SELECT"[..], url.db.to_string().as_bytes()], &mut out);
            n += 1;
        }
    }
    (out, n)
}

/// Whether a Redis of this `redis_version` has RESET (6.2); an unknown
/// version is taken to have it.
fn has_reset(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (6, 2),
        _ => true,
    }
}

/// Both directions until either side closes (Redis closes a subscriber's
/// connection the same way). `first` has been checked and sent already.
/// A `replication` stream (SYNC/PSYNC) is not RESP frames (the RDB has no
/// trailing CRLF, keepalives are bare newlines): it is always copied as it
/// comes.
pub async fn run<CR, CW, UR, UW>(
    shared: &Shared,
    auth: &mut ClientAuth,
    client: (CR, CW),
    upstream: (UR, UW),
    rest: BytesMut,
    replication: bool,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let (crd, mut cwr) = client;
    let (mut urd, uwr) = upstream;
    let (tx, rx) = unbounded_channel();
    let restore = if replication {
        (BytesMut::new(), 0)
    } else {
        restore_commands(shared)
    };
    let framed = !replication && (shared.auth.enabled() || restore.1 > 0);
    let up = upward(shared, auth, crd, rest, uwr, tx, restore);
    let down = async {
        if framed {
            downward(shared, &mut urd, &mut cwr, rx).await;
        } else if let Ok(n) = tokio::io::copy(&mut urd, &mut cwr).await {
            shared.metrics.bytes(0, n as usize);
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = shared.shutdown.cancelled() => {}
    }
}

async fn upward<CR, UW>(
    shared: &Shared,
    auth: &mut ClientAuth,
    mut crd: CR,
    mut buf: BytesMut,
    mut uwr: UW,
    tx: UnboundedSender<Swap>,
    (restore, restore_count): (BytesMut, usize),
) where
    CR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let gated = shared.auth.enabled();
    let tag: u64 = rand::random();
    let mut seq = 0u64;
    // The previous command was CLIENT REPLY SKIP.
    let mut reply_skip = false;
    let mut out = BytesMut::new();
    loop {
        let limits = shared.rt.limits();
        let mut off = 0;
        let mut fatal = false;
        loop {
            match resp::parse_request(&buf[off..], &limits) {
                Ok(Parse::Complete(p)) => {
                    let raw = &buf[off..off + p.len];
                    off += p.len;
                    if p.args.is_empty() {
                        continue;
                    }
                    let inline: Vec<Bytes> = if p.inline {
                        resp::inline_args(raw, &p.args)
                    } else {
                        Vec::new()
                    };
                    let view;
                    let args: &dyn Args = if p.inline {
                        &inline
                    } else {
                        view = command::RawArgs {
                            buf: raw,
                            ranges: &p.args,
                        };
                        &view
                    };
                    let id = command::lookup(args);
                    let class = command::classify(args, id);
                    let skip_next = std::mem::replace(&mut reply_skip, is_reply_skip(args));
                    let verdict = if gated {
                        match auth.check(&shared.auth, args, id, class) {
                            // Proxy credentials never go upstream; the pushes
                            // of this connection keep their protocol.
                            Verdict::Allow if class == Class::Local(Local::Hello) => {
                                Verdict::Reply {
                                    reply: resp::error_bytes(
                                        "ERR HELLO is not available on a subscribed connection through respite",
                                    ),
                                    delay: std::time::Duration::ZERO,
                                }
                            }
                            v => v,
                        }
                    } else {
                        Verdict::Allow
                    };
                    match verdict {
                        Verdict::Allow => {
                            if let Some(l1) = &shared.l1
                                && crate::session::invalidates(
                                    id,
                                    Some(command::classify(args, id)),
                                )
                            {
                                crate::session::invalidate_writes(l1, args, id);
                            }
                            if p.inline {
                                resp::encode_command(&inline, &mut out);
                            } else {
                                out.extend_from_slice(raw);
                            }
                            // (A RESET with arguments is not classed as one.)
                            // A RESET whose reply CLIENT REPLY SKIP suppresses
                            // gives no `+RESET` to find the restoring replies
                            // by: that connection is left logged out, as Redis
                            // leaves it.
                            if class == Class::Local(Local::Reset)
                                && !skip_next
                                && restore_count > 0
                            {
                                out.extend_from_slice(&restore);
                                let _ = tx.send(Swap {
                                    echo: Bytes::new(),
                                    reply: Bytes::new(),
                                    close: false,
                                    restore: restore_count,
                                });
                            }
                        }
                        Verdict::Reply { reply, delay } => {
                            if !delay.is_zero() {
                                if flush(&mut uwr, &mut out, shared).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(delay).await;
                            }
                            seq += 1;
                            swap(&tx, &mut out, tag, seq, reply, false);
                        }
                    }
                }
                Ok(Parse::Incomplete { .. }) => break,
                Err(e) => {
                    shared.metrics.error("protocol");
                    seq += 1;
                    swap(&tx, &mut out, tag, seq, resp::error_bytes(&e.0), true);
                    fatal = true;
                    break;
                }
            }
        }
        buf.advance(off);
        if flush(&mut uwr, &mut out, shared).await.is_err() {
            return;
        }
        if fatal {
            // The downward direction delivers the error in order, then closes.
            std::future::pending::<()>().await;
        }
        match crd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn is_reply_skip(args: &dyn Args) -> bool {
    args.count() == 3
        && [&b"CLIENT"[..], b"REPLY", b"SKIP"]
            .iter()
            .enumerate()
            .all(|(i, w)| args.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(w)))
}

/// Queues the swap, then the marker command Redis will refuse in its place.
fn swap(
    tx: &UnboundedSender<Swap>,
    out: &mut BytesMut,
    tag: u64,
    seq: u64,
    reply: Bytes,
    close: bool,
) {
    let marker = format!("respite-swap-{tag:016x}-{seq}");
    let _ = tx.send(Swap {
        echo: Bytes::from(format!("-ERR unknown command '{marker}'")),
        reply,
        close,
        restore: 0,
    });
    resp::encode_command(&[marker.as_bytes()], out);
}

async fn flush<UW: AsyncWrite + Unpin>(
    uwr: &mut UW,
    out: &mut BytesMut,
    shared: &Shared,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    uwr.write_all(out).await?;
    shared.metrics.bytes(out.len(), 0);
    out.clear();
    Ok(())
}

/// Forwards Redis' frames, swapping marker echoes for their replies.
async fn downward<UR, CW>(
    shared: &Shared,
    urd: &mut UR,
    cwr: &mut CW,
    mut rx: UnboundedReceiver<Swap>,
) where
    UR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut sc = FrameScanner::new();
    let mut pending: VecDeque<Swap> = VecDeque::new();
    // Replies of a RESET's restoring commands still to drop.
    let mut swallow = 0usize;
    loop {
        match urd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = false;
        loop {
            match sc.next_frame(&buf) {
                Ok(Some(end)) => {
                    let frame = buf.split_to(end);
                    sc.reset();
                    if swallow > 0 {
                        swallow -= 1;
                        if frame.first() == Some(&b'-') {
                            tracing::warn!(
                                reply = %String::from_utf8_lossy(&frame[..frame.len() - 2]),
                                "restoring the upstream user/db after RESET on a subscribed connection failed"
                            );
                        }
                        continue;
                    }
                    if &frame[..] == RESET_REPLY {
                        pending.extend(std::iter::from_fn(|| rx.try_recv().ok()));
                        // Only a RESET sent since can answer `+RESET` (a
                        // script's status reply could read the same, but
                        // not while a RESET is pending unless pipelined
                        // just ahead of one).
                        if let Some(at) = pending.iter().position(|s| s.restore > 0) {
                            swallow = pending[at].restore;
                            pending.drain(..=at);
                        }
                        out.extend_from_slice(&frame);
                        continue;
                    }
                    let found = if frame.starts_with(UNKNOWN) {
                        pending.extend(std::iter::from_fn(|| rx.try_recv().ok()));
                        // Markers older than this one were never answered
                        // (CLIENT REPLY OFF/SKIP): their refusals are
                        // dropped as Redis would have dropped the reply.
                        pending
                            .iter()
                            .position(|s| s.restore == 0 && frame.starts_with(&s.echo))
                            .and_then(|at| pending.drain(..=at).last())
                    } else {
                        None
                    };
                    if let Some(s) = found {
                        out.extend_from_slice(&s.reply);
                        if s.close {
                            close = true;
                            break;
                        }
                    } else {
                        out.extend_from_slice(&frame);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Redis does not send what the scanner rejects; pass it
                    // on rather than guess, and stop swapping.
                    tracing::warn!(error = %e.0, "unparsable upstream frame in a tunnel");
                    out.extend_from_slice(&buf);
                    buf.clear();
                    close = true;
                    break;
                }
            }
        }
        if !out.is_empty() {
            if cwr.write_all(&out).await.is_err() {
                return;
            }
            shared.metrics.bytes(0, out.len());
            out.clear();
        }
        if close {
            let _ = cwr.shutdown().await;
            return;
        }
    }
}
