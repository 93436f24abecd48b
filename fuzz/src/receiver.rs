//! The receiver state machine against a hostile host.
//!
//! A real [`Sender`] produces correct traffic for a small fixed image; the fuzz input decides,
//! frame by frame, what the "host" does with it: deliver, drop, duplicate, deliver with its
//! payload altered (a host that lies, with a valid CRC), inject a frame of its own making,
//! report corruption, cut the link, or let time pass. A simulated target executes the
//! receiver's actions on an in-memory staging area.
//!
//! Invariants (a panic is a finding):
//! - staging is never larger than the configured bound, every write and verification lies
//!   inside it, a raw write carries exactly `len` bytes, a copy reads only the installed image;
//! - nothing is installed unless every segment of the written head's manifest hashes to the
//!   manifest's SHA-256 in staging (nothing installed unverified);
//! - every frame the receiver sends encodes and decodes as a valid message;
//! - the receiver's action queue stays bounded.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use proto::frame::Frame;
use proto::image::{layout, ImageHead};
use proto::manifest::SegmentHasher;
use proto::msg::{chunk_hash, Message, WriteBody};
use proto::session::{
    InstalledImage, Receiver, ReceiverAction, ReceiverConfig, ReceiverEvent, Sender, SenderAction,
    SenderConfig, SenderEvent,
};
use sha2::{Digest, Sha256};

/// Largest image the simulated target accepts.
const MAX_IMAGE: u64 = 1 << 20;
/// Most actions the receiver may queue for one event.
const MAX_QUEUED: usize = 4096;
/// Most steps of one input.
const MAX_STEPS: usize = 4096;

/// The image the honest part of the host sends: two segments, data and zero runs.
fn image() -> &'static (Vec<u8>, Bytes) {
    static IMG: OnceLock<(Vec<u8>, Bytes)> = OnceLock::new();
    IMG.get_or_init(|| {
        let mut rootfs = vec![0u8; 5 * 4096];
        for (i, b) in rootfs.iter_mut().enumerate().take(3 * 4096) {
            *b = (i * 7 % 251) as u8;
        }
        let kernel: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8 + 1).collect();
        let segs = [("kernel", kernel), ("rootfs", rootfs)];
        let parts: Vec<(String, _)> = segs
            .iter()
            .map(|(n, d)| {
                let mut h = SegmentHasher::new();
                h.update(d);
                (n.to_string(), h.finish())
            })
            .collect();
        let (bytes, head) = match layout("1", &parts).and_then(|m| {
            let head = ImageHead::build(&m, None)?.to_bytes();
            Ok((m, head))
        }) {
            Ok((m, head)) => {
                let mut bytes = vec![0u8; usize::try_from(m.total_size).unwrap_or(0)];
                bytes[..head.len()].copy_from_slice(&head);
                for (seg, (_, d)) in m.segments.iter().zip(&segs) {
                    let o = usize::try_from(seg.offset).unwrap_or(0);
                    bytes[o..o + d.len()].copy_from_slice(d);
                }
                (bytes, Bytes::from(head))
            }
            Err(e) => panic!("the fuzz image does not build: {e}"),
        };
        (bytes, head)
    })
}

/// The fuzz input, read front to back; zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> u32 {
        let mut v = 0u32;
        for _ in 0..4 {
            v = (v << 8) | u32::from(self.u8().unwrap_or(0));
        }
        v
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.u8().unwrap_or(0))
            .min(max)
            .min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// The simulated target.
struct Target {
    rx: Receiver,
    staging: Vec<u8>,
    installed: Option<Vec<u8>>,
    installed_rec: Option<InstalledImage>,
    out: VecDeque<Frame>,
}

impl Target {
    fn handle(&mut self, ev: ReceiverEvent) {
        self.rx.handle(ev);
        self.run();
    }

    fn run(&mut self) {
        let mut done = 0usize;
        while let Some(a) = self.rx.poll_action() {
            done += 1;
            assert!(
                done <= MAX_QUEUED,
                "the receiver queued more than {MAX_QUEUED} actions"
            );
            self.act(a);
        }
    }

