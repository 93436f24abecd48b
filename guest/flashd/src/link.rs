//! The byte links flashd receives on, turned into a stream of decoded frames.
//!
//! * [`UnixAcceptor`]: `--listen SOCK` (host use and tests). One connection at a time; a
//!   connection ends at EOF, on an I/O error or when the server drops it.
//! * [`PortAcceptor`]: `--port-name NAME` (the guest's virtio-serial port). The port is opened
//!   exactly once, read-write (a second `open()` fails with EBUSY), and that one descriptor
//!   serves both directions for the daemon's whole life. While no host is connected to the
//!   host side of the port, reads return EOF: that is "host gone", never a reason to exit —
//!   the reader keeps polling and the next bytes start the next connection.
//!
//! Each link has a reader thread that decodes frames ([`proto::frame::FrameDecoder`]) into a
//! bounded channel, so the memory used by queued frames is bounded by
//! `QUEUE_FRAMES × MAX_FRAME_LEN` whatever the image size. Writes are non-blocking with a
//! bounded wait, so a host that stops reading can never wedge the daemon.

use bytes::BytesMut;
use proto::frame::{Frame, FrameDecoder, FrameError, SkipReason};
use proto::msg;
use rustix::event::{PollFd, PollFlags};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Frames the reader may queue ahead of the server. With frames of at most
/// [`proto::frame::MAX_FRAME_LEN`] bytes this bounds queued memory.
pub const QUEUE_FRAMES: usize = 4;
/// Initial capacity of the frame buffer.
const READ_BLOCK: usize = 256 * 1024;
/// Bytes requested per `read(2)` (a virtio-serial port returns at most 4 KiB anyway).
const SCRATCH: usize = 64 * 1024;
/// The size of one virtio-serial buffer (a page): one `readv` piece.
const PORT_PIECE: usize = 4096;
/// How long a write may wait for the peer to drain before the link counts as lost.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a reader re-checks its stop flag while idle, and how long the port reader
/// sleeps between polls while no host is connected.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often a port reader looks for a host while none is connected. A port cannot be waited
/// on for that (`poll(2)` reports it readable and hung up at once), so this is a sleep: its
/// length is the latency a new host sees before its first frame is read (a re-flash of the
/// installed image is one round trip, so it shows), at the cost of a wake-up per interval
/// while idle.
const HOST_POLL: Duration = Duration::from_millis(5);
/// How long a port must keep reading EOF before the host counts as gone (see `reader_loop`).
const EOF_GRACE: Duration = Duration::from_millis(100);
/// A port silent this long while part of a frame is buffered: the frame was cut (the host
/// went away and came back without an EOF in between), see `reader_loop`.
const STALE_PARTIAL: Duration = Duration::from_millis(500);
/// A port quiet this long while part of a frame is buffered: check whether that frame's
/// length field was corrupted (`FrameDecoder::recover_short_frame`). A sender that waits
/// for acknowledgements goes quiet until its timeout (at least 100 ms), so this finds
/// the frames hidden behind a bad length long before `STALE_PARTIAL`.
const PARTIAL_QUIET: Duration = Duration::from_millis(10);

/// Errors of the link layer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "cannot listen on {path}: {source} (is another flashd running? remove the stale socket)"
    )]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot accept a connection on {path}: {source}")]
    Accept {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open port {path}: {source} (a virtio-serial port can be open only once: is another flashd running?)")]
    OpenPort {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("link: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the host stopped reading for {0:?}; dropping the connection")]
    WriteTimeout(Duration),
    #[error("the host is gone (connection closed)")]
    Closed,
}

/// What the reader thread reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// One valid frame.
    Frame(Frame),
    /// The decoder discarded corrupt bytes (garbage, bad CRC, hostile length) and resynced.
    Skipped { bytes: usize, reason: SkipReason },
    /// The connection ended (EOF or read error). For a port: the host went away.
    Closed(Option<String>),
}

/// Result of waiting for the next event.
#[derive(Debug)]
pub enum Recv {
    Event(LinkEvent),
    /// Nothing arrived within the timeout.
    Timeout,
}

