//! One client connection.
//!
//! One task owns both halves of the client socket: it parses requests,
//! classifies and dispatches each, and writes replies back strictly in
//! request order from a bounded queue of reply *slots* (a ready reply, or a
//! pending upstream batch). Consecutive pass-through commands of one read are
//! one batch and one slot, their bytes forwarded as a single slice of the
//! read buffer. Keeping reads and writes in one task saves a task hop and a
//! channel per request, which measurably matters on a 2-core machine.
//!
//! A session starts on shared upstream connections. A stateful command pins
//! it to a dedicated connection for the rest of its life (Redis semantics
//! exactly); a push-style command (SUBSCRIBE, MONITOR, ...) moves it to a
//! tunnel on a dedicated connection (src/tunnel.rs). Before either switch the
//! session waits until every earlier reply has arrived, so commands still
//! execute in the order the client sent them.

use crate::ai::{self, AiCommand};
use crate::cache::{HashLookup, HashRead, L1, Lookup};
use crate::command::{self, Args, Class, Local};
use crate::compress_cmd::{self as cz, Kind};
use crate::resp::{self, Parse};
use crate::server::{Backend, ClientEntry, Shared};
use crate::upstream::{Conn, OutBytes, ReplyRx, UpError};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// How the writer post-processes an upstream reply before the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Post {
    None,
    /// Append the `# Proxy` section to an INFO reply.
    Info,
    /// Count an AI.* outcome from the reply (hit/miss, set, deleted keys).
    Ai(AiPost),
    /// The outcome of an L1 fill (src/cache.rs `FillResult`): a GET reply
    /// as a RESP3 connection read it, for a client speaking `resp3` or not.
    Waited {
        resp3: bool,
        /// AI.GET's outcome to count, when the fill answers one.
        ai: Option<AiPost>,
    },
    /// An MGET of the keys L1 missed: merge its elements into the slots
    /// (`None` = take the next element of the upstream reply).
    Mget(Vec<Option<Bytes>>),
    /// Decode compressed values in the reply (src/compress_cmd.rs).
    Decode(cz::Decode),
    /// Show the client this reply instead of Redis' (a poisoned MULTI).
    Replace(Bytes),
    /// Show the client only the first reply: the rest answer commands the
    /// proxy appended (the HELLO 3 after a RESP3 client's AUTH).
    First,
    /// A SELECT on a connection pinned by SELECTs only: its `+OK` tells
    /// the db L1 serves this client from.
    Select(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AiPost {
    Get { op: String, tier: ai::Tier },
    Set { op: String },
    Del,
}

impl AiPost {
    fn record(&self, reply: &[u8], stats: &ai::AiStats) {
        let nil = reply.starts_with(b"$-1") || reply.starts_with(b"_");
        match self {
            AiPost::Get { op, tier } if reply.first() == Some(&b'$') || nil => {
                if nil {
                    stats.record_miss(op, *tier);
                } else {
                    stats.record_hit(op, *tier);
                }
            }
            AiPost::Set { op } if reply.starts_with(b"+OK") => stats.record_set(op),
            AiPost::Del => {
                if let Some(n) = reply
                    .strip_prefix(b":")
                    .and_then(|r| r.split(|&b| b == b'\r').next())
                    .and_then(resp::parse_int)
                {
                    stats.record_delete(n.max(0) as u64);
                }
            }
            _ => {}
        }
    }
}

enum Out {
    Ready(Bytes),
    Up {
        rx: ReplyRx,
        count: u32,
        ids: Vec<u16>,
        start: Instant,
        post: Post,
        /// Carries a command that may write (see `writes_in_flight`).
        writes: bool,
    },
    /// Error replies for `count` commands that never reached Redis.
    Failed {
        err: UpError,
        count: u32,
    },
}

/// Whether a command id of a reply slot may write; `command::count()` (an
/// unknown, e.g. module, command) counts as a write.
fn writes(id: usize) -> bool {
    id >= command::count() || command::may_write(id)
}

/// Byte-level commands per `BATCH_SCRIPT` run: Redis runs them in one
/// script, blocking other clients meanwhile.
const BYTES_BATCH: usize = 64;
/// Arguments per `BATCH_SCRIPT` run, and per command in one: Lua's
/// `unpack` stops near 8000 values, and a script that fails half-way
/// could not say which commands ran. Bigger commands go alone.
const BYTES_BATCH_ARGS: usize = 1024;

/// Input taken in eagerly (see `run`) stops at this much unprocessed data.
const MAX_EAGER: usize = 1 << 20;

/// One poll with a waker that does nothing: `Some` when the future is
/// ready at once. Only for cancel-safe futures (a read that returns
/// `Pending` has read nothing).
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Replies this large are written from their own buffer, not copied.
const DIRECT: usize = 64 * 1024;
/// On a single-threaded runtime, compressing a write at least this large
/// runs on tokio's blocking pool: the session waits for it (its order is
/// kept), other clients do not, and LZ4 (~35 us per 32 KiB here) can use
/// another core. Measured on 64 KiB SETs: 11.2k -> 12.6k ops/s. Replies
/// of 64 KiB values (~20 KiB compressed) stay inline: decompression is fast
/// enough that the hand-off cost more than it saved (19.9k -> 18.7k ops/s).
const OFFLOAD_BYTES: usize = 32 * 1024;

/// Replies this large are decompressed on the blocking pool (single-threaded
/// runtime): not for speed, but so that decoding a huge value (tens of ms
/// for 100 MB) does not stall every other client meanwhile.
const OFFLOAD_REPLY_BYTES: usize = 128 * 1024;

/// Whether work on `len` bytes goes to the blocking pool: at least `min`
/// bytes, and a single-threaded runtime (with several workers, the other
/// clients have other threads already).
fn offloaded(len: usize, min: usize) -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    len >= min && Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread
}

/// Runs `f` on the blocking pool. A panic in `f` is resumed in the caller,
/// as if it had run inline.
async fn on_blocking_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Moves the slowloris deadline of a started request on by the time since
/// `since`, which the proxy spent waiting on something other than the
/// client's bytes.
fn pause_deadline(
    partial: &mut Option<(tokio::time::Instant, usize)>,
    since: Option<tokio::time::Instant>,
) {
    if let (Some((deadline, _)), Some(t0)) = (partial.as_mut(), since) {
        *deadline += t0.elapsed();
    }
}

/// L1 hits are copied into the output buffer only while it holds less.
const WBUF_DIRECT: usize = 1024 * 1024;