    fn act(&mut self, a: ReceiverAction) {
        match a {
            ReceiverAction::Send(f) => {
                let m = Message::from_frame(&f)
                    .unwrap_or_else(|e| panic!("the receiver sent an undecodable frame: {e}"));
                let again = m.to_frame().map(|g| Message::from_frame(&g));
                assert!(
                    matches!(again, Ok(Ok(ref x)) if *x == m),
                    "{m:?} does not round-trip"
                );
                if self.out.len() < 1024 {
                    self.out.push_back(f);
                }
            }
            ReceiverAction::Report(_) => {}
            ReceiverAction::OpenStaging {
                total_size, fresh, ..
            } => {
                assert!(
                    total_size <= MAX_IMAGE,
                    "staging of {total_size} bytes opened beyond the {MAX_IMAGE}-byte bound"
                );
                let n = usize::try_from(total_size).unwrap_or(usize::MAX);
                if fresh {
                    self.staging = vec![0; n];
                } else {
                    self.staging.resize(n, 0);
                }
            }
            ReceiverAction::WriteHead(h) => {
                assert!(h.len() <= self.staging.len(), "head beyond staging");
                self.staging[..h.len()].copy_from_slice(&h);
            }
            ReceiverAction::Write {
                offset, len, body, ..
            } => self.write(offset, len, body),
            ReceiverAction::SyncStaging { upto_seq } => {
                self.rx.handle(ReceiverEvent::StagingSynced { upto_seq });
            }
            ReceiverAction::PersistJournal(_) | ReceiverAction::ClearJournal => {}
            ReceiverAction::VerifySegment {
                ticket,
                offset,
                size,
                sha256,
                ..
            } => {
                let r = range(offset, u64::from(u32::MAX).min(size), self.staging.len())
                    .unwrap_or_else(|| panic!("verification of {offset}+{size} beyond staging"));
                let ok = Sha256::digest(&self.staging[r])[..] == sha256;
                self.rx
                    .handle(ReceiverEvent::SegmentVerified { ticket, ok });
            }
            ReceiverAction::Install {
                image_id,
                image_sha256,
                total_size,
                unchanged,
            } => {
                if !unchanged {
                    self.check_verified(total_size);
                    self.installed = Some(self.staging.clone());
                    self.installed_rec = Some(InstalledImage {
                        image_id,
                        image_sha256,
                        total_size,
                        version: "1".into(),
                        index: None,
                    });
                }
                self.rx.handle(ReceiverEvent::Installed {
                    ok: true,
                    detail: String::new(),
                });
                self.rx.set_installed(self.installed_rec.clone());
            }
        }
    }

    fn write(&mut self, offset: u64, len: u32, body: WriteBody) {
        let n = len as usize;
        let r = range(offset, u64::from(len), self.staging.len())
            .unwrap_or_else(|| panic!("write of {len} bytes at {offset} beyond staging"));
        let data = match body {
            WriteBody::Raw(d) => {
                assert_eq!(d.len(), n, "raw write length differs from len");
                d.to_vec()
            }
            WriteBody::Zero => vec![0; n],
            WriteBody::Zstd(d) => match zstd::bulk::decompress(&d, n) {
                Ok(v) if v.len() == n => v,
                _ => {
                    self.rx.handle(ReceiverEvent::ActionFailed {
                        code: proto::msg::ErrorCode::BadWrite,
                        text: "bad compressed data".into(),
                    });
                    return;
                }
            },
            // The harness's receiver does not offer DERIVE.
            WriteBody::Derive => panic!("DERIVE passed the receiver though it was not negotiated"),
            WriteBody::Patch {
                source,
                ref_offset,
                ref_len,
                frame,
            } => {
                // The harness offers no base: the receiver must only let staging patches
                // through, and only with a reference before the chunk.
                assert_eq!(
                    source,
                    proto::msg::PatchSource::Staging,
                    "PATCH from {source:?} passed the receiver without a base"
                );
                let end = ref_offset + u64::from(ref_len);
                assert!(
                    end <= offset,
                    "PATCH reference {ref_offset}+{ref_len} is not before {offset}"
                );
                let prefix = &self.staging[ref_offset as usize..end as usize];
                let mut d = zstd::zstd_safe::DCtx::create();
                let mut out = Vec::with_capacity(n);
                let ok = d.ref_prefix(prefix).is_ok()
                    && matches!(d.decompress(&mut out, &frame), Ok(k) if k == n);
                if !ok {
                    self.rx.handle(ReceiverEvent::ActionFailed {
                        code: proto::msg::ErrorCode::BadWrite,
                        text: "bad patch data".into(),
                    });
                    return;
                }
                out
            }
            WriteBody::Copy { src_offset, hash } => {
                let inst = self
                    .installed
                    .as_ref()
                    .unwrap_or_else(|| panic!("copy with nothing installed"));
                let s = range(src_offset, u64::from(len), inst.len())
                    .unwrap_or_else(|| panic!("copy from {src_offset}+{len} beyond the install"));
                let d = inst[s].to_vec();
                if chunk_hash(&d) != hash {
                    self.rx.handle(ReceiverEvent::ActionFailed {
                        code: proto::msg::ErrorCode::Storage,
                        text: "copy source changed".into(),
                    });
                    return;
                }
                d
            }
        };
        self.staging[r].copy_from_slice(&data);
    }