/// One connection: decoded frames in, encoded frames out.
pub struct Conn {
    /// Where frames go; `None` while a connection of a [`MultiAcceptor`] has no link yet
    /// (frames sent then, e.g. a result of background work, go nowhere).
    writer: Option<File>,
    events: Arc<Mutex<Receiver<LinkEvent>>>,
    /// Set for a connection of a [`MultiAcceptor`]: its events come from there instead.
    multi: Option<MultiConn>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// A port connection shares its reader with later connections: dropping it does not stop it.
    owns_reader: bool,
    closed: bool,
    peer: String,
}

impl Conn {
    /// A connection over a connected unix stream (also used by tests with `UnixStream::pair`).
    pub fn from_unix(stream: UnixStream, peer: impl Into<String>) -> Result<Conn, LinkError> {
        stream
            .set_nonblocking(true)
            .map_err(|source| LinkError::Io {
                what: "set non-blocking",
                source,
            })?;
        let fd: OwnedFd = stream.into();
        let file = File::from(fd);
        let read_half = file.try_clone().map_err(|source| LinkError::Io {
            what: "dup socket",
            source,
        })?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_FRAMES);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = std::thread::Builder::new()
            .name("flashd-rx".into())
            .spawn(move || reader_loop(read_half, move |ev| tx.send(ev).is_ok(), stop2, false))
            .map_err(|source| LinkError::Io {
                what: "spawn reader thread",
                source,
            })?;
        Ok(Conn {
            writer: Some(file),
            events: Arc::new(Mutex::new(rx)),
            multi: None,
            stop,
            reader: Some(reader),
            owns_reader: true,
            closed: false,
            peer: peer.into(),
        })
    }

    /// Who is on the other side (for logs).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Wait up to `timeout` for the next event. After [`LinkEvent::Closed`] every call
    /// returns `Closed` again.
    pub fn recv(&mut self, timeout: Duration) -> Recv {
        if self.closed {
            return Recv::Event(LinkEvent::Closed(None));
        }
        if self.multi.is_some() {
            return self.recv_multi(timeout);
        }
        let got = match self.events.lock() {
            Ok(rx) => rx.recv_timeout(timeout),
            Err(_) => Err(RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(LinkEvent::Closed(why)) => {
                self.closed = true;
                Recv::Event(LinkEvent::Closed(why))
            }
            Ok(ev) => Recv::Event(ev),
            Err(RecvTimeoutError::Timeout) => Recv::Timeout,
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Recv::Event(LinkEvent::Closed(Some("reader stopped".into())))
            }
        }
    }

    /// Send one frame (header, payload and trailer in one buffer).
    pub fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        if self.closed {
            return Err(LinkError::Closed);
        }
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(frame.encoded_len());
        frame.encode_to_vec(&mut buf);
        match write_all_bounded(writer, &buf, WRITE_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.closed = true;
                Err(e)
            }
        }
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.owns_reader {
            self.stop.store(true, Ordering::Relaxed);
            // Wake a reader blocked in poll: shut the socket down (harmless on a port).
            if let Some(w) = &self.writer {
                let _ = rustix::net::shutdown(w.as_fd(), rustix::net::Shutdown::Both);
            }
            // Drop our end of the queue first: a reader blocked on a full queue then fails
            // its send and exits instead of waiting for us forever.
            let (_, dummy) = mpsc::sync_channel(1);
            drop(std::mem::replace(
                &mut self.events,
                Arc::new(Mutex::new(dummy)),
            ));
            if let Some(h) = self.reader.take() {
                let _ = h.join();
            }
        }
    }
}

