//! The install receipt `nx flash send` prints last (and writes with `--receipt FILE`).
//!
//! Same schema as flashd's `/state/flash/last-install.json` (`writer` says which side wrote
//! it). nx counts what it put on the link: every WRITE it sent is classified once per chunk.

use proto::manifest::Manifest;
use proto::msg::{Message, WriteBody};
use proto::session::Plan;

pub use proto::receipt::{Receipt, SegmentReceipt, RECEIPT_VERSION};

/// Builds the receipt from what the sender did, across reconnects.
#[derive(Debug, Clone)]
pub struct ReceiptBuilder {
    r: Receipt,
    /// Highest WRITE seq already counted in the current plan (retransmissions are not).
    counted: u32,
    plan_chunk: Option<u32>,
}

impl ReceiptBuilder {
    pub fn new(m: &Manifest, host: &str, target: &str) -> ReceiptBuilder {
        ReceiptBuilder {
            r: Receipt {
                receipt_version: RECEIPT_VERSION,
                writer: proto::receipt::Writer::Nx,
                image_version: m.version.clone(),
                image_id: hex::encode(m.id()),
                image_sha256: hex::encode(m.image_sha256),
                image_size: m.total_size,
                host: host.to_string(),
                target: target.to_string(),
                state: proto::receipt::InstallState::Failed,
                segments: m
                    .segments
                    .iter()
                    .map(|s| SegmentReceipt {
                        name: s.name.clone(),
                        size: s.size,
                        zero_bytes: s.size.saturating_sub(s.data_bytes()),
                        ..SegmentReceipt::default()
                    })
                    .collect(),
                ..Receipt::default()
            },
            counted: 0,
            plan_chunk: None,
        }
    }

    /// A new connection was opened.
    pub fn try_started(&mut self) {
        self.r.tries += 1;
    }

    /// The session was negotiated with `device`; `plan` is its chunk plan.
    pub fn negotiated(&mut self, device: &str, plan: &Plan) {
        self.r.device = device.to_string();
        if self.plan_chunk != Some(plan.chunk_size()) {
            self.plan_chunk = Some(plan.chunk_size());
            self.counted = 0;
        }
    }

    /// The target already holds chunks `1..=resume_seq`.
    pub fn resumed(&mut self, plan: &Plan, resume_seq: u32) {
        if resume_seq > 0 {
            self.r.resume_count += 1;
        }
        // Chunks held from earlier sessions that this process did not send.
        if resume_seq > self.counted {
            for c in plan
                .chunks_from(self.counted + 1)
                .take_while(|c| c.seq <= resume_seq)
            {
                if let Some(s) = self.r.segments.get_mut(c.segment) {
                    s.resumed_bytes += u64::from(c.len);
                }
            }
            self.counted = resume_seq;
        }
    }

    /// The whole image was already installed.
    pub fn unchanged(&mut self, m: &Manifest) {
        for (s, seg) in self.r.segments.iter_mut().zip(&m.segments) {
            s.skipped_bytes = seg.data_bytes();
        }
    }

    /// A frame is about to be written to the link.
    pub fn frame_sent(&mut self, m: &Manifest, frame: &proto::frame::Frame) {
        self.r.wire_bytes += frame.encoded_len() as u64;
        if frame.msg_type() != proto::msg::MsgType::Write as u8 || frame.seq() <= self.counted {
            return;
        }
        let Ok(Message::Write(w)) = Message::from_frame(frame) else {
            return;
        };
        self.counted = w.seq;
        let Some(i) = m.segments.iter().position(|s| s.name == w.segment) else {
            return;
        };
        let Some(s) = self.r.segments.get_mut(i) else {
            return;
        };
        let n = u64::from(w.len);
        match &w.body {
            WriteBody::Raw(_) => s.sent_bytes += n,
            WriteBody::Zstd(z) => {
                s.sent_bytes += n;
                s.compressed_bytes += n.saturating_sub(z.len() as u64);
            }
            WriteBody::Zero => s.zero_bytes += n,
            WriteBody::Copy { .. } => s.skipped_bytes += n,
            WriteBody::Derive => s.derived_bytes += n,
            WriteBody::Patch { source, frame, .. } => {
                s.sent_bytes += n;
                let saved = n.saturating_sub(frame.len() as u64);
                if *source == proto::msg::PatchSource::Base {
                    s.patched_bytes += saved;
                } else {
                    s.compressed_bytes += saved;
                }
            }
        }
    }

    /// The final state.
    pub fn finish(&mut self, state: proto::receipt::InstallState) -> Receipt {
        self.r.state = state;
        self.r.clone()
    }

    pub fn current(&self) -> &Receipt {
        &self.r
    }
}