    /// Every segment of the head in staging hashes to its manifest SHA-256.
    fn check_verified(&self, total_size: u64) {
        assert!(
            total_size as usize <= self.staging.len(),
            "install beyond staging"
        );
        let data_offset = proto::image::Header::parse(&self.staging)
            .map(|h| h.data_offset)
            .unwrap_or_else(|e| panic!("install of a staging area without a header: {e}"));
        let end = usize::try_from(data_offset)
            .unwrap_or(usize::MAX)
            .min(self.staging.len());
        let head = ImageHead::parse(&self.staging[..end])
            .unwrap_or_else(|e| panic!("install of a staging area whose head does not parse: {e}"));
        for seg in &head.manifest.segments {
            let r = range(seg.offset, seg.size, self.staging.len())
                .unwrap_or_else(|| panic!("segment {} beyond staging", seg.name));
            assert!(
                Sha256::digest(&self.staging[r])[..] == seg.sha256,
                "segment {} installed unverified",
                seg.name
            );
        }
    }
}

fn range(offset: u64, len: u64, size: usize) -> Option<std::ops::Range<usize>> {
    let end = offset.checked_add(len)?;
    if end > size as u64 {
        return None;
    }
    Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
}

/// Answer the sender's reads and compressions; collect its frames.
fn host_run(tx: &mut Sender, now: Duration, img: &[u8], out: &mut VecDeque<Frame>) {
    while let Some(a) = tx.poll_action() {
        match a {
            SenderAction::Send(f) => {
                if out.len() < 1024 {
                    out.push_back(f);
                }
            }
            SenderAction::ReadChunk {
                seq,
                offset,
                len,
                hash,
            } => {
                let Some(r) = range(offset, u64::from(len), img.len()) else {
                    tx.handle(
                        now,
                        SenderEvent::ReadFailed {
                            seq,
                            detail: "beyond the image".into(),
                        },
                    );
                    continue;
                };
                let d = Bytes::copy_from_slice(&img[r]);
                let h = hash.then(|| chunk_hash(&d));
                tx.handle(
                    now,
                    SenderEvent::ChunkRead {
                        seq,
                        data: d,
                        hash: h,
                    },
                );
            }
            SenderAction::Compress { seq, data, .. } => {
                let c = zstd::bulk::compress(&data, 1)
                    .ok()
                    .map(|z| WriteBody::Zstd(Bytes::from(z)));
                tx.handle(now, SenderEvent::Compressed { seq, body: c });
            }
            SenderAction::Progress(_) | SenderAction::Finished(_) | SenderAction::Failed(_) => {}
        }
    }
}