/// Commands that the proxy answers or steers; every other reply comes from Redis.
pub struct Session<W> {
    id: u64,
    shared: Arc<Shared>,
    entry: Arc<ClientEntry>,
    resp3: bool,
    db: u32,
    conn: Option<Conn>,
    pinned: Option<(Conn, crate::upstream::Detach)>,
    /// The pinned connection holds no state but its db (only SELECTs
    /// pinned it): L1 may still serve this client, from `sel_db`.
    pin_select_only: bool,
    /// The pinned connection's db, as its last answered SELECT left it.
    sel_db: u32,
    /// SELECTs sent and not answered: the db is unknown meanwhile.
    sel_pending: usize,
    /// Reply slots in request order.
    queue: std::collections::VecDeque<Out>,
    cap: usize,
    wr: W,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` counted in `out` (L1 hits copied in directly).
    wbuf_owed: usize,
    out: Arc<OutBytes>,
    /// The client can no longer be written to.
    broken: bool,
    quit: bool,
    /// Who this client authenticated as (see `auth_gate`, src/auth.rs).
    auth: crate::auth::ClientAuth,
    /// Commands queued in MULTI, for decoding the EXEC reply.
    tx_queue: cz::Tx,
    /// Reply actions of the pending pass-through batch (`None`: nothing to
    /// decode in it).
    run_decode: Option<Vec<cz::Decode>>,
    /// Inside MULTI on the pinned connection (for the auth gate).
    in_multi: bool,
    /// Queued slots that carry a write, and whether the pending batch has
    /// one: an L1 fill travels on another connection than the session's
    /// earlier commands, so it may only start when none of them can change
    /// what it reads (the client must read its own writes). Earlier reads
    /// in flight do not matter: they may be reordered with the fill just as
    /// an L1 hit is, within the invalidation window.
    writes_in_flight: usize,
    run_writes: bool,
    /// A SWAPDB is queued in this client's transaction: EXEC's reply
    /// flushes L1 (see `invalidate_writes`).
    swapdb_in_tx: bool,
    /// Byte-level commands (with compression on) the client pipelined back
    /// to back, not sent yet: they go in one script (`flush_bytes`).
    bytes_run: Vec<(usize, Vec<Bytes>)>,
    /// Their arguments in all.
    bytes_run_args: usize,
    /// The keys of queued replies that an L1 fill will answer. A fill reads
    /// on a tracking connection, not this client's: a write the client
    /// pipelined after the GET could reach Redis first and show up in the
    /// GET's answer, so a write to one of these keys (or to keys not known)
    /// waits until the fills are in.
    fill_keys: std::collections::VecDeque<Vec<Bytes>>,
    /// The keys of `fill_keys`, counted: a write looks its keys up here
    /// instead of walking every queued fill's keys (an MGET's can be many).
    fill_key_count: std::collections::HashMap<Bytes, u32>,
    /// How many of those, from the front of the queue, `wait_fills` has
    /// seen answered.
    fills_answered: usize,
}

enum Flow {
    Continue,
    Stop,
    /// `first` is the tunnelling command; `rest` what the client sent
    /// after it, still to be checked.
    Tunnel {
        first: Bytes,
        rest: BytesMut,
        /// SYNC/PSYNC: what comes down is a replication stream, not
        /// replies.
        replication: bool,
    },
}

type Run = Option<(usize, usize, Vec<u16>)>;

/// Runs a client connection to completion.
pub async fn run<R, W>(mut rd: R, wr: W, shared: Arc<Shared>, entry: Arc<ClientEntry>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cap = shared.rt.max_pipeline.load(Ordering::Relaxed).max(1);
    let out = Arc::new(OutBytes::default());
    out.cap.store(
        shared.rt.max_output_bytes.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    let db = match &shared.backend {
        Backend::Upstream(u) => u.url.db,
        Backend::Local(_) => 0,
    };
    let auth = crate::auth::ClientAuth::new(&entry.addr);
    let mut s = Session {
        auth,
        id: entry.id,
        shared: shared.clone(),
        entry,
        resp3: false,
        db,
        conn: None,
        pinned: None,
        pin_select_only: false,
        sel_db: db,
        sel_pending: 0,
        queue: std::collections::VecDeque::new(),
        cap,
        wr,
        wbuf: Vec::with_capacity(16 * 1024),
        wbuf_owed: 0,
        out: out.clone(),
        broken: false,
        quit: false,
        tx_queue: cz::Tx::default(),
        in_multi: false,
        run_decode: None,
        writes_in_flight: 0,
        run_writes: false,
        swapdb_in_tx: false,
        bytes_run: Vec::new(),
        bytes_run_args: 0,
        fill_keys: std::collections::VecDeque::new(),
        fill_key_count: std::collections::HashMap::new(),
        fills_answered: 0,
    };
    // One long-lived future per signal: re-creating them on every read would
    // cost a registration each time.
    let draining = shared.draining.clone();
    let mut drain_signal = std::pin::pin!(draining.cancelled());
    let overflow = out.overflow.clone();
    let mut overflow_signal = std::pin::pin!(overflow.cancelled());
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut need = 0usize;
    // Slowloris guard: a started request must complete, or keep arriving
    // at 16 KiB or more per period, within server.header_timeout_ms.
    let mut partial: Option<(tokio::time::Instant, usize)> = None;
    let mut eager = 0u32;
    let flow = loop {
        if buf.len() >= need.max(1) {
            need = 0;
            let before = buf.len();
            match s.process(&mut buf, &mut need).await {
                Flow::Continue => {}
                other => break other,
            }
            if buf.len() < before {
                // A request completed: the guard starts over for the next one.
                partial = None;
            }
        }
        // Requests the client has already sent are taken in before a write
        // that may block: like Redis, which reads queries while its output
        // buffer grows, their replies then count against
        // limits.max_output_bytes. Otherwise a client that pipelines without
        // reading, answered from L1 one request per read, would block the
        // session on its full socket below the cap forever. Bounded, so a
        // steady sender still gets its replies written.
        if eager < 64
            && !s.quit
            && !s.broken
            && s.queue.len() < s.cap
            && buf.len() < MAX_EAGER
            && let Some(r) = poll_once(rd.read_buf(&mut buf))
        {
            eager += 1;
            match r {
                Ok(0) | Err(_) => break Flow::Stop,
                Ok(n) => {
                    s.shared.metrics.bytes(n, 0);
                    continue;
                }
            }
        }
        eager = 0;
        // The slowloris guard measures how long the client takes to send,
        // so time spent waiting for the client to read our replies (or for
        // upstream replies while the pipeline cap keeps us from reading)
        // moves its deadline on: a client that pipelined a large request
        // batch and reads the replies slowly is not cut for it.
        let stalled_since = partial.is_some().then(tokio::time::Instant::now);
        s.emit_ready().await;
        s.flush().await;
        if s.quit || s.broken {
            break Flow::Stop;
        }
        let want = need
            .saturating_sub(buf.len())
            .clamp(16 * 1024, 4 * 1024 * 1024);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        pause_deadline(&mut partial, stalled_since);
        let header_ms = shared.rt.header_timeout_ms.load(Ordering::Relaxed);
        partial = match partial {
            _ if buf.is_empty() || header_ms == 0 => None,
            None => Some((
                tokio::time::Instant::now() + Duration::from_millis(header_ms),
                buf.len(),
            )),
            Some((_, mark)) if buf.len() >= mark + 16 * 1024 => Some((
                tokio::time::Instant::now() + Duration::from_millis(header_ms),
                buf.len(),
            )),
            keep => keep,
        };
        let reading = s.queue.len() < s.cap;
        // Not reading (pipeline cap): the client is not the one keeping
        // the request incomplete, so its clock is paused below.
        let header_deadline = partial.filter(|_| reading).map(|(d, _)| d);
        let waited_since = (partial.is_some() && !reading).then(tokio::time::Instant::now);
        let idle = if s.queue.is_empty() {
            shared.rt.idle_timeout()
        } else {
            None
        };
        let read = async {
            match idle {
                Some(t) => match tokio::time::timeout(t, rd.read_buf(&mut buf)).await {
                    Ok(r) => r.map(Some),
                    Err(_) => Ok(None),
                },
                None => rd.read_buf(&mut buf).await.map(Some),
            }
        };
        let head = async {
            match s.queue.front_mut() {
                Some(Out::Up { rx, .. }) => Some(rx.await),
                _ => std::future::pending().await,
            }
        };
        let pinned_conn = s.pinned.as_ref().map(|(c, _)| c.clone());
        if s.out.over.load(Ordering::Relaxed) {
            tracing::warn!(
                client = s.id,
                "client output buffer over limits.max_output_bytes; disconnecting"
            );
            s.shared.metrics.error("output_overflow");
            break Flow::Stop;
        }
        // Biased, busiest first: polling the cancellation futures takes a
        // lock each, so they are only reached when nothing else is ready.
        tokio::select! {
            biased;
            r = head => {
                if let Some(r) = r {
                    let item = s.queue.pop_front().expect("head exists");
                    // Writing may wait on the client's reading: paused below.
                    // (Not when paused for the whole select already.)
                    let t0 = (partial.is_some() && waited_since.is_none())
                        .then(tokio::time::Instant::now);
                    s.emit(item, Some(r.unwrap_or(Err(UpError::Lost)))).await;
                    pause_deadline(&mut partial, t0);
                }
            }
            r = read, if reading => match r {
                Ok(Some(0)) | Err(_) => break Flow::Stop,
                Ok(Some(n)) => s.shared.metrics.bytes(n, 0),
                Ok(None) => {
                    // Idle with nothing in flight: close, as Redis' `timeout` does.
                    s.shared.metrics.error("idle_timeout");
                    break Flow::Stop;
                }
            },
            _ = async { tokio::time::sleep_until(header_deadline.unwrap()).await }, if header_deadline.is_some() => {
                s.shared.metrics.error("header_timeout");
                tracing::debug!(client = s.id, "request not completed within server.header_timeout_ms; closing");
                s.reply(resp::error_bytes("ERR request not completed within server.header_timeout_ms")).await;
                break Flow::Stop;
            }
            _ = &mut overflow_signal => {
                tracing::warn!(client = s.id, "client output buffer over limits.max_output_bytes; disconnecting");
                s.shared.metrics.error("output_overflow");
                break Flow::Stop;
            }
            _ = &mut drain_signal => {
                // Graceful shutdown: answer what was asked, then close.
                break Flow::Stop;
            }
            _ = async { pinned_conn.as_ref().expect("guarded").closed().await }, if pinned_conn.is_some() => {
                // Redis closed this client's own connection (CLIENT KILL,
                // timeout): close the client too, as Redis would have.
                break Flow::Stop;
            }
        }
        pause_deadline(&mut partial, waited_since);
    };
    match flow {
        Flow::Tunnel {
            first,
            rest,
            replication,
        } => s.tunnel(rd, first, rest, replication).await,
        _ => {
            let shutdown = shared.shutdown.clone();
            tokio::select! {
                _ = s.wait_drained() => {}
                _ = shutdown.cancelled() => {}
            }
            let _ = s.wr.shutdown().await;
            if let Some((c, _)) = s.pinned.take() {
                c.close();
            }
        }
    }
}

impl<W> Session<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Parses and dispatches every complete request in `buf`.
    async fn process(&mut self, buf: &mut BytesMut, need: &mut usize) -> Flow {
        let limits = self.shared.rt.limits();
        let mut parsed = Vec::with_capacity(16);
        let mut off = 0;
        let mut proto_err = None;
        loop {
            match resp::parse_request(&buf[off..], &limits) {
                Ok(Parse::Complete(p)) => {
                    let start = off;
                    off += p.len;
                    parsed.push((start, p));
                }
                Ok(Parse::Incomplete { need: n }) => {
                    *need = off + n;
                    break;
                }
                Err(e) => {
                    proto_err = Some(e);
                    break;
                }
            }
        }
        let chunk = buf.split_to(off).freeze();
        if off > 0 {
            *need = need.saturating_sub(off);
        }
        let mut run: Run = None;
        let l1 = self.shared.l1.clone().filter(|l| l.is_valid());
        for (i, (start, p)) in parsed.iter().enumerate() {
            if p.args.is_empty() {
                continue;
            }
            // Ranges of an inline request point into its quoted text, so
            // only RESP requests are classified from the raw bytes.
            let view = command::RawArgs {
                buf: &chunk[*start..*start + p.len],
                ranges: &p.args,
            };
            let (id, class) = if p.inline {
                (None, None)
            } else {
                let id = command::lookup(&view);
                (id, Some(command::classify(&view, id)))
            };
            let batch_bytes = self.bytes_batchable(id, class, &view);
            if !batch_bytes && !self.bytes_run.is_empty() {
                self.flush_bytes().await;
            }
            // Auth gate (src/auth.rs): only when [[users]] are configured.
            if self.shared.auth.enabled()
                && let Some((reply, delay)) = self.auth_gate(view.buf, p, id, class)
            {
                self.flush_run(&chunk, &mut run).await;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if self.in_multi && self.pinned.is_some() {
                    // Inside MULTI a refused command must also doom the
                    // transaction, as Redis does: queue a command Redis
                    // rejects at queue time (wrong arity), show the client
                    // our refusal in its place, and EXEC answers EXECABORT.
                    let poison = Bytes::from_static(b"*1\r\n$4\r\nEVAL\r\n");
                    let ids = vec![command::count() as u16];
                    self.forward(poison, ids, Post::Replace(reply)).await;
                } else {
                    self.reply(reply).await;
                }
                continue;
            }
            self.entry.commands.fetch_add(1, Ordering::Relaxed);
            // While a write of this session is in flight, L1 is not used
            // at all: a hit, fill or wait could miss that write (another
            // session's fill may have read the key just before it), and a
            // client must read its own writes.
            let l1_usable = self.l1_usable();
            let db = self.l1_db().unwrap_or_default();
            if let (Some(l1), false) = (&l1, p.inline) {
                if id == *GET_ID && p.args.len() == 2 && l1_usable {
                    // With nothing ahead of it, a hit goes straight into
                    // the output buffer (counted against the output cap
                    // until written, as a queued reply is).
                    // Bounded: past WBUF_DIRECT hits take queue slots again,
                    // so the pipeline cap holds back a client's input
                    // before its unwritten replies grow large.
                    let direct =
                        run.is_none() && self.queue.is_empty() && self.wbuf.len() < WBUF_DIRECT;
                    if direct {
                        // Any growth of the buffer happens here, not under
                        // the cache shard's lock.
                        self.wbuf.reserve(crate::cache::COPY_MAX);
                    }
                    let dst = direct.then_some(&mut self.wbuf);
                    match l1.lookup(db, view.arg(1).unwrap_or_default(), &self.out, dst) {
                        Lookup::Copied(mut n) => {
                            if !self.resp3 && n == 3 && self.wbuf.ends_with(crate::cache::NIL) {
                                self.wbuf.truncate(self.wbuf.len() - 3);
                                self.wbuf.extend_from_slice(crate::cache::NIL_RESP2);
                                n = crate::cache::NIL_RESP2.len();
                            }
                            self.out.add(n);
                            self.wbuf_owed += n;
                            self.shared.metrics.command(
                                GET_ID.unwrap_or(0),
                                false,
                                Some(Duration::ZERO),
                            );
                            continue;
                        }
                        Lookup::Hit(frame) => {
                            self.flush_run(&chunk, &mut run).await;
                            self.shared.metrics.command(
                                GET_ID.unwrap_or(0),
                                false,
                                Some(Duration::ZERO),
                            );
                            self.reply(crate::cache::for_client(frame, self.resp3))
                                .await;
                            continue;
                        }
                        Lookup::Fill(token, rx) => {
                            // The fill starts before anything here awaits:
                            // others may be waiting for it (coalesced), and
                            // this client may stall on a full queue below.
                            let key = chunk.slice(*start + p.args[1].start..*start + p.args[1].end);
                            let started = self.start_fill(db, key.clone(), token);
                            // Replies keep request order: the batch so far
                            // takes its slot first.
                            self.flush_run(&chunk, &mut run).await;
                            if started {
                                self.wait_fill(rx, key).await;
                            } else {
                                let raw = chunk.slice(*start..*start + p.len);
                                let ids = vec![GET_ID.unwrap_or(0) as u16];
                                self.forward(raw, ids, Post::None).await;
                            }
                            continue;
                        }
                        Lookup::Wait(rx) => {
                            self.flush_run(&chunk, &mut run).await;
                            let key = chunk.slice(*start + p.args[1].start..*start + p.args[1].end);
                            self.wait_fill(rx, key).await;
                            continue;
                        }
                        Lookup::Bypass => {}
                    }
                } else if id == *MGET_ID && p.args.len() > 2 && l1_usable {
                    // Hits are served from L1; only the missing keys go upstream.
                    let resp3 = self.resp3;
                    let slots: Vec<Option<Bytes>> = (1..p.args.len())
                        .map(|i| {
                            l1.peek(db, view.arg(i).unwrap_or_default())
                                .map(|f| crate::cache::for_client(f, resp3))
                        })
                        .collect();
                    let missing: Vec<usize> =
                        (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
                    if !missing.is_empty()
                        && let Some(fills) =
                            self.start_mget_fills(db, &chunk, *start, &p.args, &missing)
                    {
                        // Every missing key is filled (or waited for) as a
                        // GET of it would be, so the next MGET hits.
                        self.flush_run(&chunk, &mut run).await;
                        let keys = missing
                            .iter()
                            .map(|&i| {
                                chunk
                                    .slice(*start + p.args[i + 1].start..*start + p.args[i + 1].end)
                            })
                            .collect();
                        self.wait_mget(slots, fills, keys).await;
                        continue;
                    }
                    if missing.len() < slots.len() {
                        self.flush_run(&chunk, &mut run).await;
                        if missing.is_empty() {
                            let mut out = BytesMut::new();
                            resp::array_header(&mut out, slots.len());
                            for f in slots.iter().flatten() {
                                out.extend_from_slice(f);
                            }
                            self.shared.metrics.command(
                                MGET_ID.unwrap_or(0),
                                false,
                                Some(Duration::ZERO),
                            );
                            self.reply(out.freeze()).await;
                        } else {
                            let keys: Vec<&[u8]> = std::iter::once(&b"MGET"[..])
                                .chain(missing.iter().map(|&i| view.arg(i + 1).unwrap_or_default()))
                                .collect();
                            let mut b = BytesMut::new();
                            resp::encode_command(&keys, &mut b);
                            let ids = vec![MGET_ID.unwrap_or(0) as u16];
                            self.forward(b.freeze(), ids, Post::Mget(slots)).await;
                        }
                        continue;
                    }
                } else if l1_usable
                    && id == *HGET_ID
                    && p.args.len() == 3
                    && run.is_none()
                    && self.queue.is_empty()
                    && self.wbuf.len() < WBUF_DIRECT
                    && {
                        // As GET's direct hits: into the output buffer.
                        self.wbuf.reserve(crate::cache::COPY_MAX);
                        let copied = l1.copy_field(
                            db,
                            view.arg(1).unwrap_or_default(),
                            view.arg(2).unwrap_or_default(),
                            self.resp3,
                            &mut self.wbuf,
                        );
                        if let Some(n) = copied {
                            self.out.add(n);
                            self.wbuf_owed += n;
                            let idx = id.unwrap_or_default();
                            self.shared
                                .metrics
                                .command(idx, false, Some(Duration::ZERO));
                        }
                        copied.is_some()
                    }
                {
                    continue;
                } else if l1_usable && let Some(read) = hash_read(id, &chunk, *start, &p.args) {
                    let key = chunk.slice(*start + p.args[1].start..*start + p.args[1].end);
                    let idx = id.unwrap_or_default();
                    match l1.lookup_hash(db, &key, &read, self.resp3, &self.out) {
                        HashLookup::Hit(reply) => {
                            self.flush_run(&chunk, &mut run).await;
                            self.shared
                                .metrics
                                .command(idx, false, Some(Duration::ZERO));
                            self.reply(reply).await;
                            continue;
                        }
                        HashLookup::Fill(token, rx) => {
                            // Started before any await, as GET's.
                            let started = self.start_hash_fill(db, key.clone(), read, token);
                            self.flush_run(&chunk, &mut run).await;
                            if started {
                                self.wait_fill_as(rx, idx, None, key).await;
                                continue;
                            }
                        }
                        HashLookup::Wait(rx) => {
                            self.flush_run(&chunk, &mut run).await;
                            self.wait_fill_as(rx, idx, None, key).await;
                            continue;
                        }
                        HashLookup::Bypass => {}
                    }
                } else if invalidates(id, class) {
                    invalidate_writes(l1, &view, id);
                    self.swapdb_in_tx |= self.in_multi && id == *SWAPDB_ID;
                }
            }
            if self.fill_keys.len() > self.fills_answered
                && id.is_none_or(writes)
                && self.may_touch_fills(id, &view)
            {
                self.wait_fills().await;
            }
            if batch_bytes {
                self.flush_run(&chunk, &mut run).await;
                let raw = chunk.slice(*start..*start + p.len);
                let args = p.args.iter().map(|r| raw.slice(r.clone())).collect();
                self.bytes_run.push((id.unwrap_or_default(), args));
                self.bytes_run_args += p.args.len();
                if self.bytes_run.len() >= BYTES_BATCH || self.bytes_run_args >= BYTES_BATCH_ARGS {
                    self.flush_bytes().await;
                }
                continue;
            }
            if class == Some(Class::Pass)
                && self.pinned.is_none()
                && !self.is_local()
                && let Some(dec) = self.batch_decode(id, &chunk[*start..*start + p.len], &p.args)
            {
                let r = run.get_or_insert_with(|| (*start, *start, Vec::new()));
                let rid = id.unwrap_or(command::count());
                r.2.push(rid as u16);
                self.run_writes |= writes(rid);
                r.1 = *start + p.len;
                if dec != cz::Decode::None || self.run_decode.is_some() {
                    let before = r.2.len() - 1;
                    self.run_decode
                        .get_or_insert_with(|| vec![cz::Decode::None; before])
                        .push(dec);
                }
                continue;
            }
            let raw = chunk.slice(*start..*start + p.len);
            let args: Vec<Bytes> = if p.inline {
                resp::inline_args(&raw, &p.args)
            } else {
                p.args.iter().map(|r| raw.slice(r.clone())).collect()
            };
            let (id, class) = match class {
                Some(c) => (id, c),
                None => {
                    let id = command::lookup(&args);
                    let class = command::classify(&args, id);
                    // Inline writes (telnet, `redis-cli` piping plain text)
                    // missed the RESP path's local invalidation above.
                    if let Some(l1) = &l1
                        && invalidates(id, Some(class))
                    {
                        invalidate_writes(l1, &args, id);
                        self.swapdb_in_tx |= self.in_multi && id == *SWAPDB_ID;
                    }
                    (id, class)
                }
            };
            self.flush_run(&chunk, &mut run).await;
            // Inline requests are forwarded in RESP form.
            let raw = if p.inline {
                let mut b = BytesMut::new();
                resp::encode_command(&args, &mut b);
                b.freeze()
            } else {
                raw
            };
            match self.dispatch(class, id, &args, raw).await {
                Flow::Continue => {}
                Flow::Tunnel {
                    first, replication, ..
                } => {
                    // Whatever the client pipelined after the tunnelling
                    // command goes through the tunnel's own gate, ahead of
                    // the bytes not parsed yet.
                    let mut rest = BytesMut::new();
                    if let Some((next_start, _)) = parsed.get(i + 1) {
                        rest.extend_from_slice(&chunk[*next_start..]);
                    }
                    rest.extend_from_slice(buf);
                    buf.clear();
                    return Flow::Tunnel {
                        first,
                        rest,
                        replication,
                    };
                }
                Flow::Stop => return Flow::Stop,
            }
            if self.quit {
                return Flow::Continue;
            }
        }
        self.flush_bytes().await;
        self.flush_run(&chunk, &mut run).await;
        if let Some(e) = proto_err {
            self.shared.metrics.error("protocol");
            tracing::debug!(client = self.id, error = %e, "protocol error; closing");
            self.reply(resp::error_bytes(&e.0)).await;
            self.quit = true;
        }
        Flow::Continue
    }

    /// Authentication and authorization of one command; `Some` is the
    /// reply that replaces it.
    fn auth_gate(
        &mut self,
        raw: &[u8],
        p: &resp::ParsedRange,
        id: Option<usize>,
        class: Option<Class>,
    ) -> Option<(Bytes, Duration)> {
        use crate::auth::Verdict;
        let v = if p.inline {
            let args = resp::inline_args(raw, &p.args);
            let id = command::lookup(&args);
            let class = command::classify(&args, id);
            self.auth.check(&self.shared.auth, &args, id, class)
        } else {
            let view = command::RawArgs {
                buf: raw,
                ranges: &p.args,
            };
            let class = class.unwrap_or(Class::Pass);
            self.auth.check(&self.shared.auth, &view, id, class)
        };
        match v {
            Verdict::Allow => None,
            Verdict::Reply { reply, delay } => Some((reply, delay)),
        }
    }

    fn is_local(&self) -> bool {
        matches!(self.shared.backend, Backend::Local(_))
    }

    /// Queues a reply slot; a full queue is drained first (back-pressure:
    /// the client is not read while `limits.max_pipeline` slots wait).
    async fn push(&mut self, o: Out) {
        while self.queue.len() >= self.cap && !self.broken {
            let item = self.queue.pop_front().expect("non-empty");
            self.emit(item, None).await;
        }
        self.queue.push_back(o);
    }

    /// Moves every already-answered slot at the head of the queue to the
    /// output buffer, without waiting.
    async fn emit_ready(&mut self) {
        loop {
            let ready = match self.queue.front_mut() {
                Some(Out::Up { rx, .. }) => match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => Some(Err(UpError::Lost)),
                },
                Some(_) => None,
                None => break,
            };
            let item = self.queue.pop_front().expect("non-empty");
            self.emit(item, ready).await;
        }
    }

    /// Waits for every queued reply and writes it: the barrier before a
    /// pin or tunnel, and the last step of a closing session.
    /// Whether a write could change what a fill still in flight reads:
    /// one naming its key, or one whose keys are not all known (no id,
    /// no key positions: FLUSHDB, EXEC…; scripts may touch undeclared keys).
    fn may_touch_fills(&self, id: Option<usize>, args: &command::RawArgs) -> bool {
        let Some(i) = id else { return true };
        if matches!(
            command::name(i),
            "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO"
        ) {
            return true;
        }
        // Keys of fills already answered count too: a needless wait for the
        // rest, never a missed one.
        let keys = command::key_positions(args, id);
        keys.is_empty()
            || keys.iter().any(|&p| {
                args.arg(p)
                    .is_some_and(|k| self.fill_key_count.contains_key(k))
            })
    }

    /// Waits until every queued fill has its answer (see `fill_keys`),
    /// without writing anything to the client: one that stopped reading
    /// must not hold this up.
    async fn wait_fills(&mut self) {
        let mut seen = 0;
        for item in self.queue.iter_mut() {
            if let Out::Up {
                rx,
                post: Post::Waited { .. },
                ..
            } = item
            {
                seen += 1;
                if seen <= self.fills_answered {
                    continue;
                }
                let r = (&mut *rx).await.unwrap_or(Err(UpError::Lost));
                // Back in the slot as an answered receiver, for `emit`.
                let (tx, answered) = oneshot::channel();
                let _ = tx.send(r);
                *rx = answered;
            }
        }
        self.fills_answered = self.fill_keys.len();
    }

    async fn wait_drained(&mut self) {
        while let Some(item) = self.queue.pop_front() {
            self.emit(item, None).await;
        }
        self.flush().await;
    }

    async fn write_out(&mut self, data: &[u8]) {
        if self.broken {
            return;
        }
        // A client that stops reading blocks this write; replies still
        // arriving for it count against limits.max_output_bytes, and passing
        // that ends the write (and the session) instead of waiting forever.
        let overflow = self.out.overflow.clone();
        tokio::select! {
            r = self.wr.write_all(data) => {
                if r.is_err() {
                    self.broken = true;
                } else {
                    self.shared.metrics.bytes(0, data.len());
                }
            }
            _ = overflow.cancelled() => {
                tracing::warn!(client = self.id, "client output buffer over limits.max_output_bytes; disconnecting");
                self.shared.metrics.error("output_overflow");
                self.broken = true;
            }
        }
    }

    async fn flush(&mut self) {
        if !self.wbuf.is_empty() {
            let buf = std::mem::take(&mut self.wbuf);
            self.write_out(&buf).await;
            self.out.sub(std::mem::take(&mut self.wbuf_owed));
            self.wbuf = buf;
            self.wbuf.clear();
            self.wbuf.shrink_to(1 << 20);
        }
    }

    async fn append(&mut self, data: &[u8]) {
        if data.len() >= DIRECT {
            self.flush().await;
            self.write_out(data).await;
        } else {
            self.wbuf.extend_from_slice(data);
        }
    }

    /// Writes one slot's reply (awaiting it when `res` is None and it is an
    /// upstream slot), after post-processing, and records its metrics.
    async fn emit(&mut self, item: Out, res: Option<Result<crate::upstream::Reply, UpError>>) {
        let metrics = self.shared.metrics.clone();
        match item {
            Out::Ready(b) => {
                self.append(&b).await;
                self.out.sub(b.len());
            }
            Out::Failed { err, count } => {
                metrics.error(err.kind());
                let line = resp::error_bytes(&err.to_string());
                for _ in 0..count {
                    self.wbuf.extend_from_slice(&line);
                }
            }
            Out::Up {
                rx,
                count,
                ids,
                start,
                post,
                writes,
            } => {
                if writes {
                    self.writes_in_flight -= 1;
                }
                if matches!(post, Post::Select(_)) {
                    self.sel_pending -= 1;
                }
                if matches!(post, Post::Waited { .. }) {
                    for k in self.fill_keys.pop_front().unwrap_or_default() {
                        if let std::collections::hash_map::Entry::Occupied(mut e) =
                            self.fill_key_count.entry(k)
                        {
                            *e.get_mut() -= 1;
                            if *e.get() == 0 {
                                e.remove();
                            }
                        }
                    }
                    self.fills_answered = self.fills_answered.saturating_sub(1);
                }
                let res = match res {
                    Some(r) => r,
                    None => {
                        self.flush().await;
                        rx.await.unwrap_or(Err(UpError::Lost))
                    }
                };
                let elapsed = start.elapsed();
                match res {
                    Ok(reply) => {
                        // SWAPDB has run: what L1 filled between the flush
                        // at its parse and now may be the old db's.
                        // (Inside MULTI its reply is +QUEUED: EXEC's counts.)
                        // Without L1 there is nothing to check per reply.
                        if let Some(l1) = &self.shared.l1 {
                            let mut swapped = ids.iter().any(|&i| Some(i as usize) == *SWAPDB_ID)
                                && !reply.data.starts_with(b"+QUEUED");
                            if self.swapdb_in_tx
                                && ids.iter().any(|&i| Some(i as usize) == *EXEC_ID)
                            {
                                self.swapdb_in_tx = false;
                                swapped = true;
                            }
                            if swapped {
                                l1.flush();
                            }
                        }
                        if reply.errors == 0 {
                            metrics.commands_ok(&ids, elapsed);
                        } else {
                            for (i, id) in ids.iter().enumerate() {
                                let err = i < 64 && reply.errors & (1 << i) != 0;
                                metrics.command(*id as usize, err, Some(elapsed));
                            }
                        }
                        let mut n = reply.data.len();
                        let data = match post {
                            Post::None => reply.data,
                            Post::Info => {
                                crate::admin::append_proxy_info(&reply.data, &self.shared)
                            }
                            Post::Ai(p) => {
                                // The answer may have been stored
                                // compressed (by AI.SET or a plain SET).
                                let data = if matches!(p, AiPost::Get { .. })
                                    && self.shared.rt.compression.load(Ordering::Relaxed)
                                {
                                    cz::decode_reply(
                                        &cz::Decode::Bulk,
                                        reply.data,
                                        &self.shared.config().compression.codec(),
                                        &metrics.compression,
                                    )
                                } else {
                                    reply.data
                                };
                                p.record(&data, &metrics.ai);
                                data
                            }
                            Post::Waited { resp3, ai } => {
                                let data = crate::cache::for_client(reply.data, resp3);
                                if let Some(p) = ai {
                                    p.record(&data, &metrics.ai);
                                }
                                data
                            }
                            Post::Mget(slots) => merge_mget(slots, reply.data),
                            Post::Select(n) => {
                                if &reply.data[..] == b"+OK\r\n" {
                                    self.sel_db = n;
                                }
                                reply.data
                            }
                            Post::Replace(b) => b,
                            Post::First => first_frame(reply.data),
                            Post::Decode(d) => {
                                let codec = self.shared.config().compression.codec();
                                if offloaded(reply.data.len(), OFFLOAD_REPLY_BYTES) {
                                    let m = metrics.clone();
                                    on_blocking_pool(move || {
                                        cz::decode_reply(&d, reply.data, &codec, &m.compression)
                                    })
                                    .await
                                } else {
                                    cz::decode_reply(&d, reply.data, &codec, &metrics.compression)
                                }
                            }
                        };
                        if data.len() > n {
                            // Decompressed: the client is owed more.
                            self.out.add(data.len() - n);
                            n = data.len();
                        }
                        self.append(&data).await;
                        self.out.sub(n);
                    }
                    Err(err) => {
                        for id in &ids {
                            metrics.command(*id as usize, true, Some(elapsed));
                        }
                        metrics.error(err.kind());
                        let line = resp::error_bytes(&err.to_string());
                        for _ in 0..count {
                            self.wbuf.extend_from_slice(&line);
                        }
                    }
                }
            }
        }
    }

    async fn reply(&mut self, b: Bytes) {
        // Owed to the client like an upstream reply (L1 hits can be large).
        self.out.add(b.len());
        self.push(Out::Ready(b)).await;
    }

    async fn flush_run(&mut self, chunk: &Bytes, run: &mut Run) {
        if let Some((s, e, ids)) = run.take() {
            self.run_writes = false;
            let post = match self.run_decode.take() {
                Some(v) => Post::Decode(cz::Decode::Seq(v)),
                None => Post::None,
            };
            self.forward(chunk.slice(s..e), ids, post).await;
        }
    }

    /// Whether compression handles command `id` (one table lookup).
    #[inline]
    fn compressing(&self, id: Option<usize>) -> bool {
        cz::kind(id) != Kind::None
            && self.shared.rt.compression.load(Ordering::Relaxed)
            && !self.is_local()
    }

    /// `Some(action)` when a pass-through command may join the batch
    /// (`Decode::None` unless its reply may carry a compressed value).
    #[inline]
    fn batch_decode(
        &self,
        id: Option<usize>,
        buf: &[u8],
        ranges: &[std::ops::Range<usize>],
    ) -> Option<cz::Decode> {
        if !self.compressing(id) {
            return Some(cz::Decode::None);
        }
        let view = command::RawArgs { buf, ranges };
        let min = self.shared.rt.compression_min_bytes.load(Ordering::Relaxed);
        cz::batchable(cz::kind(id), &view, min)
    }

    /// Compression hook (see src/compress_cmd.rs). Returns false when the
    /// command takes its normal path afterwards.
    async fn compress_hook(&mut self, kind: Kind, idx: usize, args: &[Bytes], raw: &Bytes) -> bool {
        if self.is_local() {
            return false;
        }
        let cfg = self.shared.config();
        let policy = cz::Policy::of(&cfg.compression);
        let enabled = self.shared.rt.compression.load(Ordering::Relaxed);
        let multi = self.tx_queue.multi;
        let kind = if enabled {
            cz::effective(kind, policy.codec.min_bytes)
        } else {
            Kind::None
        };
        let ids = vec![idx as u16];
        match kind {
            Kind::Multi => {
                self.tx_queue.multi = true;
                return false;
            }
            Kind::Discard => {
                self.tx_queue = cz::Tx::default();
                return false;
            }
            Kind::Exec if multi => {
                let q = std::mem::take(&mut self.tx_queue).queued;
                if self.pin().await {
                    self.forward(raw.clone(), ids, Post::Decode(cz::Decode::Exec(q)))
                        .await;
                }
                return true;
            }
            Kind::Write(w) => {
                let size: usize = args.iter().map(|a| a.len()).sum();
                let (new, decode, written) = if offloaded(size, OFFLOAD_BYTES) {
                    let (cfg, m, args) = (cfg.clone(), self.shared.metrics.clone(), args.to_vec());
                    on_blocking_pool(move || {
                        let policy = cz::Policy::of(&cfg.compression);
                        cz::rewrite_write(w, &args, &policy, &m.compression)
                    })
                    .await
                } else {
                    cz::rewrite_write(w, args, &policy, &self.shared.metrics.compression)
                };
                let post = if multi {
                    self.tx_queue.queued.push(decode);
                    self.tx_queue.written.extend(written);
                    Post::None
                } else {
                    Post::Decode(decode)
                };
                let data = match new {
                    Some(a) => {
                        let mut b = BytesMut::new();
                        resp::encode_command(&a, &mut b);
                        b.freeze()
                    }
                    None => raw.clone(),
                };
                self.forward(data, ids, post).await;
                return true;
            }
            Kind::Read(r) => {
                let decode = cz::read_decode(r, args);
                let post = if multi {
                    self.tx_queue.queued.push(decode);
                    Post::None
                } else {
                    Post::Decode(decode)
                };
                self.forward(raw.clone(), ids, post).await;
                return true;
            }
            Kind::Bytes | Kind::HashBytes | Kind::Incr | Kind::HIncr if cz::arity_ok(idx, args) => {
                let targets = cz::targets(kind, idx, args);
                let read = cz::read_only(idx, args);
                if !multi {
                    self.wait_drained().await;
                    let reply = self
                        .emulate(&targets, &policy.codec, read, args, false)
                        .await;
                    self.answer(idx, reply).await;
                    return true;
                }
                // Queued: read the frames now (on a shared connection), and
                // queue the script with them, and those that writes queued
                // before it store, as expectations.
                let mut expect = match self.probe(&targets, &policy.codec).await {
                    Ok(e) => e,
                    Err(reply) => {
                        // Queued as Redis would; its EXEC element is the error.
                        let a = cz::script_args(&targets, &[], true, read, args);
                        let mut b = BytesMut::new();
                        resp::encode_command(&a, &mut b);
                        self.tx_queue.queued.push(cz::Decode::Replace(reply));
                        self.forward(b.freeze(), ids, Post::None).await;
                        return true;
                    }
                };
                cz::expect_queued(&self.tx_queue, &targets, &mut expect);
                let a = cz::script_args(&targets, &expect, true, read, args);
                let mut b = BytesMut::new();
                resp::encode_command(&a, &mut b);
                let map = cz::lcs_map(args, self.resp3);
                self.tx_queue.queued.push(cz::Decode::Script { map });
                self.forward(b.freeze(), ids, Post::None).await;
                return true;
            }
            _ => {}
        }
        if multi {
            let name = command::name(idx);
            if name != "WATCH" && name != "MULTI" {
                self.tx_queue.queued.push(cz::Decode::None);
            }
        }
        false
    }

    /// Whether a command joins `bytes_run`: a byte-level command that
    /// would otherwise take `emulate` alone (compression on, not in MULTI,
    /// Redis' arity), and no proxy users (whose gate answers in order).
    fn bytes_batchable(
        &self,
        id: Option<usize>,
        class: Option<Class>,
        args: &command::RawArgs,
    ) -> bool {
        let Some(idx) = id else { return false };
        let kind = cz::kind(id);
        if !matches!(
            kind,
            Kind::Bytes | Kind::HashBytes | Kind::Incr | Kind::HIncr
        ) || cz::effective(kind, self.shared.config().compression.min_bytes) == Kind::None
        {
            return false;
        }
        class == Some(Class::Pass)
            && self.compressing(id)
            && !self.tx_queue.multi
            && !self.in_multi
            && !self.shared.auth.enabled()
            && cz::arity_ok_n(idx, args.ranges.len())
            && args.ranges.len() <= BYTES_BATCH_ARGS
    }

    /// The reply to command `idx`, counted in the metrics (as an error
    /// when it is one).
    async fn answer(&mut self, idx: usize, reply: Bytes) {
        self.shared
            .metrics
            .command(idx, reply.first() == Some(&b'-'), None);
        self.reply(reply).await;
    }

    /// Runs `bytes_run` in order with [`cz::BATCH_SCRIPT`]: one round trip
    /// for all of them while none meets a compressed value; the one that
    /// does is emulated alone (`emulate`), and the script goes on with
    /// those after it. Replies in order, as `emulate` would give them.
    async fn flush_bytes(&mut self) {
        if self.bytes_run.is_empty() {
            return;
        }
        let run = std::mem::take(&mut self.bytes_run);
        self.bytes_run_args = 0;
        self.wait_drained().await;
        let codec = self.shared.config().compression.codec();
        let (ids, cmds): (Vec<usize>, Vec<cz::Batched>) = run
            .into_iter()
            .map(|(idx, args)| {
                let kind = cz::kind(Some(idx));
                let targets = cz::targets(kind, idx, &args);
                let read = cz::read_only(idx, &args);
                (
                    idx,
                    cz::Batched {
                        targets,
                        read,
                        args,
                    },
                )
            })
            .unzip();
        let mut at = 0;
        while at < cmds.len() {
            if cmds.len() - at > 1 {
                let a = cz::batch_args(&cmds[at..]);
                let r = self.run_script(a, &cz::BATCH_SHA, false).await;
                let Some(replies) = r.as_ref().ok().and_then(cz::split_batch) else {
                    // The call failed as a whole (none ran), or the
                    // connection went with it: each command gets the error.
                    let err = r.unwrap_or_else(|e| resp::error_bytes(&e));
                    for &idx in &ids[at..] {
                        self.answer(idx, err.clone()).await;
                    }
                    return;
                };
                for reply in replies {
                    let reply = if cz::lcs_map(&cmds[at].args, self.resp3) {
                        cz::array_as_map(&reply)
                    } else {
                        reply
                    };
                    self.answer(ids[at], reply).await;
                    at += 1;
                }
                if at == cmds.len() {
                    return;
                }
            }
            // Stopped at a compressed value (or one command left).
            let c = &cmds[at];
            let reply = self
                .emulate(&c.targets, &codec, c.read, &c.args, false)
                .await;
            self.answer(ids[at], reply).await;
            at += 1;
        }
    }

    /// Runs a byte-level command through [`cz::SCRIPT`] until it ran on
    /// plain values: temporary decoded copies for a reader (`read`), the
    /// keys rewritten uncompressed for a writer.
    async fn emulate(
        &mut self,
        targets: &[cz::Target],
        codec: &crate::compress::Codec,
        read: bool,
        cmd: &[Bytes],
        side: bool,
    ) -> Bytes {
        let mut expect: Vec<cz::Expect> = Vec::new();
        for _ in 0..32 {
            let a = cz::script_args(targets, &expect, false, read, cmd);
            let r = self.run_script(a, &cz::SCRIPT_SHA, side).await;
            let r = match r {
                Ok(r) => r,
                Err(e) => return resp::error_bytes(&e),
            };
            let Some(found) = cz::script_report(&r) else {
                if !expect.is_empty() {
                    self.shared
                        .metrics
                        .compression
                        .emulated
                        .fetch_add(1, Ordering::Relaxed);
                }
                if cz::lcs_map(cmd, self.resp3) {
                    return cz::array_as_map(&r);
                }
                return r;
            };
            for (i, stored) in found {
                match codec.decode(&stored) {
                    Ok(value) => {
                        expect.retain(|e| e.target != i);
                        expect.push(cz::Expect {
                            target: i,
                            stored,
                            value,
                        });
                    }
                    Err(e) => {
                        self.shared
                            .metrics
                            .compression
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                        return cz::corrupt_error(&e);
                    }
                }
            }
            // Answered from the one value the script just read atomically
            // where that is Redis' answer (see cz::local_answer).
            if read
                && let [e] = expect.as_slice()
                && let Some(reply) = cz::local_answer(cmd, &e.value)
            {
                self.shared
                    .metrics
                    .compression
                    .emulated
                    .fetch_add(1, Ordering::Relaxed);
                return reply;
            }
        }
        resp::error_bytes("ERR respite: value kept changing concurrently, try again")
    }

    /// The frames `targets` hold now, decoded, as script expectations.
    async fn probe(
        &mut self,
        targets: &[cz::Target],
        codec: &crate::compress::Codec,
    ) -> Result<Vec<cz::Expect>, Bytes> {
        let mut expect = Vec::new();
        let a = cz::script_args(targets, &[], false, true, &[]);
        let r = self
            .run_script(a, &cz::SCRIPT_SHA, true)
            .await
            .map_err(|e| resp::error_bytes(&e))?;
        for (i, stored) in cz::script_report(&r).unwrap_or_default() {
            match codec.decode(&stored) {
                Ok(value) => expect.push(cz::Expect {
                    target: i,
                    stored,
                    value,
                }),
                Err(e) => return Err(cz::corrupt_error(&e)),
            }
        }
        Ok(expect)
    }

    /// [`cz::SCRIPT`] with `args` (its EVAL form) as EVALSHA, or as EVAL
    /// when Redis does not have it cached (yet, or after SCRIPT FLUSH).
    /// `side`: on a shared connection (see `side_roundtrip`).
    async fn run_script(
        &mut self,
        mut args: Vec<Bytes>,
        sha: &Bytes,
        side: bool,
    ) -> Result<Bytes, String> {
        let script = std::mem::replace(&mut args[1], sha.clone());
        args[0] = Bytes::from_static(b"EVALSHA");
        let r = self.roundtrip_on(&args, side).await;
        if !matches!(&r, Ok(reply) if reply.starts_with(b"-NOSCRIPT")) {
            return r;
        }
        args[0] = Bytes::from_static(b"EVAL");
        args[1] = script;
        self.roundtrip_on(&args, side).await
    }

    async fn roundtrip_on(&mut self, args: &[Bytes], side: bool) -> Result<Bytes, String> {
        if side {
            self.side_roundtrip(args).await
        } else {
            let refs: Vec<&[u8]> = args.iter().map(|b| &b[..]).collect();
            self.roundtrip(&refs).await
        }
    }

    /// One command on a shared connection, even when this session is
    /// pinned (inside MULTI its own connection would only queue it).
    async fn side_roundtrip(&mut self, args: &[Bytes]) -> Result<Bytes, String> {
        let Backend::Upstream(up) = &self.shared.backend else {
            return Err("ERR no upstream".into());
        };
        let up = up.clone();
        let conn = up
            .shared(false, self.id as usize)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = BytesMut::new();
        resp::encode_command(args, &mut b);
        let rx = conn.send(b.freeze(), 1, None).map_err(|e| e.to_string())?;
        match rx.await {
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(UpError::Lost.to_string()),
        }
    }

    /// The connection this session's commands go to right now.
    async fn target(&mut self) -> Result<Conn, UpError> {
        if let Some((c, _)) = &self.pinned {
            return if c.is_dead() {
                Err(UpError::Lost)
            } else {
                Ok(c.clone())
            };
        }
        if let Some(c) = &self.conn
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let Backend::Upstream(up) = &self.shared.backend else {
            return Err(UpError::Unavailable("no upstream (local mode)".into()));
        };
        let up = up.clone();
        let c = up.shared(self.resp3, self.id as usize).await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Starts the L1 fill of a GET miss: the value and its PTTL are read
    /// atomically on the tracking connection that owns this key, by a task
    /// of its own, so the waiters of the fill are answered even if this
    /// client goes away. False (waiters answered with an error) when that
    /// connection is missing: the caller reads the key itself.
    fn start_fill(&mut self, db: u32, key: Bytes, token: u64) -> bool {
        let (Backend::Upstream(up), Some(_)) = (&self.shared.backend, &self.shared.l1) else {
            return false;
        };
        let conn = up.tracking(&key);
        // Without the connection the caller reads the key itself; a send
        // that fails answers this client with the error, as its waiters.
        let connected = conn.is_some();
        let selected = db != up.url.db;
        let req = crate::cache::fill_request(db, up.url.db, &key, &[b"GET", &key]);
        let shared = self.shared.clone();
        send_fill(conn, req, move |r| {
            finish_fill(&shared, &key, token, selected, r)
        });
        connected
    }

    /// Starts the L1 fill of a hash read (HGET, HMGET, HGETALL) that
    /// missed: the fields and the key's PTTL are read atomically on the
    /// key's tracking connection, by a task of its own, so its waiters are
    /// answered even if this client goes away. False (waiters answered with
    /// the error) when that connection is missing: the caller reads the
    /// fields itself.
    fn start_hash_fill(&mut self, db: u32, key: Bytes, read: HashRead, token: u64) -> bool {
        let (Backend::Upstream(up), Some(_)) = (&self.shared.backend, &self.shared.l1) else {
            return false;
        };
        let selected = db != up.url.db;
        let cmd = read.fill_command(&key);
        let cmd: Vec<&[u8]> = cmd.iter().map(|b| &b[..]).collect();
        let req = crate::cache::fill_request(db, up.url.db, &key, &cmd);
        let shared = self.shared.clone();
        send_fill(up.tracking(&key), req, move |r| {
            finish_hash_fill(&shared, &key, token, &read, selected, r)
        })
    }

    /// Fills (or waits for fills of) the keys an MGET missed, each as its
    /// GET would be. None, having started nothing, when L1 cannot take one
    /// of them (an excluded key, tracking down): the caller reads them from
    /// Redis. Fills started before a later key turned out unfillable (the
    /// same key of another db in flight) complete on their own.
    fn start_mget_fills(
        &mut self,
        db: u32,
        chunk: &Bytes,
        start: usize,
        args: &[std::ops::Range<usize>],
        missing: &[usize],
    ) -> Option<Vec<(usize, crate::cache::FillRx)>> {
        let l1 = self.shared.l1.clone()?;
        let raw = |i: usize| &chunk[start + args[i + 1].start..start + args[i + 1].end];
        // A large cold MGET goes to Redis as it is: as fills it would hold
        // a tracking connection (every key's fills share two) for long.
        if missing.len() > MGET_FILL_MAX || !missing.iter().all(|&i| l1.fillable(db, raw(i))) {
            return None;
        }
        let Backend::Upstream(up) = &self.shared.backend else {
            return None;
        };
        let up = up.clone();
        let mut fills = Vec::with_capacity(missing.len());
        // The keys to read, by tracking connection: one transaction each.
        let mut groups: std::collections::BTreeMap<usize, Vec<(Bytes, u64)>> = Default::default();
        let mut ok = true;
        for &i in missing {
            match l1.fill_or_wait(db, raw(i), &self.out) {
                Lookup::Fill(token, rx) => {
                    let key = chunk.slice_ref(raw(i));
                    groups
                        .entry(up.tracking_slot(&key))
                        .or_default()
                        .push((key, token));
                    fills.push((i, rx));
                }
                Lookup::Wait(rx) => fills.push((i, rx)),
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        // Every marker taken above is completed, whatever happens next.
        for (slot, keys) in groups {
            let reads: Vec<(&[u8], [&[u8]; 2])> = keys
                .iter()
                .map(|(k, _)| (&k[..], [&b"GET"[..], &k[..]]))
                .collect();
            let reads: Vec<(&[u8], &[&[u8]])> = reads.iter().map(|(k, r)| (*k, &r[..])).collect();
            let req = crate::cache::fill_request_many(db, up.url.db, &reads);
            let shared = self.shared.clone();
            let base = up.url.db;
            // Not sent: as a GET's fill, its waiters get the error, and this
            // MGET reads from Redis itself.
            ok &= send_fill(up.tracking_at(slot), req, move |r| {
                finish_fills(&shared, &keys, (db, base), r)
            });
        }
        ok.then_some(fills)
    }

    /// Queues the reply slot of an MGET whose missing keys are being
    /// filled: a task gathers their GET replies into the slots (a key that
    /// is no string reads as nil, as MGET has it) and answers the slot.
    async fn wait_mget(
        &mut self,
        slots: Vec<Option<Bytes>>,
        fills: Vec<(usize, crate::cache::FillRx)>,
        keys: Vec<Bytes>,
    ) {
        let (tx, rx) = oneshot::channel();
        let out = self.out.clone();
        let resp3 = self.resp3;
        tokio::spawn(async move {
            let mut slots = slots;
            let mut failed = None;
            for (i, fill) in fills {
                match fill.await.unwrap_or(Err(UpError::Lost)) {
                    Ok(r) => {
                        // Counted against the output cap by the fill; the
                        // merged reply is counted below instead.
                        out.sub(r.data.len());
                        let v = match r.data.first() {
                            Some(b'$' | b'_') => r.data,
                            // MGET's answer for a key of another type.
                            _ if r.data.starts_with(b"-WRONGTYPE") => {
                                Bytes::from_static(crate::cache::NIL)
                            }
                            // The read failed (LOADING, NOPERM, ...): so
                            // does the MGET, with that error.
                            _ => {
                                failed.get_or_insert(Ok(r.data));
                                continue;
                            }
                        };
                        slots[i] = Some(crate::cache::for_client(v, resp3));
                    }
                    Err(e) => {
                        failed.get_or_insert(Err(e));
                    }
                }
            }
            let r = match failed {
                Some(Err(e)) => Err(e),
                Some(Ok(error)) => Ok(crate::upstream::Reply {
                    errors: 1,
                    data: error,
                }),
                None => {
                    let mut b = BytesMut::new();
                    resp::array_header(&mut b, slots.len());
                    for f in slots.iter().flatten() {
                        b.extend_from_slice(f);
                    }
                    Ok(crate::upstream::Reply {
                        errors: 0,
                        data: b.freeze(),
                    })
                }
            };
            if let Ok(reply) = &r {
                out.add(reply.data.len());
            }
            if let Err(Ok(reply)) = tx.send(r) {
                out.sub(reply.data.len());
            }
        });
        self.queue_fill_keys(keys);
        self.push(Out::Up {
            rx,
            count: 1,
            ids: vec![MGET_ID.unwrap_or(0) as u16],
            start: Instant::now(),
            post: Post::Waited {
                resp3: self.resp3,
                ai: None,
            },
            writes: false,
        })
        .await
    }

    fn queue_fill_keys(&mut self, keys: Vec<Bytes>) {
        for k in &keys {
            *self.fill_key_count.entry(k.clone()).or_default() += 1;
        }
        self.fill_keys.push_back(keys);
    }

    /// Queues the reply slot of a GET answered by a fill.
    async fn wait_fill(&mut self, rx: crate::cache::FillRx, key: Bytes) {
        self.wait_fill_as(rx, GET_ID.unwrap_or(0), None, key).await
    }

    /// `wait_fill` for command `id` (GET, or AI.GET with its outcome to count).
    async fn wait_fill_as(
        &mut self,
        rx: crate::cache::FillRx,
        id: usize,
        ai: Option<AiPost>,
        key: Bytes,
    ) {
        self.queue_fill_keys(vec![key]);
        self.push(Out::Up {
            rx,
            count: 1,
            ids: vec![id as u16],
            start: Instant::now(),
            post: Post::Waited {
                resp3: self.resp3,
                ai,
            },
            writes: false,
        })
        .await
    }

    /// Whether this client's reads may use L1: not while a write of its own
    /// is in flight (or batched), nor on a pinned connection that holds
    /// more state than its db (a transaction, other credentials, ...).
    fn l1_usable(&self) -> bool {
        !self.run_writes && self.writes_in_flight == 0 && self.l1_db().is_some()
    }

    /// The db this client's reads are of, when L1 may know it.
    fn l1_db(&self) -> Option<u32> {
        match &self.pinned {
            None => Some(self.db),
            Some(_) if self.pin_select_only && self.sel_pending == 0 => Some(self.sel_db),
            Some(_) => None,
        }
    }

    /// AI.GET from L1, as GET is served (hit, fill, or wait for a fill).
    /// False when L1 cannot answer it: the caller reads the key itself.
    async fn ai_get_from_l1(&mut self, idx: usize, key: &str, post: &AiPost) -> bool {
        let (true, Some(db)) = (self.l1_usable(), self.l1_db()) else {
            return false;
        };
        let Some(l1) = self.shared.l1.clone().filter(|l| l.is_valid()) else {
            return false;
        };
        let key = Bytes::copy_from_slice(key.as_bytes());
        match l1.lookup(db, &key, &self.out, None) {
            Lookup::Hit(frame) => {
                let frame = crate::cache::for_client(frame, self.resp3);
                post.record(&frame, &self.shared.metrics.ai);
                self.shared
                    .metrics
                    .command(idx, false, Some(Duration::ZERO));
                self.reply(frame).await;
                true
            }
            Lookup::Fill(token, rx) => {
                if !self.start_fill(db, key.clone(), token) {
                    return false;
                }
                self.wait_fill_as(rx, idx, Some(post.clone()), key).await;
                true
            }
            Lookup::Wait(rx) => {
                self.wait_fill_as(rx, idx, Some(post.clone()), key).await;
                true
            }
            Lookup::Copied(_) | Lookup::Bypass => false,
        }
    }

    /// Sends raw commands upstream and queues their reply slot.
    async fn forward(&mut self, data: Bytes, ids: Vec<u16>, post: Post) {
        self.forward_extra(data, 0, ids, post).await
    }

    /// `forward` for data that ends with `extra` commands of the proxy's
    /// own: Redis sends replies for them too, but the client is owed (and,
    /// on failure, sees errors for) its own commands only.
    async fn forward_extra(&mut self, data: Bytes, extra: u32, ids: Vec<u16>, post: Post) {
        let count = ids.len() as u32;
        let sent = self
            .target()
            .await
            .and_then(|c| c.send(data, count + extra, Some(self.out.clone())));
        match sent {
            Ok(rx) => {
                let writes = ids.iter().any(|&i| writes(i as usize));
                self.writes_in_flight += writes as usize;
                self.push(Out::Up {
                    rx,
                    count,
                    ids,
                    start: Instant::now(),
                    post,
                    writes,
                })
                .await
            }
            Err(err) => {
                for id in &ids {
                    self.shared.metrics.command(*id as usize, true, None);
                }
                if self.pinned.is_some() {
                    // The connection that held this client's state is gone;
                    // carrying on elsewhere would silently change semantics.
                    self.quit = true;
                }
                self.push(Out::Failed { err, count }).await
            }
        }
    }

    async fn dispatch(
        &mut self,
        class: Class,
        id: Option<usize>,
        args: &[Bytes],
        raw: Bytes,
    ) -> Flow {
        let idx = id.unwrap_or(command::count());
        let ids = vec![idx as u16];
        match id.map(command::name) {
            Some("MULTI") => self.in_multi = true,
            Some("EXEC") | Some("DISCARD") => self.in_multi = false,
            _ => {}
        }
        if let Backend::Local(store) = &self.shared.backend
            && !matches!(class, Class::Local(_))
        {
            let store = store.clone();
            let mut out = BytesMut::new();
            let name = args[0].to_ascii_uppercase();
            if crate::local::LocalStore::supports(&name) {
                store.execute(self.db as usize, args, self.resp3, &mut out);
            } else {
                resp::error(
                    &mut out,
                    &format!(
                        "ERR '{}' is not available: respite is running in local fallback mode without Redis",
                        String::from_utf8_lossy(&args[0]).to_lowercase()
                    ),
                );
            }
            self.answer(idx, out.freeze()).await;
            return Flow::Continue;
        }
        // Commands the proxy answers itself never reach a MULTI queue.
        let queued = self.tx_queue.multi
            && !matches!(
                class,
                Class::Local(Local::Proxy | Local::Ai | Local::Quit | Local::Reset)
            );
        if (queued || self.compressing(id))
            && self.compress_hook(cz::kind(id), idx, args, &raw).await
        {
            return Flow::Continue;
        }
        match class {
            Class::Pass => self.forward(raw, ids, Post::None).await,
            Class::Pin => {
                if self.pin().await {
                    self.forward(raw, ids, Post::None).await;
                }
            }
            Class::Tunnel => {
                self.wait_drained().await;
                return Flow::Tunnel {
                    first: raw,
                    rest: BytesMut::new(),
                    replication: matches!(id.map(command::name), Some("SYNC" | "PSYNC")),
                };
            }
            Class::Local(l) => return self.local(l, idx, args, raw).await,
        }
        Flow::Continue
    }

    /// Moves the session onto a dedicated upstream connection. Returns false
    /// (after queueing an error reply) when none can be opened.
    async fn pin(&mut self) -> bool {
        self.pin_with(self.resp3).await
    }

    /// `pin` with the protocol the new connection opens in. AUTH and HELLO
    /// pin with `false` (no HELLO of the proxy's): on a server that has
    /// required a password since this client connected, the proxy's HELLO 3
    /// would be refused with NOAUTH before the client's own credentials
    /// could reach Redis.
    async fn pin_with(&mut self, resp3: bool) -> bool {
        // Whatever pins (or is sent on) the connection now may change more
        // than its db: L1 is done with this client while it stays pinned
        // (a SELECT sets this back when it alone pinned).
        self.pin_select_only = false;
        if self.pinned.is_some() {
            return true;
        }
        self.sel_db = self.db;
        let Backend::Upstream(up) = &self.shared.backend else {
            return false;
        };
        let up = up.clone();
        self.wait_drained().await;
        match up.dedicated_detachable(resp3).await {
            Ok(pair) => {
                self.pinned = Some(pair);
                self.entry.pinned.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.shared.metrics.error(e.kind());
                self.push(Out::Failed { err: e, count: 1 }).await;
                false
            }
        }
    }

    async fn local(&mut self, l: Local, idx: usize, args: &[Bytes], raw: Bytes) -> Flow {
        let mut out = BytesMut::new();
        match l {
            Local::Quit => {
                resp::simple(&mut out, "OK");
                self.quit = true;
            }
            Local::Hello => {
                if self.pinned.is_some() && !self.is_local() {
                    // It may log in as another user (whose ACL L1 must not
                    // bypass): as for anything else on a pinned connection.
                    self.pin_select_only = false;
                    if let Some(v) = args.get(1).and_then(|a| resp::parse_int(a))
                        && (v == 2 || v == 3)
                    {
                        self.resp3 = v == 3;
                    }
                    // Proxy credentials (checked by the gate) never go upstream.
                    let raw = match args.iter().position(|a| a.eq_ignore_ascii_case(b"AUTH")) {
                        Some(at) if self.shared.auth.enabled() && at >= 2 => {
                            let kept: Vec<&Bytes> = args[..at]
                                .iter()
                                .chain(args.get(at + 3..).unwrap_or_default())
                                .collect();
                            let mut b = BytesMut::new();
                            resp::encode_command(&kept, &mut b);
                            b.freeze()
                        }
                        _ => raw,
                    };
                    self.forward(raw, vec![idx as u16], Post::None).await;
                    return Flow::Continue;
                }
                match self.hello(args, &mut out) {
                    HelloOutcome::Done => {}
                    HelloOutcome::SetName(name) => {
                        // The client sees the local HELLO reply in place of
                        // SETNAME's +OK.
                        if self.pin().await {
                            let mut b = BytesMut::new();
                            resp::encode_command(&[&b"CLIENT"[..], b"SETNAME", &name], &mut b);
                            let post = Post::Replace(out.freeze());
                            self.forward(b.freeze(), vec![idx as u16], post).await;
                        }
                        return Flow::Continue;
                    }
                    HelloOutcome::NeedsUpstream => {
                        // The client's HELLO sets the protocol itself.
                        if self.pin_with(false).await {
                            if let Some(v) = args.get(1).and_then(|a| resp::parse_int(a)) {
                                self.resp3 = v == 3;
                            }
                            self.forward(raw, vec![idx as u16], Post::None).await;
                        }
                        return Flow::Continue;
                    }
                }
            }
            Local::Select => {
                let want = args.get(1).and_then(|a| resp::parse_int(a));
                if args.len() != 2 {
                    resp::error(
                        &mut out,
                        "ERR wrong number of arguments for 'select' command",
                    );
                } else if self.is_local() {
                    match want {
                        Some(n) if (0..16).contains(&n) => {
                            self.db = n as u32;
                            resp::simple(&mut out, "OK");
                        }
                        Some(_) => resp::error(&mut out, "ERR DB index is out of range"),
                        None => {
                            resp::error(&mut out, "ERR value is not an integer or out of range")
                        }
                    }
                } else if self.pinned.is_none() && want == Some(self.db as i64) {
                    resp::simple(&mut out, "OK");
                } else {
                    let select_only =
                        (self.pinned.is_none() || self.pin_select_only) && !self.in_multi;
                    if self.pin().await {
                        self.pin_select_only = select_only;
                        let post = match want.and_then(|n| u32::try_from(n).ok()) {
                            Some(n) if select_only => {
                                self.sel_pending += 1;
                                Post::Select(n)
                            }
                            _ => Post::None,
                        };
                        self.forward(raw, vec![idx as u16], post).await;
                    }
                    return Flow::Continue;
                }
            }
            Local::Auth => {
                if self.is_local() {
                    resp::error(
                        &mut out,
                        "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                    );
                } else {
                    // A RESP3 client's new connection opens in RESP2 (see
                    // pin_with); HELLO 3 follows its AUTH, hidden from it.
                    // Not inside MULTI, where HELLO is refused and would
                    // doom the transaction. When the AUTH fails on a server
                    // that wants a password, so does the HELLO: the client
                    // is answered -NOAUTH (same bytes in both protocols)
                    // until an AUTH succeeds and the HELLO after it with it.
                    let hello = self.resp3 && !self.in_multi;
                    if self.pin_with(false).await {
                        if hello {
                            let mut b = BytesMut::from(&raw[..]);
                            resp::encode_command(&[&b"HELLO"[..], b"3"], &mut b);
                            self.forward_extra(b.freeze(), 1, vec![idx as u16], Post::First)
                                .await;
                        } else {
                            self.forward(raw, vec![idx as u16], Post::None).await;
                        }
                    }
                    return Flow::Continue;
                }
            }
            Local::Reset => {
                self.in_multi = false;
                if let Some((c, _)) = self.pinned.take() {
                    self.wait_drained().await;
                    c.close();
                    self.entry.pinned.store(false, Ordering::Relaxed);
                }
                self.tx_queue = cz::Tx::default();
                self.resp3 = false;
                self.conn = None;
                self.db = match &self.shared.backend {
                    Backend::Upstream(u) => u.url.db,
                    Backend::Local(_) => 0,
                };
                resp::simple(&mut out, "RESET");
            }
            Local::Info => {
                if !self.is_local() {
                    let post = if crate::admin::info_wants_proxy(&args[1..]) {
                        Post::Info
                    } else {
                        Post::None
                    };
                    self.forward(raw, vec![idx as u16], post).await;
                    return Flow::Continue;
                }
                let mut text = String::from("# Server\r\nredis_version:respite-local\r\n\r\n");
                text.push_str(&crate::admin::proxy_info(&self.shared));
                resp::verbatim_txt(&mut out, text.as_bytes(), self.resp3);
            }
            Local::Proxy => {
                crate::admin::proxy_command(&self.shared, args, self.resp3, &mut out);
            }
            Local::GetName => {
                if self.pinned.is_some() {
                    self.forward(raw, vec![idx as u16], Post::None).await;
                    return Flow::Continue;
                }
                // A client that never set a name has none (SETNAME pins).
                resp::null(&mut out, self.resp3);
            }
            Local::Ai => {
                let _ = raw;
                self.ai(idx, args).await;
                return Flow::Continue;
            }
        }
        self.answer(idx, out.freeze()).await;
        Flow::Continue
    }

    /// Runs a command the proxy built itself, through the same path as a
    /// client's command (so it sees the same connection, db and limits).
    async fn internal(&mut self, idx: usize, args: &[&[u8]], post: Post) {
        if let Backend::Local(store) = &self.shared.backend {
            let owned: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
            let mut out = BytesMut::new();
            store.execute(self.db as usize, &owned, self.resp3, &mut out);
            if let Post::Ai(p) = &post {
                p.record(&out, &self.shared.metrics.ai);
            }
            self.answer(idx, out.freeze()).await;
            return;
        }
        if self.tx_queue.multi {
            // Inside MULTI Redis queues it like any command: EXEC's reply
            // has an element for it, which the decode list must count
            // (and decode, for a GET).
            self.tx_queue.queued.push(if args[0] == b"GET" {
                cz::Decode::Bulk
            } else {
                cz::Decode::None
            });
        }
        let mut b = BytesMut::new();
        resp::encode_command(args, &mut b);
        self.forward(b.freeze(), vec![idx as u16], post).await;
    }

    /// One command and its reply, awaited here (for multi-step operations).
    async fn roundtrip(&mut self, args: &[&[u8]]) -> Result<Bytes, String> {
        if let Backend::Local(store) = &self.shared.backend {
            let owned: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
            let mut out = BytesMut::new();
            store.execute(self.db as usize, &owned, self.resp3, &mut out);
            return Ok(out.freeze());
        }
        let mut b = BytesMut::new();
        resp::encode_command(args, &mut b);
        let conn = self.target().await.map_err(|e| e.to_string())?;
        let rx = conn.send(b.freeze(), 1, None).map_err(|e| e.to_string())?;
        match rx.await {
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(UpError::Lost.to_string()),
        }
    }

    /// `AI.*`: keys in the AI response cache format, TTLs per operation.
    async fn ai(&mut self, idx: usize, args: &[Bytes]) {
        let cfg = self.shared.config();
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let metrics = self.shared.metrics.clone();
        let stats = &metrics.ai;
        let cmd = match ai::parse(&name, &args[1..], cfg.ai.text_hash_threshold) {
            Ok(c) => c,
            Err(e) => {
                self.shared.metrics.command(idx, true, None);
                self.reply(resp::error_bytes(&format!("ERR {e}"))).await;
                return;
            }
        };
        let mut out = BytesMut::new();
        match cmd {
            AiCommand::Key(req) => {
                stats.record_keygen(req.keygen);
                resp::bulk(&mut out, req.key.as_bytes());
            }
            AiCommand::Get(req) => {
                stats.record_keygen(req.keygen);
                let tier = ai::tier(req.text_chars, &cfg.ai.tiers);
                let post = AiPost::Get {
                    op: req.operation.clone(),
                    tier,
                };
                if !self.is_local() && self.ai_get_from_l1(idx, &req.key, &post).await {
                    return;
                }
                self.internal(idx, &[b"GET", req.key.as_bytes()], Post::Ai(post))
                    .await;
                return;
            }
            AiCommand::Set { req, mut value, ex } => {
                stats.record_keygen(req.keygen);
                // Answers are the large values compression is for: stored
                // as SET stores them (AI.GET and GET decode either way).
                if self.shared.rt.compression.load(Ordering::Relaxed) && !self.is_local() {
                    let policy = cz::Policy::of(&cfg.compression);
                    if let Some(stored) =
                        policy.encode(req.key.as_bytes(), &value, &metrics.compression)
                    {
                        value = stored;
                    }
                }
                let ttl = ex
                    .unwrap_or_else(|| cfg.ai.ttl_for(&req.operation))
                    .to_string();
                if let Some(l1) = &self.shared.l1 {
                    l1.invalidate(req.key.as_bytes());
                }
                let post = Post::Ai(AiPost::Set {
                    op: req.operation.clone(),
                });
                self.internal(
                    idx,
                    &[b"SET", req.key.as_bytes(), &value, b"EX", ttl.as_bytes()],
                    post,
                )
                .await;
                return;
            }
            AiCommand::Del(req) => {
                stats.record_keygen(req.keygen);
                if let Some(l1) = &self.shared.l1 {
                    l1.invalidate(req.key.as_bytes());
                }
                self.internal(idx, &[b"UNLINK", req.key.as_bytes()], Post::Ai(AiPost::Del))
                    .await;
                return;
            }
            AiCommand::Invalidate(_) if self.in_multi => {
                // It SCANs and UNLINKs in rounds: nothing a queue can hold.
                resp::error(&mut out, "ERR AI.INVALIDATE is not allowed inside MULTI");
            }
            AiCommand::Invalidate(op) => match self.ai_invalidate(op.as_deref()).await {
                Ok(n) => {
                    stats.record_invalidation(n);
                    resp::int(&mut out, n as i64);
                }
                Err(e) => resp::error(&mut out, &e),
            },
            AiCommand::Stats => {
                let pairs = stats.render();
                resp::map_header(&mut out, pairs.len(), self.resp3);
                for (k, v) in pairs {
                    resp::bulk(&mut out, k.as_bytes());
                    resp::bulk(&mut out, v.as_bytes());
                }
            }
        }
        self.answer(idx, out.freeze()).await;
    }

    /// Removes every key of one operation (or all AI keys) with SCAN and
    /// UNLINK in batches: never KEYS, so Redis is not blocked on a large db.
    async fn ai_invalidate(&mut self, op: Option<&str>) -> Result<u64, String> {
        // Earlier commands of this client must have run first.
        self.wait_drained().await;
        let pattern = ai::invalidate_pattern(op);
        let mut cursor = b"0".to_vec();
        let mut removed = 0u64;
        loop {
            let reply = self
                .roundtrip(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    b"1000",
                ])
                .await?;
            let v =
                redis::parse_redis_value(&reply).map_err(|e| format!("ERR bad SCAN reply: {e}"))?;
            let (next, keys): (Vec<u8>, Vec<Vec<u8>>) = match redis::from_redis_value(v) {
                Ok(x) => x,
                Err(e) => return Err(format!("ERR SCAN failed: {e}")),
            };
            if !keys.is_empty() {
                // As for any write through respite: L1 forgets the keys
                // before Redis does, so this client reads its own deletes.
                if let Some(l1) = &self.shared.l1 {
                    for k in &keys {
                        l1.invalidate(k);
                    }
                }
                let mut args: Vec<&[u8]> = vec![b"UNLINK"];
                args.extend(keys.iter().map(|k| k.as_slice()));
                let r = self.roundtrip(&args).await?;
                match redis::parse_redis_value(&r) {
                    Ok(redis::Value::Int(n)) => removed += n.max(0) as u64,
                    _ => {
                        return Err(format!(
                            "ERR UNLINK failed: {}",
                            String::from_utf8_lossy(&r).trim_end()
                        ));
                    }
                }
            }
            if next == b"0" {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]` on a shared session.
    fn hello(&mut self, args: &[Bytes], out: &mut BytesMut) -> HelloOutcome {
        let mut proto = if self.resp3 { 3 } else { 2 };
        if let Some(v) = args.get(1) {
            match resp::parse_int(v) {
                Some(2) => proto = 2,
                Some(3) => proto = 3,
                Some(_) => {
                    resp::error(out, "NOPROTO unsupported protocol version");
                    return HelloOutcome::Done;
                }
                None => {
                    resp::error(
                        out,
                        "ERR Protocol version is not an integer or out of range",
                    );
                    return HelloOutcome::Done;
                }
            }
        }
        let mut i = 2;
        let mut name = None;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            let more = args.len() - i - 1;
            if opt == b"AUTH" && more >= 2 && self.shared.auth.enabled() {
                // Proxy users: the gate has authenticated this already;
                // proxy credentials never go upstream.
                i += 3;
                continue;
            } else if opt == b"SETNAME" && more >= 1 && self.shared.auth.enabled() {
                // The HELLO carries proxy credentials, so the name goes up
                // as CLIENT SETNAME; checked here because HELLO must fail
                // whole, as in Redis, when the name is refused.
                if args[i + 1].iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
                    resp::error(
                        out,
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                    return HelloOutcome::Done;
                }
                name = Some(args[i + 1].clone());
                i += 2;
                continue;
            } else if opt == b"AUTH" && more >= 2 {
                if self.is_local() {
                    resp::error(
                        out,
                        "WRONGPASS invalid username-password pair or user is disabled.",
                    );
                    return HelloOutcome::Done;
                }
                return HelloOutcome::NeedsUpstream;
            } else if opt == b"SETNAME" && more >= 1 {
                if self.is_local() {
                    i += 2;
                    continue;
                }
                return HelloOutcome::NeedsUpstream;
            } else {
                resp::error(
                    out,
                    &format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    ),
                );
                return HelloOutcome::Done;
            }
        }
        self.resp3 = proto == 3;
        self.conn = None;
        let version = match &self.shared.backend {
            Backend::Upstream(u) => u.health.version.lock().unwrap().clone(),
            Backend::Local(_) => "7.0.0".to_string(),
        };
        resp::map_header(out, 7, self.resp3);
        resp::bulk(out, b"server");
        resp::bulk(out, b"redis");
        resp::bulk(out, b"version");
        resp::bulk(out, version.as_bytes());
        resp::bulk(out, b"proto");
        resp::int(out, proto);
        resp::bulk(out, b"id");
        resp::int(out, self.id as i64);
        resp::bulk(out, b"mode");
        resp::bulk(out, b"standalone");
        resp::bulk(out, b"role");
        resp::bulk(out, b"master");
        resp::bulk(out, b"modules");
        resp::array_header(out, 0);
        match name {
            Some(n) if !self.is_local() => HelloOutcome::SetName(n),
            _ => HelloOutcome::Done,
        }
    }

    /// The rest of the session's life on a dedicated upstream connection
    /// (src/tunnel.rs).
    async fn tunnel<R: AsyncRead + Unpin>(
        mut self,
        crd: R,
        first: Bytes,
        rest: BytesMut,
        replication: bool,
    ) {
        self.wait_drained().await;
        let mut cwr = self.wr;
        let up = match self.pinned.take() {
            Some((_, detach)) => detach.detach().await.map_err(|e| e.to_string()),
            None => match &self.shared.backend {
                Backend::Upstream(u) => u
                    .dedicated_stream(self.resp3)
                    .await
                    .map_err(|e| e.to_string()),
                Backend::Local(_) => Err("subscriptions are not available in local mode".into()),
            },
        };
        let mut up = match up {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("TRYAGAIN upstream unavailable ({e})");
                let _ = cwr.write_all(&resp::error_bytes(&msg)).await;
                return;
            }
        };
        self.entry.pinned.store(true, Ordering::Relaxed);
        if up.w.write_all(&first).await.is_err() {
            return;
        }
        crate::tunnel::run(
            &self.shared,
            &mut self.auth,
            (crd, cwr),
            (up.r, up.w),
            rest,
            replication,
        )
        .await;
    }
}

