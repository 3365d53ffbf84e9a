//! respite: a Redis-protocol caching proxy.
//!
//! Module map (data path order):
//! - [`server`]: listener, shared state, start-up, reload, graceful drain.
//! - [`session`]: one client connection: parse, classify, dispatch, ordered replies.
//! - [`tunnel`]: a subscribed/monitoring session: raw frames, still gated.
//! - [`resp`]: request parser with limits, resumable reply-frame scanner, reply builders.
//! - [`command`]: the command table generated from Redis' `COMMAND` and classification.
//! - [`upstream`]: multiplexed, pipelined shared connections; dedicated connections.
//! - [`cache`], [`l1map`]: L1 coherence (fills, markers, invalidation) and its byte-bounded store.
//! - [`local`]: in-process store for a first run without Redis.
//! - [`auth`]: proxy users: AUTH, roles, key prefixes (the session's gate).
//! - [`tls`]: TLS termination for clients and TLS to the upstream (rustls, ring).
//! - [`admin`]: `PROXY ...` commands and the INFO section.
//! - [`config`], [`metrics`], [`logging`]: configuration, Prometheus metrics, logs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ai;
pub mod auth;
pub mod cache;
pub mod check;
pub mod command;
pub mod compress;
pub mod compress_cmd;
pub mod config;
pub mod l1map;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod resp;
pub mod server;
pub mod session;
pub mod tls;
pub mod tunnel;
pub mod upstream;