/// One input: a script of host behaviour.
pub fn run(data: &[u8]) {
    let (img, head) = image();
    let mut input = Input(data);
    let mut cfg = ReceiverConfig::new("fuzz-target");
    cfg.max_image_size = MAX_IMAGE;
    let first = input.u8().unwrap_or(0);
    cfg.max_chunk = 4096 << (first % 5);
    cfg.zstd = true;
    // The trust policy from the same byte: unprovisioned, a floor above the image's security
    // version (refused, or taken with --allow-downgrade), or a key the image is not signed with.
    cfg.trust = match (first >> 5) % 3 {
        0 => proto::trust::TrustPolicy::default(),
        1 => proto::trust::TrustPolicy {
            floor: 1,
            ..proto::trust::TrustPolicy::default()
        },
        _ => proto::trust::TrustPolicy {
            keys: vec![proto::trust::TrustedKey {
                name: "fuzz".into(),
                key: proto::image::public_key_of(&[3u8; 32]),
                development: false,
            }],
            floor: 0,
            broken: None,
        },
    };
    let mut t = Target {
        rx: Receiver::new(cfg, None, None),
        staging: Vec::new(),
        installed: None,
        installed_rec: None,
        out: VecDeque::new(),
    };
    let mut scfg = SenderConfig::new("fuzz-host");
    scfg.allow_downgrade = first & 0x10 != 0;
    scfg.window = u16::from(input.u8().unwrap_or(0) % 8) + 1;
    scfg.chunk_size = 4096 << (input.u8().unwrap_or(0) % 3);
    let Ok(mut tx) = Sender::new(scfg.clone(), head.clone()) else {
        return;
    };
    let mut now = Duration::ZERO;
    let mut to_target: VecDeque<Frame> = VecDeque::new();
    tx.start(now);
    host_run(&mut tx, now, img, &mut to_target);
    for _ in 0..MAX_STEPS {
        let Some(op) = input.u8() else { break };
        match op % 12 {
            // Deliver the host's next frame (most of the time).
            0..=4 => {
                if let Some(f) = to_target.pop_front() {
                    t.handle(ReceiverEvent::Frame(f));
                }
            }
            // Drop it.
            5 => {
                to_target.pop_front();
            }
            // Deliver it twice.
            6 => {
                if let Some(f) = to_target.front().cloned() {
                    t.handle(ReceiverEvent::Frame(f));
                }
            }
            // Alter its payload (a lying host: the CRC is valid).
            7 => {
                if let Some(f) = to_target.pop_front() {
                    let mut p = f.payload().to_vec();
                    let at = input.u32() as usize;
                    if !p.is_empty() {
                        let i = at % p.len();
                        p[i] ^= input.u8().unwrap_or(1) | 1;
                    } else {
                        p.extend(input.bytes(64));
                    }
                    if let Ok(g) = Frame::new(f.msg_type(), f.flags(), f.seq(), Bytes::from(p)) {
                        t.handle(ReceiverEvent::Frame(g));
                    }
                }
            }
            // A frame of the host's own making.
            8 => {
                let ty = input.u8().unwrap_or(0);
                let seq = input.u32();
                let p = input.bytes(255);
                if let Ok(g) = Frame::new(ty, 0, seq, Bytes::from(p)) {
                    t.handle(ReceiverEvent::Frame(g));
                }
            }
            // Garbage on the line, a cut link.
            9 => t.handle(ReceiverEvent::Corrupt {
                bytes: usize::from(input.u8().unwrap_or(1)),
            }),
            // A cut link: the host reconnects with a new session (a resume).
            10 => {
                t.handle(ReceiverEvent::LinkDown);
                to_target.clear();
                t.out.clear();
                let Ok(fresh) = Sender::new(scfg.clone(), head.clone()) else {
                    return;
                };
                tx = fresh;
                tx.start(now);
            }
            // Time passes for the host.
            _ => {
                now += Duration::from_millis(u64::from(input.u8().unwrap_or(0)) * 50);
                tx.handle(now, SenderEvent::Tick);
            }
        }
        // The target's answers reach the host.
        while let Some(f) = t.out.pop_front() {
            tx.handle(now, SenderEvent::Frame(f));
        }
        host_run(&mut tx, now, img, &mut to_target);
    }
}

/// The head of the fuzz image (a seed of the image target).
pub fn fuzz_head() -> Bytes {
    image().1.clone()
}

/// Every frame of one honest, complete session in both directions.
pub fn honest_frames() -> Vec<Frame> {
    let (img, head) = image();
    let mut t = Target {
        rx: Receiver::new(ReceiverConfig::new("fuzz-target"), None, None),
        staging: Vec::new(),
        installed: None,
        installed_rec: None,
        out: VecDeque::new(),
    };
    let Ok(mut tx) = Sender::new(SenderConfig::new("fuzz-host"), head.clone()) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    let mut to_target = VecDeque::new();
    tx.start(Duration::ZERO);
    host_run(&mut tx, Duration::ZERO, img, &mut to_target);
    for _ in 0..MAX_STEPS {
        let Some(f) = to_target.pop_front() else {
            break;
        };
        all.push(f.clone());
        t.handle(ReceiverEvent::Frame(f));
        while let Some(g) = t.out.pop_front() {
            all.push(g.clone());
            tx.handle(Duration::ZERO, SenderEvent::Frame(g));
        }
        host_run(&mut tx, Duration::ZERO, img, &mut to_target);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            rx: Receiver::new(ReceiverConfig::new("t"), None, None),
            staging: vec![0; 8192],
            installed: None,
            installed_rec: None,
            out: VecDeque::new(),
        }
    }

    #[test]
    #[should_panic(expected = "beyond staging")]
    fn a_write_beyond_staging_is_a_finding() {
        target().write(8000, 4096, WriteBody::Zero);
    }

    #[test]
    #[should_panic(expected = "installed unverified")]
    fn an_install_of_unverified_bytes_is_a_finding() {
        let mut t = target();
        let (img, _) = image();
        t.staging = img.clone();
        let last = t.staging.len() - 1;
        t.staging[last - 5 * 4096 + 1] ^= 1; // inside rootfs's data
        t.check_verified(img.len() as u64);
    }

    #[test]
    fn the_honest_image_verifies() {
        let mut t = target();
        t.staging = image().0.clone();
        t.check_verified(t.staging.len() as u64);
    }
}
