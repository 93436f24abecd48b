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
use rustix::event::{PollFd, PollFlags};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
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
    writer: File,
    events: Arc<Mutex<Receiver<LinkEvent>>>,
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
            .spawn(move || reader_loop(read_half, tx, stop2, false))
            .map_err(|source| LinkError::Io {
                what: "spawn reader thread",
                source,
            })?;
        Ok(Conn {
            writer: file,
            events: Arc::new(Mutex::new(rx)),
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
        let mut buf = Vec::with_capacity(frame.encoded_len());
        frame.encode_to_vec(&mut buf);
        match write_all_bounded(&mut self.writer, &buf, WRITE_TIMEOUT) {
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
            let _ = rustix::net::shutdown(self.writer.as_fd(), rustix::net::Shutdown::Both);
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
fn reader_loop(mut src: File, tx: SyncSender<LinkEvent>, stop: Arc<AtomicBool>, persistent: bool) {
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
                    let _ = tx.send(LinkEvent::Closed(why));
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
                    if tx.send(LinkEvent::Closed(None)).is_err() {
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
                if wait_fd(&src, PollFlags::IN, POLL_INTERVAL) {
                    continue;
                }
                stalled += POLL_INTERVAL;
                if buf.is_empty() || stalled < STALE_PARTIAL {
                    continue;
                }
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
                if tx
                    .send(LinkEvent::Skipped {
                        bytes: n,
                        reason: SkipReason::Garbage,
                    })
                    .is_err()
                {
                    return;
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
                        if tx.send(LinkEvent::Closed(Some(e.to_string()))).is_err() {
                            return;
                        }
                    }
                    std::thread::sleep(HOST_POLL);
                    continue;
                }
                let _ = tx.send(LinkEvent::Closed(Some(e.to_string())));
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
            if tx.send(ev).is_err() {
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| LinkError::OpenPort {
                path: path.to_path_buf(),
                source,
            })?;
        PortAcceptor::from_file(file, path)
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
            .spawn(move || reader_loop(read_half, tx, stop2, true))
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
            writer,
            events: self.events.clone(),
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
