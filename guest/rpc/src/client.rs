//! Calling a service: over a guest-local unix socket ([`call_unix`], raw two-party RPC) or
//! over a framed byte link ([`call_framed`], what `nx` uses on the host).

use crate::TransportError;
use capnp::capability::FromClientHook;
use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::future::Either;
use futures::io::BufReader;
use proto::rpc::link;
use std::future::Future;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// How long a guest-local call keeps retrying to *connect* while the daemon is starting (the
/// socket is not there yet, or bound but not listening yet: `ECONNREFUSED`). A failed connect
/// never reached the daemon, so retrying it is safe even for calls that are not idempotent.
pub const CONNECT_GRACE: Duration = Duration::from_secs(3);
/// Pause between connect attempts.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Connect to a unix socket, bootstrap a `C` client and run `call` with it,
/// driving the connection until the call completes (no `LocalSet` needed).
pub async fn call_unix<C, F, Fut, T>(
    path: &Path,
    timeout: Duration,
    call: F,
) -> Result<T, TransportError>
where
    C: FromClientHook,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| TransportError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (r, w) = stream.into_split();
    let mut rpc = crate::connection(
        BufReader::new(r.compat()),
        w.compat_write(),
        Side::Client,
        None,
    );
    let client: C = rpc.bootstrap(Side::Server);
    let call = Box::pin(call(client));
    let raced = futures::future::select(call, rpc);
    let out = match tokio::time::timeout(timeout, raced).await {
        Err(_) => {
            return Err(TransportError::Timeout {
                path: path.to_path_buf(),
                secs: timeout.as_secs(),
            })
        }
        Ok(Either::Left((result, _rpc))) => result,
        Ok(Either::Right((rpc_result, _call))) => Err(rpc_result.err().unwrap_or_else(|| {
            capnp::Error::disconnected("the server closed the connection".into())
        })),
    };
    out.map_err(|source| TransportError::Rpc {
        path: path.to_path_buf(),
        source,
    })
}

/// Run `attempt` again while it fails to connect (socket missing or refused), for up to
/// `grace`; any other result (success, an RPC error, a timeout) is returned at once.
pub async fn retry_connect<T, F, Fut>(grace: Duration, mut attempt: F) -> Result<T, TransportError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TransportError>>,
{
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match attempt().await {
            Err(TransportError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            other => return other,
        }
    }
}

/// How a framed call failed (the caller words the message: it knows the daemon and the port).
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    /// No answer within the timeout.
    #[error("no answer within {secs} s")]
    Timeout { secs: u64 },
    /// The call failed (the daemon refused, or the RPC connection broke).
    #[error("rpc: {0}")]
    Call(capnp::Error),
    /// The link or the RPC system ended before the call answered (why, when known).
    #[error("the connection closed before the answer{}", .0.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
    Closed(Option<String>),
}

/// The text of an RPC failure: the daemon's own reason when it refused.
pub fn rpc_error_text(e: &capnp::Error) -> String {
    match e.kind {
        capnp::ErrorKind::Failed => e
            .extra
            .strip_prefix("remote exception: ")
            .unwrap_or(&e.extra)
            .to_string(),
        _ => e.to_string(),
    }
}

/// Bootstrap a `C` over framed RPC on `link` (see `proto::rpc::link`: a virtio-serial port
/// has no connection boundaries, so each call is a session of its own with a random id and
/// stale bytes of an earlier one are dropped), run `call` with it; the whole conversation is
/// bounded by `timeout`.
///
/// Until the first frame of the answer arrives, every chunk sent is kept and sent again (same
/// session, same counters; the server drops what it already has) when the server resets the
/// session as not started, and after [`link::RETRANSMIT_FIRST`] (doubling) without an answer:
/// a swallowed opening costs a retransmission, not the whole timeout. A session the server
/// reset as lost fails at once ([`FramedError::Closed`]); it is not sent again, since its
/// request may have run.
pub async fn call_framed<L, C, F, Fut, T>(
    link: L,
    timeout: Duration,
    call: F,
) -> Result<T, FramedError>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    C: FromClientHook,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    let (link_r, link_w) = tokio::io::split(link);
    // The RPC system talks to one end of an in-memory pipe; two pumps carry its
    // bytes to and from the link in frames of this connection's session.
    let session = new_session_id();
    let (rpc_end, pump_end) = tokio::io::duplex(2 * link::MAX_CHUNK);
    let (rpc_r, rpc_w) = tokio::io::split(rpc_end);
    let (pump_r, pump_w) = tokio::io::split(pump_end);
    let mut rpc = crate::connection(
        BufReader::new(rpc_r.compat()),
        rpc_w.compat_write(),
        Side::Client,
        None,
    );
    let client: C = rpc.bootstrap(Side::Server);
    let opening = Opening::default();
    let driver = async {
        let rpc = Box::pin(async move { rpc.await.err().map(|e| rpc_error_text(&e)) });
        let out = Box::pin(pump_out(pump_r, link_w, session, &opening));
        let inn = Box::pin(pump_in(link_r, pump_w, session, &opening));
        match futures::future::select(rpc, futures::future::select(out, inn)).await {
            Either::Left((e, _)) => e,
            Either::Right((Either::Left((r, _)), _))
            | Either::Right((Either::Right((r, _)), _)) => r.err().map(|e| e.to_string()),
        }
    };
    let call = Box::pin(call(client));
    let outcome =
        tokio::time::timeout(timeout, futures::future::select(call, Box::pin(driver))).await;
    match outcome {
        Err(_) => Err(FramedError::Timeout {
            secs: timeout.as_secs(),
        }),
        Ok(Either::Left((Ok(v), _))) => Ok(v),
        Ok(Either::Left((Err(e), _))) => Err(FramedError::Call(e)),
        Ok(Either::Right((why, _))) => Err(FramedError::Closed(why)),
    }
}

