//! Shared helpers for the session tests: test images, a simulated target shell
//! (staging with a page cache that a crash can lose, journal, install) and a host
//! shell. Pure proto, no tokio.

use bytes::{Bytes, BytesMut};
use proto::frame::{Frame, FrameDecoder, FrameError};
use proto::image::{layout, ImageHead};
use proto::manifest::{Manifest, SegmentHasher};
use proto::msg::{chunk_hash, Message, WriteBody};
use proto::session::*;
use sha2::{Digest, Sha256};

/// A built image: the file bytes, its head and manifest.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub bytes: Vec<u8>,
    pub head: Bytes,
    pub manifest: Manifest,
}

pub fn build_image(version: &str, segs: &[(&str, Vec<u8>)]) -> TestImage {
    let parts: Vec<(String, _)> = segs
        .iter()
        .map(|(n, d)| {
            let mut h = SegmentHasher::new();
            h.update(d);
            (n.to_string(), h.finish())
        })
        .collect();
    let manifest = layout(version, &parts).unwrap();
    let head = ImageHead::build(&manifest, None).unwrap().to_bytes();
    let mut bytes = vec![0u8; manifest.total_size as usize];
    bytes[..head.len()].copy_from_slice(&head);
    for (seg, (_, d)) in manifest.segments.iter().zip(segs) {
        let o = seg.offset as usize;
        bytes[o..o + d.len()].copy_from_slice(d);
    }
    TestImage {
        bytes,
        head: Bytes::from(head),
        manifest,
    }
}

/// Deterministic PRNG (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Pseudo-random, compressible-ish and sparse segment content.
pub fn content(rng: &mut Rng, len: usize, sparse: bool) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut i = 0;
    while i < len {
        let block = 4096.min(len - i);
        let kind = rng.below(4);
        if !(sparse && kind == 0) {
            if kind == 1 {
                let b = rng.next() as u8 | 1;
                v[i..i + block].fill(b); // compressible
            } else {
                let r = rng.bytes(block);
                v[i..i + block].copy_from_slice(&r);
            }
        }
        i += block;
    }
    v
}

/// Stand-in for zstd in these pure tests (proto has no zstd dependency; the state
/// machines only carry the flag): a byte-level run-length code.
pub fn rle_encode(d: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let b = d[i];
        let mut n = 1;
        while i + n < d.len() && d[i + n] == b && n < 255 {
            n += 1;
        }
        out.push(n as u8);
        out.push(b);
        i += n;
    }
    out
}

pub fn rle_decode(d: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for p in d.chunks(2) {
        if p.len() != 2 || p[0] == 0 || out.len() + p[0] as usize > max {
            return None;
        }
        out.extend(std::iter::repeat_n(p[1], p[0] as usize));
    }
    Some(out)
}

pub fn frames_of(actions: &[ReceiverAction]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            ReceiverAction::Send(f) => Some(Message::from_frame(f).unwrap()),
            _ => None,
        })
        .collect()
}

/// The console line flashd prints for a report (`None`: a log line, not a marker).
pub fn marker_of(r: &ReceiverReport) -> Option<String> {
    use nx_contract::markers::flashd as m;
    let line = match r {
        ReceiverReport::Hello { host, proto } => m::hello(host, proto),
        ReceiverReport::Error { code, text } => m::error(code.code(), text),
        ReceiverReport::SegmentWritten { segment, bytes } => m::wrote(segment, *bytes),
        ReceiverReport::VerifyOk => m::verify_ok(),
        ReceiverReport::VerifyFailed { segment } => m::verify_failed(segment),
        ReceiverReport::Installed => m::installed(),
        ReceiverReport::Refused { reason } => m::refused(reason),
        _ => return None,
    };
    Some(line.into_string())
}

pub fn markers_of(actions: &[ReceiverAction]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            ReceiverAction::Report(r) => marker_of(r),
            _ => None,
        })
        .collect()
}

