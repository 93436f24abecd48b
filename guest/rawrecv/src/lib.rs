//! rawrecv — the physical-limit baseline of `cargo xtask bench guest`.
//!
//! A tiny receiver with none of flashd's work (no framing, no journal, no staging, no
//! verification): it reads a virtio-serial port in 1 MiB blocks and writes them with
//! `O_DIRECT` into a slot partition, then fsyncs — what `dd bs=1M iflag=fullblock
//! oflag=direct` does, on the same link into the same partition as flashd. Whatever flashd
//! achieves is measured against this.
//!
//! Protocol on the port (one session per host connection, the port is opened once):
//!
//! ```text
//! host → guest   NXRAW1 len=<bytes> mode=dd|pipe hash=0|sha256|crc32 sink=part|null|state\n
//!                <len bytes>
//! guest → host   rawrecv: done bytes=<n> ms=<t> read_ms=.. write_ms=.. sync_ms=.. hash_ms=.. [digest=<hex>|crc32:<hex>]\n
//!           or   rawrecv: error <text>\n
//! ```
//!
//! * `mode=dd`: read a block, (hash it), write it, repeat — one thread, like `dd`.
//!   `mode=pipe`: a reader thread and a writer thread with [`DEPTH`] buffers in flight (the
//!   port is read while the disk writes).
//! * `hash=sha256` (or `1`): SHA-256 of the data as it passes (the guest's hashing cost);
//!   `hash=crc32`: CRC-32 (the cost of flashd's per-frame link check).
//! * `sink=part`: the partition (`O_DIRECT`, the tail through the page cache, fdatasync);
//!   `sink=null`: nothing (the link alone); `sink=state`: a buffered file on `/state` with a
//!   final fdatasync, removed afterwards (what flashd's staging file costs).
//!
//! The same line is printed on the console. The header is bounded ([`MAX_HEADER`]) and
//! validated; a length larger than the sink is refused before anything is written.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use nx_contract::markers::rawrecv as m;
use nx_contract::Marker;
pub use nx_guest::fsx::AlignedBuf;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The benchmark port (host socket `build/bench/qemu/bench.sock`).
pub const BENCH_PORT: &str = nx_contract::ports::BENCH.name;
/// The partition written by default (the one flashd installs into in recovery).
pub const DEFAULT_PARTITION: &str = "system_b";
/// Block size of reads and writes.
pub const BLOCK: usize = 1 << 20;
/// Alignment of the buffers (O_DIRECT).
pub const ALIGN: usize = nx_guest::fsx::ALIGN;
/// Longest header line accepted.
pub const MAX_HEADER: usize = 256;
/// Buffers in flight in `mode=pipe`.
pub const DEPTH: usize = 4;
/// Header magic.
pub const MAGIC: &str = "NXRAW1";
/// The file `sink=state` writes (removed after the session).
pub const STATE_FILE: &str = "/state/flash/rawrecv.bin";

/// How the data moves through the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One thread: read a block, write it.
    Dd,
    /// Reader and writer threads, [`DEPTH`] buffers.
    Pipe,
}

/// Where the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// The slot partition, O_DIRECT.
    Part,
    /// Discarded.
    Null,
    /// A buffered file on /state, fdatasync at the end.
    State,
}

/// What to compute over the data as it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    None,
    /// SHA-256 (what flashd verifies with).
    Sha256,
    /// CRC-32 (what protects every frame on flashd's link).
    Crc32,
}

/// One session's parameters (the header line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub len: u64,
    pub mode: Mode,
    pub hash: HashKind,
    pub sink: SinkKind,
}

impl Request {
    /// Parse a header line (without the newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(format!("header does not start with {MAGIC}"));
        }
        let mut req = Request {
            len: 0,
            mode: Mode::Dd,
            hash: HashKind::None,
            sink: SinkKind::Part,
        };
        let mut have_len = false;
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("header word {w:?} is not key=value"))?;
            match (k, v) {
                ("len", n) => {
                    req.len = n.parse().map_err(|_| format!("bad len {n:?}"))?;
                    have_len = true;
                }
                ("mode", "dd") => req.mode = Mode::Dd,
                ("mode", "pipe") => req.mode = Mode::Pipe,
                ("hash", "0") => req.hash = HashKind::None,
                ("hash", "1" | "sha256") => req.hash = HashKind::Sha256,
                ("hash", "crc32") => req.hash = HashKind::Crc32,
                ("sink", "part") => req.sink = SinkKind::Part,
                ("sink", "null") => req.sink = SinkKind::Null,
                ("sink", "state") => req.sink = SinkKind::State,
                _ => return Err(format!("unknown header word {w:?}")),
            }
        }
        if !have_len {
            return Err("header has no len=".into());
        }
        Ok(req)
    }

    /// The header line (with the newline).
    pub fn to_line(&self) -> String {
        format!(
            "{MAGIC} len={} mode={} hash={} sink={}\n",
            self.len,
            match self.mode {
                Mode::Dd => "dd",
                Mode::Pipe => "pipe",
            },
            match self.hash {
                HashKind::None => "0",
                HashKind::Sha256 => "sha256",
                HashKind::Crc32 => "crc32",
            },
            match self.sink {
                SinkKind::Part => "part",
                SinkKind::Null => "null",
                SinkKind::State => "state",
            }
        )
    }
}

