//! Serving Cap'n Proto RPC (`rebootd`, `bootctld`): on a virtio-serial port found by name
//! ([`nx_guest::port`]), and on unix sockets.
//!
//! Everything here runs on a tokio current-thread runtime inside a
//! [`tokio::task::LocalSet`] (capnp-rpc objects are `!Send`).
//!
//! The virtio-serial port (see ../shared/platform-notes.md):
//! * found by its name in `/sys/class/virtio-ports/*/name`, never by number;
//! * opened once, `O_RDWR`, and kept open (a second open fails with EBUSY);
//! * while no host client is connected to the chardev socket, reads return EOF:
//!   that is "host gone" — we poll every [`HOST_POLL`] until a read returns data
//!   or `EAGAIN` (host connected), then serve framed RPC on it. A later EOF only pauses
//!   the link (polled again every [`HOST_POLL`]): it can be stale, read after the first
//!   bytes of the next host connection, so the decoder and the current session are kept
//!   (the session ids tell the conversations apart).

use crate::TransportError;
use capnp::capability::Client;
use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::io::{AsyncRead, AsyncWrite, BufReader, Cursor};
use futures::AsyncReadExt as _;
use nx_guest::port;
use proto::rpc::link;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// How often a port with no host connected is polled.
pub const HOST_POLL: Duration = Duration::from_millis(200);
/// How often a port that does not exist (yet) is looked up again.
pub const PORT_LOOKUP_POLL: Duration = Duration::from_millis(500);

/// Something to serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path (guest-local `/run/*.sock`, or a host test socket).
    Unix(PathBuf),
    /// A virtio-serial port by name (`com.nexus.bootctl`).
    Port(String),
}

/// Bound listeners (sockets are bound eagerly so a bad path fails at startup).
pub struct Listeners {
    unix: Vec<(PathBuf, UnixListener)>,
    ports: Vec<String>,
}

/// Bind all unix endpoints (must run inside a tokio runtime). A stale socket
/// file at the path is replaced; any other file is refused.
pub fn bind(endpoints: &[Endpoint]) -> Result<Listeners, TransportError> {
    let mut unix = Vec::new();
    let mut ports = Vec::new();
    for ep in endpoints {
        match ep {
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|source| TransportError::Bind {
                        path: path.clone(),
                        source,
                    })?;
                }
                let l = UnixListener::bind(path).map_err(|source| TransportError::Bind {
                    path: path.clone(),
                    source,
                })?;
                unix.push((path.clone(), l));
            }
            Endpoint::Port(name) => ports.push(name.clone()),
        }
    }
    Ok(Listeners { unix, ports })
}

fn remove_stale_socket(path: &Path) -> Result<(), TransportError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| TransportError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(TransportError::NotASocket(path.to_path_buf())),
        Err(_) => Ok(()),
    }
}

impl Listeners {
    /// Serve `bootstrap` on every endpoint, forever. `who` prefixes log lines
    /// (`bootctld`, `rebootd`). Must run inside a `LocalSet`.
    pub async fn serve(self, bootstrap: Client, who: &'static str) {
        let mut loops: Vec<Pin<Box<dyn std::future::Future<Output = ()>>>> = Vec::new();
        for (path, listener) in self.unix {
            loops.push(Box::pin(accept_loop(
                path,
                listener,
                bootstrap.clone(),
                who,
            )));
        }
        for name in self.ports {
            loops.push(Box::pin(port_loop(name, bootstrap.clone(), who)));
        }
        if loops.is_empty() {
            futures::future::pending::<()>().await;
        }
        futures::future::join_all(loops).await;
    }
}

fn spawn_session<R, W>(read: R, write: W, bootstrap: Client, who: &'static str, peer: String)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let rpc = crate::connection(BufReader::new(read), write, Side::Server, Some(bootstrap));
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            eprintln!("{who}: rpc session on {peer} ended with an error: {e}");
        }
    });
}