pub fn drain_rx(rx: &mut Receiver) -> Vec<ReceiverAction> {
    std::iter::from_fn(|| rx.poll_action()).collect()
}

pub fn drain_tx(tx: &mut Sender) -> Vec<SenderAction> {
    std::iter::from_fn(|| tx.poll_action()).collect()
}

/// The simulated target: a receiver and its storage.
pub struct Target {
    pub cfg: ReceiverConfig,
    pub rx: Receiver,
    /// What reads see (page cache).
    pub cache: Vec<u8>,
    /// What survives a crash (synced).
    pub disk: Vec<u8>,
    /// The journal as persisted (JSON, like flashd would write it).
    pub journal_json: Option<String>,
    pub installed: Option<Vec<u8>>,
    pub installed_rec: Option<InstalledImage>,
    pub markers: Vec<String>,
    pub installs: u32,
    /// Chunk size for the skip index built at install time.
    pub index_chunk: Option<u32>,
    /// Syncs are answered only when `flush_syncs` runs (models a background fsync).
    pub lazy_sync: bool,
    pub pending_syncs: Vec<u32>,
    pub out: Vec<Frame>,
    pub writes: u64,
    pub copies: u64,
}

impl Target {
    pub fn new(cfg: ReceiverConfig) -> Target {
        Target {
            rx: Receiver::new(cfg.clone(), None, None),
            cfg,
            cache: Vec::new(),
            disk: Vec::new(),
            journal_json: None,
            installed: None,
            installed_rec: None,
            markers: Vec::new(),
            installs: 0,
            index_chunk: Some(65536),
            lazy_sync: false,
            pending_syncs: Vec::new(),
            out: Vec::new(),
            writes: 0,
            copies: 0,
        }
    }

    pub fn journal(&self) -> Option<Journal> {
        self.journal_json
            .as_ref()
            .map(|j| serde_json::from_str(j).unwrap())
    }

    /// Kill flashd and the OS: unsynced writes are lost, the receiver restarts from
    /// the persisted journal.
    pub fn crash_and_restart(&mut self) {
        self.cache = self.disk.clone();
        self.pending_syncs.clear();
        self.rx = Receiver::new(self.cfg.clone(), self.journal(), self.installed_rec.clone());
    }

    pub fn handle(&mut self, ev: ReceiverEvent) {
        self.rx.handle(ev);
        self.run();
    }

    pub fn flush_syncs(&mut self) {
        let p = std::mem::take(&mut self.pending_syncs);
        for upto in p {
            self.disk = self.cache.clone();
            self.handle(ReceiverEvent::StagingSynced { upto_seq: upto });
        }
    }