/// What a session measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes: u64,
    /// From the header to the end of the final fsync.
    pub total: Duration,
    /// Time blocked reading the port (the link, including waiting for the host).
    pub read: Duration,
    /// Time in write(2) to the sink.
    pub write: Duration,
    /// The final fsync.
    pub sync: Duration,
    /// Time hashing.
    pub hash: Duration,
    pub digest: Option<String>,
}

impl Stats {
    /// The reply line (without the newline).
    pub fn line(&self) -> Marker {
        let ms = |d: Duration| d.as_millis();
        m::done(
            self.bytes,
            [
                ms(self.total),
                ms(self.read),
                ms(self.write),
                ms(self.sync),
                ms(self.hash),
            ],
            self.digest.as_deref(),
        )
    }

    /// Parse a reply line back (host side): `(bytes, ms)` and every `key=value` field.
    pub fn parse_fields(line: &str) -> Option<Vec<(String, String)>> {
        let rest = line.trim().strip_prefix(m::DONE_PREFIX)?;
        Some(
            rest.split_ascii_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

/// Where blocks go.
pub trait Sink: Send {
    /// Write `data` at `offset` (whole blocks, except the last one).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make everything durable.
    fn finish(&mut self) -> io::Result<()>;
}

/// Discards everything.
pub struct NullSink;

impl Sink for NullSink {
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A block device (or file) written with O_DIRECT where the length allows it, through the
/// page cache otherwise (the tail), then fdatasync.
pub struct DirectSink {
    direct: Option<File>,
    plain: File,
}

impl DirectSink {
    pub fn open(path: &Path) -> io::Result<DirectSink> {
        let plain = OpenOptions::new().write(true).open(path)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(DirectSink { direct, plain })
    }
}

impl Sink for DirectSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = data.len().is_multiple_of(ALIGN)
            && offset.is_multiple_of(ALIGN as u64)
            && (data.as_ptr() as usize).is_multiple_of(ALIGN);
        if let (true, Some(d)) = (aligned, &self.direct) {
            match d.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file system refuses O_DIRECT: the page cache it is.
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.plain.write_all_at(data, offset)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.plain.sync_data()
    }
}

/// A buffered file (flashd's staging pattern), fdatasync at the end, removed on drop.
pub struct FileSink {
    file: File,
    path: PathBuf,
}

impl FileSink {
    pub fn create(path: &Path, len: u64) -> io::Result<FileSink> {
        let file = nx_guest::fsx::create_sized(path, len)?;
        Ok(FileSink {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl Sink for FileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The running digest of a session.
enum Digest2 {
    None,
    Sha(Sha256),
    Crc(crc32fast::Hasher),
}

impl Digest2 {
    fn new(k: HashKind) -> Digest2 {
        match k {
            HashKind::None => Digest2::None,
            HashKind::Sha256 => Digest2::Sha(Sha256::new()),
            HashKind::Crc32 => Digest2::Crc(crc32fast::Hasher::new()),
        }
    }
    fn update(&mut self, d: &[u8]) {
        match self {
            Digest2::None => {}
            Digest2::Sha(h) => h.update(d),
            Digest2::Crc(h) => h.update(d),
        }
    }
    fn is_some(&self) -> bool {
        !matches!(self, Digest2::None)
    }
    fn finish(self) -> Option<String> {
        match self {
            Digest2::None => None,
            Digest2::Sha(h) => Some(hex::encode(h.finalize())),
            Digest2::Crc(h) => Some(format!("crc32:{:08x}", h.finalize())),
        }
    }
}

/// Read until `buf` is full; the host going away first is an error.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let slot = buf.get_mut(got..).unwrap_or_default();
        match input.read(slot) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("host gone after {got} of {} bytes of a block", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receive `req.len` bytes from `input` into `sink`.
pub fn receive(
    input: &mut (dyn Read + Send),
    req: &Request,
    sink: &mut dyn Sink,
) -> io::Result<Stats> {
    let start = Instant::now();
    let mut st = match req.mode {
        Mode::Dd => receive_dd(input, req, sink)?,
        Mode::Pipe => receive_pipe(input, req, sink)?,
    };
    let t = Instant::now();
    sink.finish()?;
    st.sync = t.elapsed();
    st.total = start.elapsed();
    st.bytes = req.len;
    Ok(st)
}

fn receive_dd(input: &mut dyn Read, req: &Request, sink: &mut dyn Sink) -> io::Result<Stats> {
    let mut st = Stats::default();
    let mut sha = Digest2::new(req.hash);
    let mut buf = AlignedBuf::new(BLOCK);
    let mut off = 0u64;
    while off < req.len {
        let n = (req.len - off).min(BLOCK as u64) as usize;
        let block = buf.as_mut_slice().get_mut(..n).unwrap_or_default();
        let t = Instant::now();
        read_full(input, block)?;
        st.read += t.elapsed();
        if sha.is_some() {
            let t = Instant::now();
            sha.update(block);
            st.hash += t.elapsed();
        }
        let t = Instant::now();
        sink.write_at(off, block)?;
        st.write += t.elapsed();
        off += n as u64;
    }
    st.digest = sha.finish();
    Ok(st)
}

fn receive_pipe(
    input: &mut (dyn Read + Send),
    req: &Request,
    sink: &mut dyn Sink,
) -> io::Result<Stats> {
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, usize, u64)>(DEPTH);
    for _ in 0..DEPTH {
        let _ = free_tx.send(AlignedBuf::new(BLOCK));
    }
    let hash = req.hash;
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<Stats> {
            let mut st = Stats::default();
            let mut sha = Digest2::new(hash);
            while let Ok((buf, n, off)) = full_rx.recv() {
                let block = buf.as_slice().get(..n).unwrap_or_default();
                if sha.is_some() {
                    let t = Instant::now();
                    sha.update(block);
                    st.hash += t.elapsed();
                }
                let t = Instant::now();
                sink.write_at(off, block)?;
                st.write += t.elapsed();
                // The reader may be gone (error): then the buffer is simply dropped.
                let _ = free_tx.send(buf);
            }
            st.digest = sha.finish();
            Ok(st)
        });
        let mut read = Duration::ZERO;
        let mut off = 0u64;
        let mut read_result = Ok(());
        while off < req.len {
            let Ok(mut buf) = free_rx.recv() else {
                break; // the writer failed: its error is reported below
            };
            let n = (req.len - off).min(BLOCK as u64) as usize;
            let t = Instant::now();
            let r = read_full(input, buf.as_mut_slice().get_mut(..n).unwrap_or_default());
            read += t.elapsed();
            if let Err(e) = r {
                read_result = Err(e);
                break;
            }
            if full_tx.send((buf, n, off)).is_err() {
                break;
            }
            off += n as u64;
        }
        drop(full_tx);
        let written = writer
            .join()
            .map_err(|_| io::Error::other("writer thread panicked"))?;
        read_result?;
        let mut st = written?;
        st.read = read;
        Ok(st)
    })
}

/// Open the sink of a request. `partition` is a device path for `sink=part`.
pub fn open_sink(req: &Request, partition: Option<&Path>) -> io::Result<Box<dyn Sink>> {
    match req.sink {
        SinkKind::Null => Ok(Box::new(NullSink)),
        SinkKind::State => Ok(Box::new(FileSink::create(Path::new(STATE_FILE), req.len)?)),
        SinkKind::Part => {
            let dev = partition.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("partition {DEFAULT_PARTITION} not found"),
                )
            })?;
            let cap = device_size(dev)?;
            if cap < req.len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} holds {cap} bytes, the request is {} bytes",
                        dev.display(),
                        req.len
                    ),
                ));
            }
            Ok(Box::new(DirectSink::open(dev)?))
        }
    }
}

fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    io::Seek::seek(&mut f, io::SeekFrom::End(0))
}

/// Read one header line (byte by byte, so no data byte is consumed). `Ok(None)`: no host
/// connected (EOF before any byte).
pub fn read_header(input: &mut dyn Read) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match input.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "host gone in the middle of the header",
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HEADER {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("header longer than {MAX_HEADER} bytes"),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "header is not UTF-8"))
}

/// Serve one session on an open port: header, data, reply. `Ok(false)`: no host connected.
pub fn serve_one(port: &mut File, partition: &dyn Fn() -> Option<PathBuf>) -> io::Result<bool> {
    let Some(line) = read_header(port)? else {
        return Ok(false);
    };
    let reply = match Request::parse(&line) {
        Err(e) => m::error(e),
        Ok(req) => {
            let dev = partition();
            match open_sink(&req, dev.as_deref()) {
                Err(e) => m::sink_error(e),
                Ok(mut sink) => {
                    let mut input = &*port;
                    match receive(&mut input, &req, sink.as_mut()) {
                        Ok(st) => st.line(),
                        Err(e) => m::error(e),
                    }
                }
            }
        }
    };
    nx_guest::marker::show(&reply);
    let mut out = reply.into_string().into_bytes();
    out.push(b'\n');
    // The host may already be gone: the console has the line anyway.
    let _ = port.write_all(&out);
    Ok(true)
}