/// The first RESP frame of `data` (all of it when it cannot be cut).
fn first_frame(data: Bytes) -> Bytes {
    match resp::FrameScanner::new().next_frame(&data) {
        Ok(Some(end)) => data.slice(..end),
        _ => data,
    }
}

/// Merges L1 hits with the upstream reply for the missed keys, in order.
fn merge_mget(slots: Vec<Option<Bytes>>, data: Bytes) -> Bytes {
    if data.first() != Some(&b'*') {
        return data;
    }
    let Some(hdr) = data.iter().position(|&b| b == b'\n') else {
        return data;
    };
    let mut pos = hdr + 1;
    let mut sc = resp::FrameScanner::new();
    let mut out = BytesMut::with_capacity(data.len() + 64 * slots.len());
    resp::array_header(&mut out, slots.len());
    for slot in slots {
        match slot {
            Some(f) => out.extend_from_slice(&f),
            None => match sc.next_frame(&data[pos..]) {
                Ok(Some(end)) => {
                    out.extend_from_slice(&data[pos..pos + end]);
                    pos += end;
                    sc.reset();
                }
                _ => return resp::error_bytes("ERR respite: short MGET reply from upstream"),
            },
        }
    }
    out.freeze()
}

/// Installs a fill and returns the GET reply as this client must see it.
/// Installs a fill's value (if still valid) and answers its waiters.
fn finish_fill(
    shared: &Shared,
    key: &Bytes,
    token: u64,
    selected: bool,
    r: Result<crate::upstream::Reply, UpError>,
) {
    let Some(l1) = shared.l1.as_ref() else {
        return;
    };
    match r {
        Ok(reply) => {
            let parsed = crate::cache::split_fill_reply(&reply.data, selected);
            finish_parsed_fill(shared, l1, key, token, parsed);
        }
        Err(e) => {
            l1.complete(key, token, None, -2, Err(e));
        }
    }
}