/// Write all of `buf` to a non-blocking descriptor, waiting at most `timeout` in total for
/// the peer to make room.
fn write_all_bounded(w: &mut File, mut buf: &[u8], timeout: Duration) -> Result<(), LinkError> {
    let deadline = Instant::now() + timeout;
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(LinkError::WriteTimeout(timeout));
                }
                wait_fd(w, PollFlags::OUT, (deadline - now).min(POLL_INTERVAL * 4));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::NotConnected
                ) =>
            {
                return Err(LinkError::Closed)
            }
            Err(source) => {
                return Err(LinkError::Io {
                    what: "write",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Wait until `fd` is ready for `flags` or `timeout` passes. Errors count as "ready" (the
/// following read/write reports them).
fn wait_fd(fd: &impl AsFd, flags: PollFlags, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, flags)];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(n) => n > 0,
        Err(_) => true,
    }
}

/// Reader thread: read, decode, queue. `persistent`: a port — EOF means "no host right now",
/// report `Closed` once and keep polling for the next host.
fn reader_loop(
    mut src: File,
    mut send: impl FnMut(LinkEvent) -> bool,
    stop: Arc<AtomicBool>,
    persistent: bool,
) {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::with_capacity(READ_BLOCK);
    let mut scratch = vec![0u8; SCRATCH];
    // How long a port has been silent while `buf` holds part of a frame.
    let mut stalled = Duration::ZERO;
    // For a port: whether a host is (believed to be) connected; `Closed` is sent on the
    // transition to "gone" only.
    let mut connected = !persistent;
    // For a port: when the current run of EOFs began (see EOF_GRACE).
    let mut eof_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match read_some(&mut src, &mut scratch, &mut buf) {
            Ok(0) => {
                // EOF.
                if !persistent {
                    let why = if buf.is_empty() {
                        None
                    } else {
                        Some(format!(
                            "{} bytes of a truncated frame at end of stream",
                            buf.len()
                        ))
                    };
                    send(LinkEvent::Closed(why));
                    return;
                }
                // A port reads EOF whenever it holds no data and the host is not marked
                // connected — also right after a new host connected and its first bytes were
                // read, before the guest processed the host's "port open" message. Only an EOF
                // that lasts is the host going away.
                let since = *eof_since.get_or_insert_with(Instant::now);
                if connected && since.elapsed() >= EOF_GRACE {
                    connected = false;
                    buf.clear();
                    dec = FrameDecoder::new();
                    if !send(LinkEvent::Closed(None)) {
                        return;
                    }
                }
                std::thread::sleep(HOST_POLL);
                continue;
            }
            Ok(_) => {
                connected = true;
                eof_since = None;
                stalled = Duration::ZERO;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // No data, but a host is connected (a port without one reads EOF).
                eof_since = None;
                let quiet = if buf.is_empty() {
                    POLL_INTERVAL
                } else {
                    PARTIAL_QUIET
                };
                if wait_fd(&src, PollFlags::IN, quiet) {
                    continue;
                }
                stalled += quiet;
                if buf.is_empty() {
                    continue;
                }
                if let Some(FrameError::Skipped { bytes, reason }) =
                    dec.recover_short_frame(&mut buf)
                {
                    // A frame with a corrupted length: drop it, decode what follows.
                    stalled = Duration::ZERO;
                    if !send(LinkEvent::Skipped { bytes, reason }) {
                        return;
                    }
                } else if stalled < STALE_PARTIAL {
                    continue;
                } else {
                    // Nothing for a while, and an incomplete frame is held: when the host
                    // disconnects and reconnects faster than the port reports EOF, the head of a
                    // cut frame sits in front of the new host's first frame and would swallow it.
                    // Drop up to the next frame magic and decode what follows (a frame of a
                    // merely slow host is then lost like any corrupt one: NAK, retransmit).
                    // On any link (socket too): a flipped length bit makes a frame claim up to
                    // MAX_PAYLOAD bytes; a sender that slowed down on a noisy line would take
                    // minutes to fill it, so the stale partial frame is dropped here as well.
                    stalled = Duration::ZERO;
                    let n = find_next_magic(&buf).unwrap_or(buf.len());
                    bytes::Buf::advance(&mut buf, n);
                    if !send(LinkEvent::Skipped {
                        bytes: n,
                        reason: SkipReason::Garbage,
                    }) {
                        return;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if persistent {
                    // A port error (e.g. EIO while the host is away): same as "gone".
                    if connected {
                        connected = false;
                        buf.clear();
                        dec = FrameDecoder::new();
                        if !send(LinkEvent::Closed(Some(e.to_string()))) {
                            return;
                        }
                    }
                    std::thread::sleep(HOST_POLL);
                    continue;
                }
                send(LinkEvent::Closed(Some(e.to_string())));
                return;
            }
        }
        loop {
            let ev = match dec.decode(&mut buf) {
                Ok(Some(f)) => LinkEvent::Frame(f),
                Ok(None) => break,
                Err(FrameError::Skipped { bytes, reason }) => LinkEvent::Skipped { bytes, reason },
                Err(e) => LinkEvent::Closed(Some(e.to_string())),
            };
            if !send(ev) {
                return;
            }
        }
    }
}

/// Offset of the next frame magic after the first byte of `buf`.
fn find_next_magic(buf: &[u8]) -> Option<usize> {
    let m = proto::frame::MAGIC;
    buf.windows(m.len())
        .skip(1)
        .position(|w| w == m)
        .map(|p| p + 1)
}

/// One `read(2)` into `scratch` (zeroed once, reused), appended to `buf`.
///
/// A virtio-serial port returns at most one 4 KiB buffer per `read(2)`: growing (and
/// zero-filling) `buf` by 256 KiB for every read cost a 256 KiB memset per 4 KiB
/// received — 64× the data, most of flashd's receive time in the guest. Copying the bytes
/// that did arrive is cheap.
///
/// The read is a `readv(2)` of [`SCRATCH`] / 4 KiB pieces: for a port the kernel then takes one
/// virtio buffer per piece in a single system call (it stops at the first short or empty one —
/// the port is non-blocking), instead of one system call per 4 KiB; a socket just fills them.
fn read_some(src: &mut File, scratch: &mut [u8], buf: &mut BytesMut) -> io::Result<usize> {
    let mut pieces = scratch.chunks_mut(PORT_PIECE);
    let mut iov: [io::IoSliceMut<'_>; SCRATCH / PORT_PIECE] =
        std::array::from_fn(|_| io::IoSliceMut::new(pieces.next().unwrap_or_default()));
    let n = src.read_vectored(&mut iov)?;
    buf.extend_from_slice(scratch.get(..n).unwrap_or_default());
    Ok(n)
}

/// Source of connections for the server.
pub trait Acceptor {
    /// Wait for the next connection. `Ok(None)`: stop serving (never for a port).
    fn accept(&mut self) -> Result<Option<Conn>, LinkError>;
    /// Human-readable name of what we serve on.
    fn describe(&self) -> String;
}

/// `--listen SOCK`: a unix socket flashd serves itself.
pub struct UnixAcceptor {
    listener: UnixListener,
    path: PathBuf,
    count: u64,
}

impl UnixAcceptor {
    /// Bind `path`, replacing a stale socket file left by an earlier run.
    pub fn bind(path: &Path) -> Result<UnixAcceptor, LinkError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| LinkError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(UnixAcceptor {
            listener,
            path: path.to_path_buf(),
            count: 0,
        })
    }

    /// Serve on an already bound listener (tests).
    pub fn from_listener(listener: UnixListener, path: PathBuf) -> UnixAcceptor {
        UnixAcceptor {
            listener,
            path,
            count: 0,
        }
    }
}

impl Acceptor for UnixAcceptor {
    fn accept(&mut self) -> Result<Option<Conn>, LinkError> {
        let (stream, _) = self.listener.accept().map_err(|source| LinkError::Accept {
            path: self.path.clone(),
            source,
        })?;
        self.count += 1;
        Conn::from_unix(stream, format!("unix#{}", self.count)).map(Some)
    }

    fn describe(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

/// Open a virtio-serial port device (e.g. `/dev/vport0p1`) read-write, non-blocking: once
/// for the daemon's life (a second `open()` fails with EBUSY).
pub fn open_port_device(path: &Path) -> Result<File, LinkError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LinkError::OpenPort {
            path: path.to_path_buf(),
            source,
        })
}

/// `--port-name NAME`: the guest's virtio-serial port, opened once for the daemon's life.
///
/// The port is one long-lived descriptor: a "connection" is the span between two host
/// disconnects. Every connection shares the one reader thread.
pub struct PortAcceptor {
    path: PathBuf,
    writer: File,
    events: Arc<Mutex<Receiver<LinkEvent>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    count: u64,
}

impl PortAcceptor {
    /// Open the port device (e.g. `/dev/vport0p1`) once, read-write, non-blocking.
    pub fn open(path: &Path) -> Result<PortAcceptor, LinkError> {
        PortAcceptor::from_file(open_port_device(path)?, path)
    }

    /// Serve an already open, non-blocking port descriptor (`path` is for messages).
    pub fn from_file(file: File, path: &Path) -> Result<PortAcceptor, LinkError> {
        // dup(2), not a second open(2): the port allows only one open at a time.
        let read_half = file.try_clone().map_err(|source| LinkError::Io {
            what: "dup port descriptor",
            source,
        })?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_FRAMES);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = std::thread::Builder::new()
            .name("flashd-port".into())
            .spawn(move || reader_loop(read_half, move |ev| tx.send(ev).is_ok(), stop2, true))
            .map_err(|source| LinkError::Io {
                what: "spawn reader thread",
                source,
            })?;
        Ok(PortAcceptor {
            path: path.to_path_buf(),
            writer: file,
            events: Arc::new(Mutex::new(rx)),
            stop,
            reader: Some(reader),
            count: 0,
        })
    }
}

impl Acceptor for PortAcceptor {
    fn accept(&mut self) -> Result<Option<Conn>, LinkError> {
        let writer = self.writer.try_clone().map_err(|source| LinkError::Io {
            what: "dup port descriptor",
            source,
        })?;
        self.count += 1;
        Ok(Some(Conn {
            writer: Some(writer),
            events: self.events.clone(),
            multi: None,
            stop: self.stop.clone(),
            reader: None,
            owns_reader: false,
            closed: false,
            peer: format!("port#{}", self.count),
        }))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for PortAcceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// How long the link of a connection must be silent before a frame on another link of a
/// [`MultiAcceptor`] takes the server over (ending the quiet connection). Until then that
/// frame is refused with `ERROR busy`. A UART never reports its host gone: without this a
/// finished UART session would keep every other link out until `--idle-timeout`.
pub const HANDOVER_QUIET: Duration = Duration::from_secs(5);
/// How long the answer to a refused frame may wait for its link to take it.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The links of a [`MultiAcceptor`], shared with its current connection.
struct Links {
    /// Every reader's events, tagged with the link's index.
    events: Mutex<Receiver<(usize, LinkEvent)>>,
    /// The frame that ended the previous connection by taking the server over: it starts
    /// the next connection.
    pending: Mutex<Option<(usize, LinkEvent)>>,
    writers: Vec<File>,
    names: Vec<String>,
    /// [`HANDOVER_QUIET`] (shorter in tests).
    handover: Duration,
}

/// The part of a [`Conn`] that belongs to a [`MultiAcceptor`].
struct MultiConn {
    links: Arc<Links>,
    /// The link this connection serves, once its first frame arrived.
    bound: Option<usize>,
    /// When the bound link last delivered an event.
    last: Instant,
    /// Whether a frame that is not a request was already refused (a flood of WRITEs gets
    /// one answer).
    refused_data: bool,
    number: u64,
}

impl Conn {
    /// [`Conn::recv`] of a [`MultiAcceptor`] connection: the first frame on any link binds
    /// the connection to that link; frames on the other links are answered (identification
    /// probes) or refused with `ERROR busy`, unless the bound link is quiet for
    /// [`HANDOVER_QUIET`]: then this connection ends and the next one starts with that frame.
    fn recv_multi(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(mc) = self.multi.as_mut() else {
                return Recv::Timeout;
            };
            let links = Arc::clone(&mc.links);
            let pending = if mc.bound.is_none() {
                links.pending.lock().ok().and_then(|mut p| p.take())
            } else {
                None
            };
            let (i, ev) = match pending {
                Some(p) => p,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let got = match links.events.lock() {
                        Ok(rx) => rx.recv_timeout(left),
                        Err(_) => Err(RecvTimeoutError::Disconnected),
                    };
                    match got {
                        Ok(x) => x,
                        Err(RecvTimeoutError::Timeout) => return Recv::Timeout,
                        Err(RecvTimeoutError::Disconnected) => {
                            self.closed = true;
                            return Recv::Event(LinkEvent::Closed(Some("reader stopped".into())));
                        }
                    }
                }
            };
            match mc.bound {
                None => {
                    // Only a frame starts a connection: a closed or noisy idle link does not.
                    if !matches!(ev, LinkEvent::Frame(_)) {
                        continue;
                    }
                    let Some(w) = links.writers.get(i).and_then(|w| w.try_clone().ok()) else {
                        continue;
                    };
                    mc.bound = Some(i);
                    mc.last = Instant::now();
                    self.writer = Some(w);
                    self.peer = format!(
                        "{}#{}",
                        links.names.get(i).map(String::as_str).unwrap_or("link"),
                        mc.number
                    );
                    return Recv::Event(ev);
                }
                Some(b) if b == i => {
                    mc.last = Instant::now();
                    if matches!(ev, LinkEvent::Closed(_)) {
                        self.closed = true;
                    }
                    return Recv::Event(ev);
                }
                Some(b) => {
                    let LinkEvent::Frame(f) = ev else {
                        continue;
                    };
                    let mine = links.names.get(b).cloned().unwrap_or_default();
                    let other = links.names.get(i).cloned().unwrap_or_default();
                    if proto::ident::is_probe(&f) {
                        if let Some(reply) = proto::ident::reply_frame(crate::server::IDENT) {
                            refuse_write(&links, i, &reply);
                        }
                        continue;
                    }
                    if mc.last.elapsed() >= links.handover {
                        if let Ok(mut p) = links.pending.lock() {
                            *p = Some((i, LinkEvent::Frame(f)));
                        }
                        self.closed = true;
                        return Recv::Event(LinkEvent::Closed(Some(format!(
                            "{mine} quiet for {} s; {other} takes over",
                            mc.last.elapsed().as_secs()
                        ))));
                    }
                    let request = matches!(
                        msg::MsgType::from_u8(f.msg_type()),
                        Some(msg::MsgType::Hello | msg::MsgType::Info | msg::MsgType::Done)
                    );
                    if request || !mc.refused_data {
                        mc.refused_data |= !request;
                        let e = msg::ErrorMsg::new(
                            msg::ErrorCode::Busy,
                            format!("busy: flashing over {mine}; retry when it is done"),
                        );
                        if let Ok(frame) = msg::Message::Error(e).to_frame() {
                            refuse_write(&links, i, &frame);
                        }
                    }
                }
            }
        }
    }
}

/// Answer on link `i` that is not the connection's (bounded wait; a failure is ignored: the
/// host there retries or gives up on its own).
fn refuse_write(links: &Links, i: usize, frame: &Frame) {
    let Some(mut w) = links.writers.get(i).and_then(|w| w.try_clone().ok()) else {
        return;
    };
    let mut buf = Vec::with_capacity(frame.encoded_len());
    frame.encode_to_vec(&mut buf);
    let _ = write_all_bounded(&mut w, &buf, REFUSE_WRITE_TIMEOUT);
}

/// Several long-lived links served by one flashd, one at a time: the virtio-serial port
/// (`--port-name`) and the UART (`--uart`). Each link is one descriptor opened once, with
/// its own reader thread; the readers share one bounded event queue. A connection belongs to
/// the link its first frame came from; the others get `ERROR busy` (see
/// [`HANDOVER_QUIET`]), so two hosts can never drive one transfer or install at once.
pub struct MultiAcceptor {
    links: Arc<Links>,
    stop: Arc<AtomicBool>,
    count: u64,
}

impl MultiAcceptor {
    /// Serve these open, non-blocking descriptors (`name`: the device path, for messages).
    pub fn new(links: Vec<(File, String)>) -> Result<MultiAcceptor, LinkError> {
        let (tx, rx) = mpsc::sync_channel::<(usize, LinkEvent)>(QUEUE_FRAMES);
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        let mut names = Vec::new();
        for (i, (file, name)) in links.into_iter().enumerate() {
            let read_half = file.try_clone().map_err(|source| LinkError::Io {
                what: "dup link descriptor",
                source,
            })?;
            let tx = tx.clone();
            let stop2 = stop.clone();
            std::thread::Builder::new()
                .name(format!("flashd-link{i}"))
                .spawn(move || {
                    reader_loop(read_half, move |ev| tx.send((i, ev)).is_ok(), stop2, true)
                })
                .map_err(|source| LinkError::Io {
                    what: "spawn reader thread",
                    source,
                })?;
            writers.push(file);
            names.push(name);
        }
        Ok(MultiAcceptor {
            links: Arc::new(Links {
                events: Mutex::new(rx),
                pending: Mutex::new(None),
                writers,
                names,
                handover: HANDOVER_QUIET,
            }),
            stop,
            count: 0,
        })
    }

    /// Hand over after `quiet` instead of [`HANDOVER_QUIET`] (tests).
    pub fn with_handover(mut self, quiet: Duration) -> MultiAcceptor {
        if let Some(links) = Arc::get_mut(&mut self.links) {
            links.handover = quiet;
        }
        self
    }

    /// The device names, in order.
    pub fn names(&self) -> &[String] {
        &self.links.names
    }
}

impl Acceptor for MultiAcceptor {
    fn accept(&mut self) -> Result<Option<Conn>, LinkError> {
        self.count += 1;
        let (_, dummy) = mpsc::sync_channel(1);
        Ok(Some(Conn {
            writer: None,
            events: Arc::new(Mutex::new(dummy)),
            multi: Some(MultiConn {
                links: Arc::clone(&self.links),
                bound: None,
                last: Instant::now(),
                refused_data: false,
                number: self.count,
            }),
            stop: self.stop.clone(),
            reader: None,
            owns_reader: false,
            closed: false,
            peer: format!("link#{}", self.count),
        }))
    }

    fn describe(&self) -> String {
        self.links.names.join(" and ")
    }
}

impl Drop for MultiAcceptor {
    fn drop(&mut self) {
        // The readers stop at their next poll; they are not joined (one may wait on the
        // shared queue, which its connection may still hold).
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::msg::Message;

    fn next_event(c: &mut Conn) -> LinkEvent {
        match c.recv(Duration::from_secs(5)) {
            Recv::Event(e) => e,
            Recv::Timeout => panic!("no event"),
        }
    }

    #[test]
    fn port_reader_survives_host_gone_and_reports_it_once() {
        // A socket stands in for the port: same descriptor semantics for one host.
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = File::from(OwnedFd::from(ours));
        let mut acc = PortAcceptor::from_file(file, Path::new("test-port")).unwrap();
        let mut c = acc.accept().unwrap().unwrap();
        // Nothing connected yet is not an event.
        assert!(matches!(c.recv(Duration::from_millis(100)), Recv::Timeout));
        host.write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        assert!(matches!(next_event(&mut c), LinkEvent::Frame(_)));
        // Garbage is reported, not fatal.
        host.write_all(b"zzzz").unwrap();
        assert!(matches!(next_event(&mut c), LinkEvent::Skipped { .. }));
        // The answer goes out on the same descriptor.
        c.send(&Message::Info.to_frame().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let n = host.read(&mut buf).unwrap();
        assert!(n > 0);
        drop(host);
        assert!(matches!(next_event(&mut c), LinkEvent::Closed(_)));
        drop(c);
        // The daemon goes on: a new connection waits, with no second "gone" report.
        let mut c2 = acc.accept().unwrap().unwrap();
        assert!(matches!(c2.recv(Duration::from_millis(200)), Recv::Timeout));
    }

    #[test]
    fn port_reader_drops_a_cut_frame_in_front_of_the_next_hosts_hello() {
        // The host was cut mid-frame and a new host connected before the port read EOF:
        // the head of the cut frame is followed directly by the new host's first frame.
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = File::from(OwnedFd::from(ours));
        let mut acc = PortAcceptor::from_file(file, Path::new("test-port")).unwrap();
        let mut c = acc.accept().unwrap().unwrap();
        let big = Frame::new(7, 0, 1, bytes::Bytes::from(vec![0x5a; 100_000]))
            .unwrap()
            .to_bytes();
        host.write_all(&big[..30_000]).unwrap();
        host.write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        // Nothing more arrives: after the stall the cut frame is dropped, INFO comes through.
        match next_event(&mut c) {
            LinkEvent::Skipped { bytes, .. } => assert_eq!(bytes, 30_000),
            other => panic!("{other:?}"),
        }
        match next_event(&mut c) {
            LinkEvent::Frame(f) => assert_eq!(Message::from_frame(&f).unwrap(), Message::Info),
            other => panic!("{other:?}"),
        }
    }

    fn socket_link() -> (File, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (File::from(OwnedFd::from(ours)), host)
    }

    fn read_frame(host: &mut UnixStream) -> Frame {
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut b = [0u8; 4096];
        loop {
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                return f;
            }
            let n = host.read(&mut b).unwrap();
            assert!(n > 0, "link closed");
            buf.extend_from_slice(&b[..n]);
        }
    }

    #[test]
    fn two_links_one_at_a_time_busy_then_handover() {
        let (port, mut port_host) = socket_link();
        let (uart, mut uart_host) = socket_link();
        let mut acc = MultiAcceptor::new(vec![(port, "port".into()), (uart, "uart".into())])
            .unwrap()
            .with_handover(Duration::from_millis(600));
        let mut c = acc.accept().unwrap().unwrap();
        assert!(matches!(c.recv(Duration::from_millis(100)), Recv::Timeout));
        // The first frame binds the connection to the UART.
        uart_host
            .write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        assert!(matches!(next_event(&mut c), LinkEvent::Frame(_)));
        assert!(c.peer().starts_with("uart#"), "{}", c.peer());
        c.send(&Message::Info.to_frame().unwrap()).unwrap();
        assert_eq!(
            Message::from_frame(&read_frame(&mut uart_host)).unwrap(),
            Message::Info
        );
        // A request on the port while the UART is busy: refused, nothing reaches the server.
        port_host
            .write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        assert!(matches!(c.recv(Duration::from_millis(200)), Recv::Timeout));
        match Message::from_frame(&read_frame(&mut port_host)).unwrap() {
            Message::Error(e) => {
                assert_eq!(e.code, msg::ErrorCode::Busy);
                assert!(e.text.contains("uart"), "{}", e.text);
            }
            other => panic!("{other:?}"),
        }
        // The UART goes quiet: the port's next frame ends this connection and starts the next.
        std::thread::sleep(Duration::from_millis(700));
        port_host
            .write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        match next_event(&mut c) {
            LinkEvent::Closed(Some(why)) => assert!(why.contains("takes over"), "{why}"),
            other => panic!("{other:?}"),
        }
        drop(c);
        let mut c2 = acc.accept().unwrap().unwrap();
        match next_event(&mut c2) {
            LinkEvent::Frame(f) => assert_eq!(Message::from_frame(&f).unwrap(), Message::Info),
            other => panic!("{other:?}"),
        }
        assert!(c2.peer().starts_with("port#"), "{}", c2.peer());
    }

    #[test]
    fn a_frame_with_a_flipped_length_bit_releases_the_frames_behind_it_when_the_line_goes_quiet() {
        // A noisy line flipped bit 16 of a WRITE's length: it claims 64 KiB more than it
        // has and the INFO behind it vanishes into it. The host then waits (for an ACK),
        // the line goes quiet, and the reader finds where the frame really ends long
        // before STALE_PARTIAL would drop it (which would report it as garbage).
        let (ours, mut host) = UnixStream::pair().unwrap();
        let mut c = Conn::from_unix(ours, "t").unwrap();
        let mut bad = Frame::new(7, 0, 1, bytes::Bytes::from(vec![0x5a; 3000]))
            .unwrap()
            .to_bytes()
            .to_vec();
        bad[14] ^= 1;
        host.write_all(&bad).unwrap();
        host.write_all(&Message::Info.to_frame().unwrap().to_bytes())
            .unwrap();
        match next_event(&mut c) {
            LinkEvent::Skipped { bytes, reason } => {
                assert_eq!(bytes, 3000 + 20);
                assert_eq!(
                    reason,
                    SkipReason::CorruptLength {
                        declared: 3000 + (1 << 16),
                        actual: 3000
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        match next_event(&mut c) {
            LinkEvent::Frame(f) => assert_eq!(Message::from_frame(&f).unwrap(), Message::Info),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unix_conn_reports_a_truncated_frame_at_eof() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let mut c = Conn::from_unix(ours, "t").unwrap();
        let f = Message::Info.to_frame().unwrap().to_bytes();
        host.write_all(&f[..f.len() - 1]).unwrap();
        drop(host);
        match next_event(&mut c) {
            LinkEvent::Closed(Some(why)) => assert!(why.contains("truncated"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