async fn accept_loop(path: PathBuf, listener: UnixListener, bootstrap: Client, who: &'static str) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let peer = path.display().to_string();
                let bootstrap = bootstrap.clone();
                tokio::task::spawn_local(async move {
                    let (r, w) = stream.into_split();
                    let mut r = r.compat();
                    // Framed (nx over a host socket) or raw capnp (guest-local
                    // clients)? The first four bytes tell.
                    let mut first = [0u8; 4];
                    if futures::AsyncReadExt::read_exact(&mut r, &mut first)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if link::is_framed(&first) {
                        serve_framed(r, w.compat_write(), first.to_vec(), bootstrap, who, &peer)
                            .await;
                    } else {
                        spawn_session(
                            Cursor::new(first.to_vec()).chain(r),
                            w.compat_write(),
                            bootstrap,
                            who,
                            peer,
                        );
                    }
                });
            }
            Err(e) => {
                eprintln!("{who}: accept on {} failed: {e}; retrying", path.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One RPC session of a framed link: the RPC system and its output pump run as
/// local tasks over an in-memory pipe; dropping the session aborts both.
struct FramedSession {
    id: u32,
    next_seq: u32,
    input: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for FramedSession {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FramedSession {
    fn start(
        id: u32,
        bootstrap: Client,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
        who: &'static str,
        peer: String,
    ) -> Self {
        let (rpc_end, link_end) = tokio::io::duplex(2 * link::MAX_CHUNK);
        let (rpc_r, rpc_w) = tokio::io::split(rpc_end);
        let rpc = crate::connection(
            BufReader::new(rpc_r.compat()),
            rpc_w.compat_write(),
            Side::Server,
            Some(bootstrap),
        );
        let rpc_task = tokio::task::spawn_local(async move {
            if let Err(e) = rpc.await {
                eprintln!("{who}: rpc session {id:#010x} on {peer} ended with an error: {e}");
            }
        });
        let (mut from_rpc, input) = tokio::io::split(link_end);
        let pump = tokio::task::spawn_local(async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = vec![0u8; link::MAX_CHUNK];
            let mut seq = 0u32;
            loop {
                let n = match from_rpc.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut frame = Vec::with_capacity(n + 32);
                if link::encode(id, seq, &buf[..n], &mut frame).is_err() {
                    return;
                }
                seq = seq.wrapping_add(1);
                if out.send(frame).await.is_err() {
                    return;
                }
            }
        });
        FramedSession {
            id,
            next_seq: 0,
            input,
            tasks: [rpc_task, pump],
        }
    }
}

/// Serve framed RPC (see `proto::rpc::link`) on one byte link until it ends
/// (EOF or a read error): one RPC session per session id, a new id replaces
/// the current session. `first` are bytes already read from `read`.
///
/// A chunk of a session whose chunk 0 never came is answered with a
/// [`link::ResetReason::NotStarted`] reset (the client sends its opening again), a session
/// that lost bytes with [`link::ResetReason::Lost`]; chunks already served (a client's
/// retransmission) are dropped, so no request runs twice.
pub async fn serve_framed<R, W>(
    read: R,
    write: W,
    first: Vec<u8>,
    bootstrap: Client,
    who: &'static str,
    peer: &str,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    serve_link(read, write, first, bootstrap, who, peer, OnEof::End).await;
}

/// What an EOF on a link means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnEof {
    /// The link is over (a socket connection).
    End,
    /// No host is connected for now (a virtio-serial port): keep every session and poll
    /// again after [`HOST_POLL`]. The EOF may be stale — seen after the first bytes of the
    /// next host connection — so nothing already read may be dropped.
    Pause,
}

/// How many session ids a link remembers (started ones, ended ones).
const SESSIONS_REMEMBERED: usize = 64;

/// Recently seen session ids of one link, oldest first.
#[derive(Debug, Default)]
struct SessionIds(std::collections::VecDeque<u32>);

impl SessionIds {
    fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    /// Remember `id`; false when it was already there.
    fn insert(&mut self, id: u32) -> bool {
        if self.contains(id) {
            return false;
        }
        if self.0.len() >= SESSIONS_REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back(id);
        true
    }
}

/// What one link remembers about sessions, so that late or retransmitted chunks are never
/// served twice.
#[derive(Debug, Default)]
struct Sessions {
    /// Sessions whose chunk 0 was served.
    started: SessionIds,
    /// Sessions that are over (reset as lost); their chunks are dropped.
    ended: SessionIds,
    /// Sessions answered with a not-started reset (answered once).
    not_started: SessionIds,
}

/// Queue a reset of `session`. Best effort, never waiting: the reader must not stall behind
/// a writer that waits for a host (a client that misses the reset sends its opening again
/// after [`link::RETRANSMIT_FIRST`] anyway).
fn send_reset(tx: &tokio::sync::mpsc::Sender<Vec<u8>>, session: u32, reason: link::ResetReason) {
    let mut frame = Vec::new();
    link::encode_reset(session, reason, &mut frame);
    let _ = tx.try_send(frame);
}

pub(crate) async fn serve_link<R, W>(
    mut read: R,
    write: W,
    first: Vec<u8>,
    bootstrap: Client,
    who: &'static str,
    peer: &str,
    on_eof: OnEof,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    use futures::AsyncWriteExt as _;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let writer_peer = peer.to_string();
    let writer = tokio::task::spawn_local(async move {
        let mut write = write;
        let mut reported = false;
        while let Some(frame) = rx.recv().await {
            let r = match write.write_all(&frame).await {
                Ok(()) => write.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                if !reported {
                    eprintln!("{who}: writing to {writer_peer} failed: {e}; dropping replies");
                    reported = true;
                }
            }
        }
    });
    let mut dec = link::LinkDecoder::new();
    dec.push(&first);
    let mut current: Option<FramedSession> = None;
    let mut seen = Sessions::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut skipped = 0usize;
    loop {
        while let Some(event) = dec.next_event() {
            let chunk = match event {
                link::Event::Chunk(c) => c,
                link::Event::Skipped { bytes, reason } => {
                    if skipped == 0 {
                        eprintln!("{who}: skipped {bytes} bytes on {peer}: {reason}");
                    }
                    skipped = skipped.saturating_add(bytes);
                    continue;
                }
                // Resets go from server to client only.
                link::Event::Reset { .. } => continue,
                link::Event::Probe => {
                    // "Who are you?" (proto::ident): answered at any point of the stream.
                    if let Some(d) = proto::ident::Daemon::from_name(who) {
                        let _ = tx.try_send(proto::ident::reply(d));
                    }
                    continue;
                }
            };
            let id = chunk.session;
            if seen.ended.contains(id) {
                continue;
            }
            if current.as_ref().map(|s| s.id) != Some(id) {
                if seen.started.contains(id) {
                    // It ran here before and was replaced: it is over, and what it
                    // asked may have been done.
                    seen.ended.insert(id);
                    send_reset(&tx, id, link::ResetReason::Lost);
                    continue;
                }
                if chunk.seq != 0 {
                    // The start of this session is gone (cut by a stale EOF, or an old
                    // conversation cut in the middle): nothing of it was served, so the
                    // client may send it again.
                    if seen.not_started.insert(id) {
                        eprintln!(
                            "{who}: session {id:#010x} on {peer} starts at chunk {}; asking for its start",
                            chunk.seq
                        );
                        send_reset(&tx, id, link::ResetReason::NotStarted);
                    }
                    continue;
                }
                seen.started.insert(id);
                current = Some(FramedSession::start(
                    id,
                    bootstrap.clone(),
                    tx.clone(),
                    who,
                    peer.to_string(),
                ));
            }
            let Some(session) = current.as_mut() else {
                continue;
            };
            if chunk.seq < session.next_seq {
                // A retransmission of a chunk already served.
                continue;
            }
            if chunk.seq != session.next_seq {
                eprintln!(
                    "{who}: session {:#010x} on {peer} lost data (chunk {} after {}); ending it",
                    session.id, chunk.seq, session.next_seq
                );
                seen.ended.insert(id);
                current = None;
                send_reset(&tx, id, link::ResetReason::Lost);
                continue;
            }
            session.next_seq = session.next_seq.wrapping_add(1);
            use tokio::io::AsyncWriteExt as _;
            if session.input.write_all(&chunk.data).await.is_err() {
                seen.ended.insert(id);
                current = None;
                send_reset(&tx, id, link::ResetReason::Lost);
            }
        }
        match futures::AsyncReadExt::read(&mut read, &mut buf).await {
            Ok(0) if on_eof == OnEof::Pause => tokio::time::sleep(HOST_POLL).await,
            Ok(0) | Err(_) => break,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
    drop(current);
    writer.abort();
}

async fn port_loop(name: String, bootstrap: Client, who: &'static str) {
    let mut warned = false;
    let dev = loop {
        match port::find(Path::new(port::SYS_VIRTIO_PORTS), Path::new("/dev"), &name) {
            Ok(Some(dev)) => break dev,
            Ok(None) => {
                if !warned {
                    println!("{who}: waiting for virtio-serial port {name}");
                    warned = true;
                }
            }
            Err(e) => {
                if !warned {
                    eprintln!("{who}: looking up port {name} failed: {e}; retrying");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(PORT_LOOKUP_POLL).await;
    };
    let fd = loop {
        use rustix::fs::{Mode, OFlags};
        match rustix::fs::open(
            &dev,
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => break fd,
            Err(e) => {
                eprintln!("{who}: open {} failed: {e}; retrying in 1 s", dev.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    println!("{who}: port {name} is {}", dev.display());
    loop {
        let prefix = wait_for_host(&fd, who, &dev).await;
        let session = match rustix::io::dup(&fd)
            .map_err(io::Error::from)
            .and_then(register)
        {
            Ok(afd) => Rc::new(afd),
            Err(e) => {
                eprintln!("{who}: cannot poll {}: {e}; retrying in 1 s", dev.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Runs until a read fails: an EOF only pauses it (see [`OnEof::Pause`]).
        serve_link(
            VportIo(session.clone()),
            VportIo(session),
            prefix,
            bootstrap.clone(),
            who,
            &name,
            OnEof::Pause,
        )
        .await;
    }
}

/// Register a port descriptor with the tokio reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, and keeps
    // returning the same number, until the `AsyncFd` owning it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Poll the port until a host is connected; returns bytes already read.
async fn wait_for_host(fd: &OwnedFd, who: &str, dev: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut reported = false;
    loop {
        match rustix::io::read(fd, &mut buf[..]) {
            Ok(0) => tokio::time::sleep(HOST_POLL).await,
            Ok(n) => {
                buf.truncate(n);
                return buf;
            }
            Err(rustix::io::Errno::AGAIN) => return Vec::new(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                if !reported {
                    eprintln!("{who}: read {} failed: {e}; retrying", dev.display());
                    reported = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One direction of a non-blocking port descriptor registered with tokio.
struct VportIo(Rc<AsyncFd<OwnedFd>>);

impl AsyncRead for VportIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            match guard.try_io(|inner| {
                rustix::io::read(inner.get_ref().as_fd(), &mut *buf).map_err(io::Error::from)
            }) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VportIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|inner| {
                rustix::io::write(inner.get_ref().as_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