/// Sends a fill transaction (`req`: bytes and replies to expect) on a
/// tracking connection and hands its outcome to `done`, on a task of its
/// own; a connection that is missing or refuses it is handed to `done` at
/// once as the error. Whether it was sent.
fn send_fill(
    conn: Option<Conn>,
    (req, replies): (Bytes, u32),
    done: impl FnOnce(Result<crate::upstream::Reply, UpError>) + Send + 'static,
) -> bool {
    let sent = match conn {
        Some(conn) => conn.send(req, replies, None),
        None => Err(UpError::Unavailable(
            "L1 tracking connection missing".into(),
        )),
    };
    match sent {
        Ok(rx) => {
            tokio::spawn(async move { done(rx.await.unwrap_or(Err(UpError::Lost))) });
            true
        }
        Err(e) => {
            done(Err(e));
            false
        }
    }
}

/// Completes the fills of several keys read in one transaction (an
/// MGET's misses on one tracking connection).
fn finish_fills(
    shared: &Arc<Shared>,
    fills: &[(Bytes, u64)],
    (db, base): (u32, u32),
    r: Result<crate::upstream::Reply, UpError>,
) {
    let Some(l1) = shared.l1.as_ref() else {
        return;
    };
    let selected = db != base;
    let parsed =
        r.map(|reply| crate::cache::split_fill_replies(&reply.data, selected, fills.len()));
    match parsed {
        Ok(Ok(v)) => {
            for ((key, token), read) in fills.iter().zip(v) {
                finish_parsed_fill(shared, l1, key, *token, Ok(read));
            }
        }
        // The transaction failed as a whole (one key the upstream user may
        // not read makes EXEC abort): that is no answer for the other keys,
        // nor for the GETs coalesced on them. Each is read again alone.
        Ok(Err(_)) if fills.len() > 1 => {
            let Backend::Upstream(up) = &shared.backend else {
                return;
            };
            for (key, token) in fills {
                let req = crate::cache::fill_request(db, base, key, &[b"GET", key]);
                let (shared, key, token) = (shared.clone(), key.clone(), *token);
                send_fill(up.tracking(&key), req, move |r| {
                    finish_fill(&shared, &key, token, selected, r)
                });
            }
        }
        Ok(Err(frame)) => {
            for (key, token) in fills {
                finish_parsed_fill(shared, l1, key, *token, Err(frame.clone()));
            }
        }
        Err(e) => {
            for (key, token) in fills {
                l1.complete(key, *token, None, -2, Err(e.clone()));
            }
        }
    }
}

