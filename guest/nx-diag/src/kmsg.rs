//! The kernel log, read without blocking and bounded.
//!
//! `/dev/kmsg` gives one record per `read(2)` (`pri,seq,usec,flags;message\n` plus
//! continuation lines starting with a space); opened `O_NONBLOCK`, a read returns `EAGAIN`
//! at the end of the buffer and `EPIPE` when a record was overwritten meanwhile. Records
//! become `[sssss.uuuuuu] message` lines. `/proc/kmsg` (fallback; it *consumes* what it
//! returns) gives `<pri>[ts] message` lines, kept as they are. Any other file (tests) is
//! read to its end the same way.

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::path::Path;

/// Most bytes read from the source before giving up (the kernel may keep logging).
const MAX_READ: usize = 4 << 20;

/// The text of the first source that can be opened, its path, and how many bytes were
/// dropped from the front to keep the last `cap` bytes. `Err` lists why each failed.
pub fn read(sources: &[impl AsRef<Path>], cap: usize) -> Result<(Vec<u8>, String, u64), String> {
    let mut why = Vec::new();
    for src in sources {
        let src = src.as_ref();
        match read_one(src, cap) {
            Ok((text, dropped)) => return Ok((text, src.display().to_string(), dropped)),
            Err(e) => why.push(format!("{}: {e}", src.display())),
        }
    }
    Err(if why.is_empty() {
        "no kernel log source configured".into()
    } else {
        why.join("; ")
    })
}

fn read_one(path: &Path, cap: usize) -> Result<(Vec<u8>, u64), Errno> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    let mut out = Tail::new(cap);
    loop {
        match rustix::io::read(&fd, &mut buf[..]) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                raw.extend_from_slice(buf.get(..n).unwrap_or_default());
                // Format complete lines as they arrive, keep memory bounded.
                if let Some(last_nl) = raw.iter().rposition(|&b| b == b'\n') {
                    let rest = raw.split_off(last_nl + 1);
                    for line in raw.split(|&b| b == b'\n') {
                        format_line(line, &mut out);
                    }
                    raw = rest;
                }
                if raw.len() > 64 * 1024 {
                    // A "line" this long is not a log line: keep its tail only.
                    let cut = raw.len() - 64 * 1024;
                    raw.drain(..cut);
                }
                if total >= MAX_READ {
                    break;
                }
            }
            Err(Errno::AGAIN) => break,
            Err(Errno::PIPE | Errno::INTR) => continue,
            Err(e) => {
                if total == 0 {
                    return Err(e);
                }
                break;
            }
        }
    }
    for line in raw.split(|&b| b == b'\n') {
        format_line(line, &mut out);
    }
    Ok(out.finish())
}

/// `pri,seq,usec,flags;message` → `[sssss.uuuuuu] message`; continuation lines (leading
/// space) are dropped; anything else is kept as it is. Empty lines are dropped.
fn format_line(line: &[u8], out: &mut Tail) {
    if line.is_empty() || line.first() == Some(&b' ') {
        return;
    }
    if let Some(semi) = line.iter().position(|&b| b == b';') {
        let head = line.get(..semi).unwrap_or_default();
        let fields: Vec<&[u8]> = head.split(|&b| b == b',').collect();
        if fields.len() >= 3
            && fields
                .iter()
                .take(3)
                .all(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit))
        {
            let usec: u64 = std::str::from_utf8(fields.get(2).copied().unwrap_or_default())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            out.push(format!("[{:5}.{:06}] ", usec / 1_000_000, usec % 1_000_000).as_bytes());
            out.push(line.get(semi + 1..).unwrap_or_default());
            out.push(b"\n");
            return;
        }
    }
    out.push(line);
    out.push(b"\n");
}

/// Keeps the last `cap` bytes of what is pushed (amortised: trims at twice the cap).
pub(crate) struct Tail {
    cap: usize,
    buf: Vec<u8>,
    dropped: u64,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        Tail {
            cap,
            buf: Vec::new(),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap.saturating_mul(2).max(4096) {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    pub(crate) fn finish(mut self) -> (Vec<u8>, u64) {
        self.trim();
        (self.buf, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records_are_formatted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kmsg");
        std::fs::write(
            &p,
            "6,1,5140900,-;NET: Registered\n SUBSYSTEM=net\n4,2,12000001,c;virtio_blk virtio1: [vda]\n<6>[    1.0] proc style\n",
        )
        .unwrap();
        let (text, src, dropped) = read(&[d.path().join("missing"), p.clone()], 1000).unwrap();
        assert_eq!(src, p.display().to_string());
        assert_eq!(dropped, 0);
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "[    5.140900] NET: Registered\n[   12.000001] virtio_blk virtio1: [vda]\n<6>[    1.0] proc style\n"
        );
    }

    #[test]
    fn tail_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kmsg");
        let mut s = String::new();
        for i in 0..10_000 {
            s.push_str(&format!("6,{i},{i},-;line {i}\n"));
        }
        std::fs::write(&p, s).unwrap();
        let (text, _, dropped) = read(&[p], 1024).unwrap();
        assert_eq!(text.len(), 1024);
        assert!(dropped > 0);
        assert!(String::from_utf8(text).unwrap().ends_with("line 9999\n"));
        assert!(read(&[d.path().join("none")], 10)
            .unwrap_err()
            .contains("none"));
    }
}