    /// Executes actions in order until none are left.
    pub fn run(&mut self) {
        while let Some(a) = self.rx.poll_action() {
            match a {
                ReceiverAction::Send(f) => self.out.push(f),
                ReceiverAction::Report(r) => self.markers.extend(marker_of(&r)),
                ReceiverAction::OpenStaging {
                    total_size, fresh, ..
                } => {
                    if fresh {
                        self.cache = vec![0; total_size as usize];
                        self.disk = self.cache.clone();
                    } else {
                        self.cache.resize(total_size as usize, 0);
                        self.disk.resize(total_size as usize, 0);
                    }
                }
                ReceiverAction::WriteHead(h) => self.cache[..h.len()].copy_from_slice(&h),
                ReceiverAction::Write {
                    offset, len, body, ..
                } => {
                    let o = offset as usize;
                    let n = len as usize;
                    self.writes += 1;
                    let data = match body {
                        WriteBody::Raw(d) => d.to_vec(),
                        WriteBody::Zero => vec![0; n],
                        WriteBody::Zstd(d) => match rle_decode(&d, n) {
                            Some(v) if v.len() == n => v,
                            _ => {
                                self.rx.handle(ReceiverEvent::ActionFailed {
                                    code: proto::msg::ErrorCode::BadWrite,
                                    text: "bad compressed data".into(),
                                });
                                continue;
                            }
                        },
                        WriteBody::Patch { .. } | WriteBody::Derive => {
                            unreachable!("this harness negotiates neither PATCH nor DERIVE")
                        }
                        WriteBody::Copy { src_offset, .. } => {
                            self.copies += 1;
                            let s = src_offset as usize;
                            self.installed.as_ref().unwrap()[s..s + n].to_vec()
                        }
                    };
                    self.cache[o..o + n].copy_from_slice(&data);
                }
                ReceiverAction::SyncStaging { upto_seq } => {
                    if self.lazy_sync {
                        self.pending_syncs.push(upto_seq);
                    } else {
                        self.disk = self.cache.clone();
                        self.rx.handle(ReceiverEvent::StagingSynced { upto_seq });
                    }
                }
                ReceiverAction::PersistJournal(j) => {
                    self.journal_json = Some(serde_json::to_string(&j).unwrap());
                }
                ReceiverAction::ClearJournal => self.journal_json = None,
                ReceiverAction::VerifySegment {
                    ticket,
                    offset,
                    size,
                    sha256,
                    ..
                } => {
                    let o = offset as usize;
                    let ok = Sha256::digest(&self.cache[o..o + size as usize])[..] == sha256;
                    self.rx
                        .handle(ReceiverEvent::SegmentVerified { ticket, ok });
                }
                ReceiverAction::Install {
                    image_id,
                    image_sha256,
                    total_size,
                    unchanged,
                } => {
                    self.installs += 1;
                    if !unchanged {
                        let img = self.cache[..total_size as usize].to_vec();
                        // Everything the test installs must be a valid image.
                        let head = ImageHead::parse(
                            &img[..proto::image::Header::parse(&img).unwrap().data_offset as usize],
                        )
                        .unwrap();
                        let index = self.index_chunk.map(|c| {
                            let plan = Plan::new(&head.manifest, c).unwrap();
                            SkipIndex::build(&head.manifest, &plan, |o, l| {
                                Ok::<_, ()>(img[o as usize..o as usize + l as usize].to_vec())
                            })
                            .unwrap()
                        });
                        self.installed = Some(img);
                        self.installed_rec = Some(InstalledImage {
                            image_id,
                            image_sha256,
                            total_size,
                            version: head.manifest.version.clone(),
                            index,
                        });
                        self.disk = self.cache.clone();
                    }
                    self.rx.handle(ReceiverEvent::Installed {
                        ok: true,
                        detail: String::new(),
                    });
                    self.rx.set_installed(self.installed_rec.clone());
                }
            }
        }
    }
}

/// The host shell: answers reads, hashes and compression immediately.
pub fn host_run(
    tx: &mut Sender,
    now: std::time::Duration,
    image: &[u8],
    out: &mut Vec<Frame>,
    log: &mut Vec<SenderAction>,
) {
    while let Some(a) = tx.poll_action() {
        match a {
            SenderAction::Send(f) => out.push(f),
            SenderAction::ReadChunk {
                seq,
                offset,
                len,
                hash,
            } => {
                let d =
                    Bytes::copy_from_slice(&image[offset as usize..offset as usize + len as usize]);
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
                let c = rle_encode(&data);
                tx.handle(
                    now,
                    SenderEvent::Compressed {
                        seq,
                        body: Some(WriteBody::Zstd(Bytes::from(c))),
                    },
                );
            }
            other => log.push(other),
        }
    }
}

/// Decodes every frame in `buf`, reporting skips.
pub fn decode_into(dec: &mut FrameDecoder, buf: &mut BytesMut) -> (Vec<Frame>, usize) {
    let mut frames = Vec::new();
    let mut skipped = 0;
    loop {
        match dec.decode(buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(FrameError::Skipped { bytes, .. }) => skipped += bytes.max(1),
            Err(e) => panic!("{e}"),
        }
    }
    (frames, skipped)
}

pub fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}