/// Completes one key's fill from its PTTL and GET reply (or the failed
/// transaction's error frame).
fn finish_parsed_fill(
    shared: &Shared,
    l1: &L1,
    key: &Bytes,
    token: u64,
    parsed: Result<(i64, Bytes), Bytes>,
) {
    let (pttl, frame, read) = match parsed {
        Ok((pttl, frame)) => (pttl, decode_fill(shared, cz::Decode::Bulk, frame), true),
        Err(frame) => (-2, frame, false),
    };
    // A value, or the nil of a missing key (see `L1::install`); not errors,
    // nor a failed transaction (a RESP3 null EXEC is also `_`).
    let value = read
        && ((frame.first() == Some(&b'$') && !frame.starts_with(b"$-1"))
            || frame[..] == crate::cache::NIL[..]);
    let outcome = Ok(crate::upstream::Reply {
        errors: (frame.first() == Some(&b'-')) as u64,
        data: frame.clone(),
    });
    l1.complete(key, token, value.then_some(&frame), pttl, outcome);
}

/// A fill's reply as L1 holds it: decoded, as clients see it. Measured
/// (release, this 2-core box, 64 KiB JSON-like value, 17.6 KB frame): a
/// decode takes ~20 us, a hit on a decoded entry is a Bytes clone (~24 ns).
/// Holding frames would make every hit pay the decode (and a corrupt frame
/// would fail on each hit) to fit ~3.7x more large entries in
/// l1.max_bytes; hits are the point of L1, so it holds decoded values, and
/// l1.max_bytes bounds what it holds.
fn decode_fill(shared: &Shared, d: cz::Decode, frame: Bytes) -> Bytes {
    if !shared.rt.compression.load(Ordering::Relaxed) {
        return frame;
    }
    let codec = shared.config().compression.codec();
    cz::decode_reply(&d, frame, &codec, &shared.metrics.compression)
}