/// The daemon: wait for the port, open it once read-write, serve sessions forever.
pub fn serve_forever(port_name: &str, partition_name: &str) -> ! {
    let dev = loop {
        match nx_guest::port::find(
            Path::new(nx_guest::port::SYS_VIRTIO_PORTS),
            Path::new("/dev"),
            port_name,
        ) {
            Ok(Some(p)) if p.exists() => break p,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut port = loop {
        match OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(f) => break f,
            Err(e) => {
                eprintln!("{}", m::open_retry(dev.display(), e));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    nx_guest::marker::show(&m::ready(port_name, dev.display(), partition_name));
    let part = partition_name.to_string();
    let find_part = move || {
        nx_guest::blockdev::find_partition(
            Path::new(nx_guest::blockdev::SYS_CLASS_BLOCK),
            Path::new("/dev"),
            &part,
        )
        .ok()
        .flatten()
    };
    loop {
        match serve_one(&mut port, &find_part) {
            Ok(true) => {}
            // No host connected: the port reads EOF until one connects.
            Ok(false) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                nx_guest::marker::show(&m::error(e));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_validation() {
        let r = Request {
            len: 12345,
            mode: Mode::Pipe,
            hash: HashKind::Sha256,
            sink: SinkKind::Null,
        };
        let line = r.to_line();
        assert_eq!(line, "NXRAW1 len=12345 mode=pipe hash=sha256 sink=null\n");
        assert_eq!(Request::parse(line.trim_end()).unwrap(), r);
        assert_eq!(
            Request::parse("NXRAW1 len=1 hash=crc32").unwrap().hash,
            HashKind::Crc32
        );
        assert_eq!(
            Request::parse("NXRAW1 len=1 hash=1").unwrap().hash,
            HashKind::Sha256
        );
        assert!(Request::parse("NXRAW1 mode=dd").is_err());
        assert!(Request::parse("NXRAW2 len=1").is_err());
        assert!(Request::parse("NXRAW1 len=-1").is_err());
        assert!(Request::parse("NXRAW1 len=1 sink=../x").is_err());
        assert!(Request::parse("NXRAW1 len=1 junk").is_err());
    }

    #[test]
    fn header_is_bounded_and_eof_means_no_host() {
        let mut empty: &[u8] = b"";
        assert!(read_header(&mut empty).unwrap().is_none());
        let long = vec![b'x'; MAX_HEADER + 10];
        let mut r: &[u8] = &long;
        assert!(read_header(&mut r).is_err());
        let mut r: &[u8] = b"NXRAW1 len=3\nabc";
        assert_eq!(read_header(&mut r).unwrap().unwrap(), "NXRAW1 len=3");
        assert_eq!(r, b"abc");
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn both_modes_copy_exactly_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * BLOCK + 1000;
        let src = data(n);
        let want = hex::encode(Sha256::digest(&src));
        for mode in [Mode::Dd, Mode::Pipe] {
            let out = dir.path().join(format!("{mode:?}"));
            File::create(&out)
                .unwrap()
                .set_len(4 * BLOCK as u64)
                .unwrap();
            let req = Request {
                len: n as u64,
                mode,
                hash: HashKind::Sha256,
                sink: SinkKind::Part,
            };
            let mut sink = DirectSink::open(&out).unwrap();
            let mut input: &[u8] = &src;
            let st = receive(&mut input, &req, &mut sink).unwrap();
            assert_eq!(st.bytes, n as u64);
            assert_eq!(st.digest.as_deref(), Some(want.as_str()));
            let got = std::fs::read(&out).unwrap();
            assert_eq!(&got[..n], &src[..]);
            let fields = Stats::parse_fields(st.line().as_str()).unwrap();
            assert!(fields
                .iter()
                .any(|(k, v)| k == "bytes" && *v == n.to_string()));
        }
    }

    #[test]
    fn short_input_is_an_error_in_both_modes() {
        for mode in [Mode::Dd, Mode::Pipe] {
            let src = data(BLOCK + 10);
            let req = Request {
                len: 2 * BLOCK as u64,
                mode,
                hash: HashKind::None,
                sink: SinkKind::Null,
            };
            let mut input: &[u8] = &src;
            let err = receive(&mut input, &req, &mut NullSink).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{mode:?}");
        }
    }

    #[test]
    fn a_too_small_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        File::create(&dev).unwrap().set_len(4096).unwrap();
        let req = Request {
            len: 8192,
            mode: Mode::Dd,
            hash: HashKind::None,
            sink: SinkKind::Part,
        };
        assert!(open_sink(&req, Some(&dev)).is_err());
        assert!(open_sink(&req, None).is_err());
    }
}