/// The client's side of a session's opening: the frames sent before the first answer
/// (to send again), shared by the two pumps.
#[derive(Default)]
struct Opening {
    /// The frames sent so far; dropped once answered.
    sent: std::cell::RefCell<Vec<Vec<u8>>>,
    /// Whether a frame of the session came back (the server has its start).
    answered: std::cell::Cell<bool>,
    /// The server asked for the start again.
    resend: tokio::sync::Notify,
}

impl Opening {
    fn answered(&self) {
        if !self.answered.replace(true) {
            self.sent.borrow_mut().clear();
        }
    }

    /// The frames to send again (none once answered).
    fn to_resend(&self) -> Vec<u8> {
        if self.answered.get() {
            return Vec::new();
        }
        self.sent.borrow().concat()
    }
}

/// A random session id for one connection (see `proto::rpc::link`).
fn new_session_id() -> u32 {
    getrandom::u32().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        t ^ std::process::id().rotate_left(16)
    })
}

/// RPC bytes → framed chunks on the link; the opening is sent again when asked or when
/// no answer came in time.
async fn pump_out<R, W>(
    mut from_rpc: R,
    mut link_w: W,
    session: u32,
    opening: &Opening,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; link::MAX_CHUNK];
    let mut seq = 0u32;
    let mut wait = link::RETRANSMIT_FIRST;
    let mut retransmit_at = tokio::time::Instant::now() + wait;
    loop {
        let waiting = !opening.answered.get() && seq > 0;
        let again = tokio::select! {
            r = from_rpc.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                let mut frame = Vec::with_capacity(n + 32);
                link::encode(session, seq, &buf[..n], &mut frame)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                if seq == 0 {
                    retransmit_at = tokio::time::Instant::now() + wait;
                }
                seq = seq.wrapping_add(1);
                link_w.write_all(&frame).await?;
                link_w.flush().await?;
                if !opening.answered.get() {
                    opening.sent.borrow_mut().push(frame);
                }
                continue;
            }
            () = opening.resend.notified(), if waiting => opening.to_resend(),
            () = tokio::time::sleep_until(retransmit_at), if waiting => {
                wait = wait.saturating_mul(2);
                retransmit_at = tokio::time::Instant::now() + wait;
                opening.to_resend()
            }
        };
        if !again.is_empty() {
            link_w.write_all(&again).await?;
            link_w.flush().await?;
        }
    }
}

/// Framed chunks of our session on the link → RPC bytes; everything else
/// (stale replies of an earlier connection, noise) is dropped. A reset of our
/// session asks for its opening again, or ends the call (lost).
async fn pump_in<R, W>(
    mut link_r: R,
    mut to_rpc: W,
    session: u32,
    opening: &Opening,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut dec = link::LinkDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = link_r.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the port closed",
            ));
        }
        dec.push(&buf[..n]);
        while let Some(event) = dec.next_event() {
            match event {
                link::Event::Chunk(c) if c.session == session => {
                    opening.answered();
                    to_rpc.write_all(&c.data).await?;
                }
                link::Event::Reset {
                    session: s,
                    reason: link::ResetReason::NotStarted,
                } if s == session => opening.resend.notify_one(),
                link::Event::Reset { session: s, .. } if s == session => {
                    return Err(std::io::Error::other(
                        "the daemon lost part of this conversation and ended it; \
                         the request may or may not have been carried out",
                    ));
                }
                _ => {}
            }
        }
    }
}
