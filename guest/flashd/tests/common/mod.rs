//! A minimal blocking client for driving flashd in tests: raw frames in and out, and a
//! stop-and-wait sender built on the shared chunk plan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::{Bytes, BytesMut};
use proto::frame::{Frame, FrameDecoder, FrameError};
use proto::image::ImageHead;
use proto::msg::{Done, Hello, HelloReply, Message, Write, WriteBody, PROTO_VERSION};
use proto::session::Plan;
use std::io::{Read, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Client {
    s: UnixStream,
    dec: FrameDecoder,
    buf: BytesMut,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let t = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    return Client {
                        s,
                        dec: FrameDecoder::new(),
                        buf: BytesMut::new(),
                    }
                }
                Err(e) if t.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        }
    }

    pub fn send(&mut self, m: Message) {
        let f = m.to_frame().unwrap();
        self.send_frame(&f);
    }

    pub fn send_frame(&mut self, f: &Frame) {
        self.send_raw(&f.to_bytes());
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Next message, or None on timeout/EOF.
    pub fn recv(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(Message::from_frame(&f).unwrap()),
                Ok(None) => {}
                Err(FrameError::Skipped { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// Receive until a message matching `pred` (others are skipped); panics on timeout.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("timeout waiting for {what}"));
            match self.recv(left) {
                Some(m) if pred(&m) => return m,
                Some(_) => continue,
                None => panic!("no {what} (timeout or EOF)"),
            }
        }
    }
}

pub fn hello(head: &[u8], window: u16, chunk: u32) -> Message {
    Message::Hello(Hello {
        allow_downgrade: false,
        exact_chunk: false,
        proto: PROTO_VERSION,
        nonce: 7,
        window,
        chunk_size: chunk,
        compression: 0,
        skip: true,
        host: "testhost".into(),
        head: Bytes::copy_from_slice(head),
    })
}

pub fn head_of(image: &[u8]) -> (ImageHead, Vec<u8>) {
    let h = proto::image::Header::parse(&image[..4096]).unwrap();
    let head = image[..h.data_offset as usize].to_vec();
    (ImageHead::parse(&head).unwrap(), head)
}

/// A stop-and-wait sender. Returns Ok(resume_seq of the HELLO_REPLY) when done (or, with
/// `stop_after`, once that many chunks are acknowledged), Err((code, text)) on an ERROR.
pub fn send_image(
    c: &mut Client,
    image: &[u8],
    window: u16,
    chunk: u32,
    stop_after: Option<u32>,
) -> Result<u32, (u16, String)> {
    let (parsed, head) = head_of(image);
    c.send(hello(&head, window, chunk));
    let reply: HelloReply = loop {
        match c.recv(Duration::from_secs(10)).expect("HELLO_REPLY") {
            Message::HelloReply(r) => break r,
            Message::Error(e) => return Err((e.code.code(), e.text)),
            _ => continue,
        }
    };
    let m = parsed.manifest;
    let plan = Plan::new(&m, reply.chunk_size).unwrap();
    if !reply.already_installed {
        for ch in plan.chunks_from(reply.resume_seq + 1) {
            let seg = &m.segments[ch.segment];
            let data = &image[ch.offset as usize..(ch.offset + u64::from(ch.len)) as usize];
            c.send(Message::Write(Write {
                seq: ch.seq,
                segment: seg.name.clone(),
                offset: ch.rel_offset,
                len: ch.len,
                body: WriteBody::Raw(Bytes::copy_from_slice(data)),
            }));
            let acked = loop {
                match c.recv(Duration::from_secs(10)).expect("ACK") {
                    Message::Ack(a) if a.ack >= ch.seq => break a.ack,
                    Message::Error(e) => return Err((e.code.code(), e.text)),
                    _ => continue,
                }
            };
            if stop_after.is_some_and(|n| acked >= n) {
                return Ok(reply.resume_seq);
            }
        }
    }
    c.send(Message::Done(Done {
        image_sha256: m.image_sha256,
    }));
    loop {
        match c.recv(Duration::from_secs(30)).expect("DONE_REPLY") {
            Message::DoneReply(d) if d.status != proto::msg::DoneStatus::Pending => {
                return Ok(reply.resume_seq)
            }
            Message::Error(e) => return Err((e.code.code(), e.text)),
            _ => continue,
        }
    }
}

/// A temp dir with the socket path, an empty state dir and the install path of one test.
pub fn workdir() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (sock, state, out) = (
        dir.path().join("s.sock"),
        dir.path().join("state"),
        dir.path().join("out.img"),
    );
    std::fs::create_dir(&state).unwrap();
    (dir, sock, state, out)
}
