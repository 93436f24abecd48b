//! # nx-rpc — the one Cap'n Proto RPC transport of nexus
//!
//! Guest daemons (`rebootd`, `bootctld`) serve their capability with [`bind`] +
//! [`Listeners::serve`] on unix sockets and on virtio-serial ports (found by name with
//! [`nx_guest::port`]); every caller — guest programs and `nx` on the host — reaches them
//! through this crate:
//!
//! * [`call_unix`]: raw two-party RPC over a guest-local unix socket;
//! * [`call_framed`]: framed RPC (`proto::rpc::link`, one session id per connection) over any
//!   byte link (the host's chardev socket, a serial line);
//! * [`reboot`] and [`bootctl`]: the typed clients of the two services.
//!
//! [`connection`] is the only place in the workspace that sets up a Cap'n Proto connection,
//! and [`TRAVERSAL_LIMIT_WORDS`] the only bound for an incoming message.
//!
//! Everything runs on a tokio current-thread runtime; serving needs a
//! [`tokio::task::LocalSet`] (capnp-rpc objects are `!Send`).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bootctl;
mod client;
#[cfg(test)]
mod framed_tests;
pub mod reboot;
#[cfg(any(feature = "cli", test))]
pub mod serve_args;
mod server;

pub use client::{
    call_framed, call_unix, retry_connect, rpc_error_text, FramedError, CONNECT_GRACE,
};
pub use server::{bind, serve_framed, Endpoint, Listeners, HOST_POLL, PORT_LOOKUP_POLL};

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::io::{AsyncRead, AsyncWrite};
use std::io;
use std::path::PathBuf;

/// Bound for one incoming RPC message (words of 8 bytes): 512 KiB. Our messages are a few
/// hundred bytes (a diag bundle is at most a few hundred KiB); the bound keeps a hostile peer
/// from making us allocate.
pub const TRAVERSAL_LIMIT_WORDS: usize = 64 * 1024;
/// Bound for the nesting of one incoming RPC message.
pub const NESTING_LIMIT: i32 = 32;

/// The receive options for every connection: bounded messages.
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    o
}

/// The one place a Cap'n Proto two-party connection is set up (server and client side):
/// bounded by [`reader_options`]. `bootstrap` is the capability a server offers.
pub fn connection<R, W>(
    read: R,
    write: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let network = twoparty::VatNetwork::new(read, write, side, reader_options());
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket could not be bound.
    #[error("could not listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The listen path exists and is not a socket: we do not delete files.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The server at a unix socket could not be reached.
    #[error("could not connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An RPC call failed or the peer went away.
    #[error("rpc to {path}: {source}")]
    Rpc {
        path: PathBuf,
        #[source]
        source: capnp::Error,
    },
    /// No answer in time.
    #[error("rpc to {path}: no answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
}