/// Completes a hash fill: installs what is still valid and answers its
/// waiters.
fn finish_hash_fill(
    shared: &Shared,
    key: &Bytes,
    token: u64,
    read: &HashRead,
    selected: bool,
    r: Result<crate::upstream::Reply, UpError>,
) {
    let Some(l1) = shared.l1.as_ref() else {
        return;
    };
    let outcome = r.map(
        |reply| match crate::cache::split_fill_reply(&reply.data, selected) {
            Ok((pttl, frame)) => {
                let d = match read {
                    HashRead::All => cz::Decode::Pairs,
                    _ => cz::Decode::Array,
                };
                (decode_fill(shared, d, frame), pttl)
            }
            // A failed transaction: its error is the reply, nothing installs.
            Err(frame) => (frame, -2),
        },
    );
    l1.complete_hash(key, token, read, outcome);
}

/// The hash read L1 may answer for this request: HGET, HMGET or HGETALL
/// of the right arity (others go to Redis for its error).
fn hash_read(
    id: Option<usize>,
    chunk: &Bytes,
    start: usize,
    args: &[std::ops::Range<usize>],
) -> Option<HashRead> {
    let id = id?;
    let arg = |i: usize| chunk.slice(start + args[i].start..start + args[i].end);
    if Some(id) == *HGET_ID && args.len() == 3 {
        Some(HashRead::Field(arg(2)))
    } else if Some(id) == *HMGET_ID && args.len() >= 3 {
        Some(HashRead::Fields((2..args.len()).map(arg).collect()))
    } else if Some(id) == *HGETALL_ID && args.len() == 2 {
        Some(HashRead::All)
    } else {
        None
    }
}

/// Whether a command passing through invalidates L1 locally: any write,
/// and any command the table does not know that goes to Redis (it may be a
/// write of a newer Redis). The proxy's own commands (PROXY, AI.*) handle
/// their keys themselves.
pub(crate) fn invalidates(id: Option<usize>, class: Option<Class>) -> bool {
    match id {
        Some(id) => command::may_write(id),
        None => class == Some(Class::Pass),
    }
}

/// Local writes invalidate at once, before they are forwarded, so the
/// writer reads its own write and a fill already in flight is discarded.
pub(crate) fn invalidate_writes<A: command::Args + ?Sized>(l1: &L1, args: &A, id: Option<usize>) {
    match id.map(command::name) {
        // SWAPDB replaces every key of the db L1 serves, and Redis sends
        // tracking clients nothing for it (checked against 7.0).
        Some("FLUSHALL") | Some("FLUSHDB") | Some("SWAPDB") => l1.flush(),
        // A command newer than the table (HGETDEL, HSETEX, ... of later
        // Redis versions): its keys are unknown, so every argument is taken
        // for one. Forgetting a few values too many costs a read each.
        None => {
            for i in 1..args.count() {
                if let Some(k) = args.arg(i) {
                    l1.invalidate(k);
                }
            }
        }
        _ => {
            for i in command::key_positions(args, id) {
                if let Some(k) = args.arg(i) {
                    l1.invalidate(k);
                }
            }
        }
    }
}

/// Missing keys of one MGET that are filled; an MGET missing more reads
/// them from Redis as it is.
const MGET_FILL_MAX: usize = 256;

static MGET_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("MGET"));
static GET_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("GET"));
static HGET_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("HGET"));
static HMGET_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("HMGET"));
static HGETALL_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("HGETALL"));
static SWAPDB_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("SWAPDB"));
static EXEC_ID: std::sync::LazyLock<Option<usize>> =
    std::sync::LazyLock::new(|| command::id_of("EXEC"));

enum HelloOutcome {
    Done,
    NeedsUpstream,
    /// Answered locally (proxy credentials), but the name goes upstream.
    SetName(Bytes),
}
