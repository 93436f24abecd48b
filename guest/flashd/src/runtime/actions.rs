//! One function per [`ReceiverAction`]: [`Runtime::execute`] only dispatches.

use super::{ActionError, Phase, Receiving, Runtime, StreamTrack};
use crate::link::Conn;
use crate::records::Counters;
use crate::store::{self, Staging};
use crate::workers::{DurableJob, HashJob};
use bytes::Bytes;
use nx_contract::markers::flashd as m;
use proto::frame::Frame;
use proto::image::ImageHead;
use proto::msg::{self, ErrorCode, Message, MsgType, WriteBody};
use proto::session::{Journal, ReceiverAction};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

/// Largest `PATCH` reference read into a buffer (kept between chunks) instead of mapped:
/// the chunk's own place in the base, the bulk of an update. Longer ones (a window around
/// changed bytes, the image's own earlier bytes) are mapped: file pages, not anonymous
/// memory.
const PATCH_READ_MAX: u32 = msg::MAX_CHUNK;

fn storage(e: store::StoreError) -> ActionError {
    (ErrorCode::Storage, e.to_string())
}

/// How the bytes of a WRITE arrived (for the receipt counters).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Raw,
    Zstd { wire: u64 },
    Patch { wire: u64, base: bool },
    Derived,
    Zero,
    Copy,
}

impl Runtime {
    /// Execute one receiver action.
    pub(super) fn execute(
        &mut self,
        a: ReceiverAction,
        conn: Option<&mut Conn>,
    ) -> Result<(), ActionError> {
        match a {
            ReceiverAction::Send(f) => self.send(&f, conn),
            ReceiverAction::Report(r) => {
                if r == proto::session::ReceiverReport::SkipIndexDropped {
                    // The receiver dropped the base too: do not offer it again.
                    if let Some(id) = self.last_base {
                        self.bad_base = Some(id);
                    }
                }
                self.report(&r)
            }
            ReceiverAction::OpenStaging {
                image_id,
                total_size,
                fresh,
            } => return self.open_staging(image_id, total_size, fresh),
            ReceiverAction::WriteHead(head) => return self.write_head(&head),
            ReceiverAction::Write {
                seq: _,
                offset,
                len,
                body,
            } => {
                self.write_chunk(offset, len, body)?;
                // New image data: the session makes progress (see `Runtime::progress`).
                self.progress = self.progress.wrapping_add(1);
                return Ok(());
            }
            ReceiverAction::SyncStaging { upto_seq } => self.sync_staging(upto_seq),
            ReceiverAction::PersistJournal(j) => self.persist_journal(j),
            ReceiverAction::ClearJournal => self.durable.send(DurableJob::ClearJournal),
            ReceiverAction::VerifySegment {
                ticket,
                segment,
                name: _,
                offset,
                size,
                sha256,
            } => self.verify_segment(ticket, segment, offset, size, sha256),
            ReceiverAction::Install {
                image_id,
                image_sha256: _,
                total_size,
                unchanged,
            } => self.install(image_id, total_size, unchanged),
        }
        Ok(())
    }

    /// `Send`: write the frame to the link (a lost link is reported by the reader; the
    /// receiver keeps its state).
    fn send(&mut self, f: &Frame, conn: Option<&mut Conn>) {
        if f.msg_type() == MsgType::PartAck as u8 {
            if let Ok(Message::PartAck(a)) = Message::from_frame(f) {
                if !a.gap && (a.seq, a.have) > self.part_mark {
                    self.part_mark = (a.seq, a.have);
                    self.progress = self.progress.wrapping_add(1);
                }
            }
        }
        if f.msg_type() == MsgType::HelloReply as u8 {
            // A new session: its parts start from the beginning again.
            self.part_mark = (0, 0);
            if let Ok(Message::HelloReply(r)) = Message::from_frame(f) {
                if r.resumed {
                    if let Some(c) = &mut self.counters {
                        c.resume_count += 1;
                    }
                }
            }
        }
        if let Some(c) = conn {
            let _ = c.send(f);
        }
    }

    /// `OpenStaging`: continue the open staging of the same image, or open (fresh: create)
    /// the staging file or the slot device.
    fn open_staging(
        &mut self,
        image_id: [u8; 32],
        total_size: u64,
        fresh: bool,
    ) -> Result<(), ActionError> {
        self.phase.clear_consumed();
        if !fresh
            && self
                .open()
                .is_some_and(|r| r.image_id == image_id && r.staging.is_at_path())
        {
            // The same transfer continues on a new connection: keep the open file and the
            // segment hash in progress.
            return Ok(());
        }
        self.close_staging();
        let direct = self.direct_device();
        let path = direct.clone().unwrap_or_else(|| self.state.staging_path());
        let s = if fresh {
            // Nothing may claim the old content once it is gone.
            self.durable_barrier();
            self.counters = None;
            // Say where the transfer lives before anything is written there.
            self.state
                .set_staging_location(direct.as_deref())
                .map_err(storage)?;
            if direct.is_some() {
                // The file of an earlier transfer is of no use any more.
                let _ = store::remove_if_exists(&self.state.staging_path());
            }
            let t = Instant::now();
            let s = Staging::create(&path, total_size).map_err(storage)?;
            if s.is_device() {
                self.out.log(&format!(
                    "streaming straight into {} ({} bytes zeroed in {} ms)",
                    path.display(),
                    total_size,
                    t.elapsed().as_millis()
                ));
            }
            s
        } else if self.state.staging_location() != path {
            // The transfer lives elsewhere (flashd restarted with another --direct or another
            // target): start over.
            self.forget_transfer();
            return Err((
                ErrorCode::Storage,
                format!(
                    "the interrupted transfer is not in {}; it starts over: run the same command again",
                    path.display()
                ),
            ));
        } else {
            match Staging::open_existing(&path, total_size).map_err(storage)? {
                Some(s) => s,
                None => {
                    // Someone removed it under us: forget the transfer entirely (its verified
                    // flags describe bytes that are gone) and start over.
                    self.forget_transfer();
                    return Err((
                        ErrorCode::Storage,
                        format!(
                            "staging file {} vanished; the transfer starts over: run the same command again",
                            path.display()
                        ),
                    ));
                }
            }
        };
        let fh = Arc::new(s.file_handle().map_err(storage)?);
        // Direct: the hasher reads back from the disk right behind the writes.
        let readback = s.is_device();
        let hash_file = if readback {
            crate::blockio::open_direct_read(&path)
                .map(Arc::new)
                .unwrap_or_else(|| fh.clone())
        } else {
            fh.clone()
        };
        self.hasher.send(HashJob::SetFile {
            file: Some(hash_file),
            readback,
        });
        self.phase = Phase::Receiving(Box::new(Receiving {
            image_id,
            staging: s,
            file: fh,
            manifest: None,
            stream: None,
            resumed: !fresh,
        }));
        Ok(())
    }

    /// `WriteHead`: the image head at offset 0; from here on the manifest is known.
    fn write_head(&mut self, head: &[u8]) -> Result<(), ActionError> {
        let r = self.staging_mut()?;
        r.staging.write_at(0, head).map_err(storage)?;
        let parsed = ImageHead::parse(head)
            .map_err(|e| (ErrorCode::BadImage, format!("image head: {e}")))?;
        let m = parsed.manifest;
        let keep = self.counters.as_ref().is_some_and(|c| c.matches(&m));
        if !keep {
            self.counters = Some(Counters::new(&m));
        }
        if let Some(c) = &mut self.counters {
            c.tries += 1;
            c.host = self.hello.host.clone();
        }
        self.staging_mut()?.manifest = Some(m);
        Ok(())
    }

    /// `SyncStaging`: fsync on the durability thread (no open file: it was handed to the
    /// install queued before this job).
    fn sync_staging(&mut self, upto_seq: u32) {
        let file = self.open().map(|r| r.file.clone());
        self.outstanding += 1;
        self.durable.send(DurableJob::Sync { file, upto_seq });
    }

    /// `PersistJournal`: on the durability thread, with the receipt counters.
    fn persist_journal(&mut self, j: Journal) {
        self.plan_chunk = Some(j.chunk_size);
        if self.phase.consumed() {
            // A late sync answer after the install: there is no staging file any more, and a
            // journal would describe nothing.
            return;
        }
        let counters = self.counters.clone().map(Box::new);
        self.durable
            .send(DurableJob::Journal(Box::new(j), counters));
    }

    /// `VerifySegment`: finish the streamed hash, or hash the segment from staging.
    fn verify_segment(
        &mut self,
        ticket: u64,
        segment: usize,
        offset: u64,
        size: u64,
        sha256: [u8; 32],
    ) {
        let tracked = self.open().and_then(|r| r.stream);
        let streamed = match tracked {
            Some(t) if t.segment == segment && t.next <= offset + size => {
                if let Some(r) = self.open_mut() {
                    r.stream = None;
                }
                true
            }
            _ => {
                // A segment without data is all zeros: hash that without reading.
                let no_data = self
                    .manifest()
                    .and_then(|m| m.segments.get(segment))
                    .is_some_and(|s| s.data_ranges.is_empty());
                if no_data {
                    let data = self.data_ranges(segment);
                    self.hasher.send(HashJob::Begin {
                        segment,
                        offset,
                        data,
                        pieces: self.pieces(segment),
                    });
                }
                no_data
            }
        };
        // Read-back mode: only the data ranges are hashed, against `data_sha256` (every other
        // byte was zeroed by flashd and checked zero when written).
        let data = self.data_ranges(segment);
        let sha256 = match (&data, self.manifest()) {
            (Some(_), Some(m)) => m.segments.get(segment).map_or(sha256, |s| s.data_sha256),
            _ => sha256,
        };
        self.outstanding += 1;
        self.hasher.send(HashJob::Verify {
            ticket,
            segment,
            offset,
            size,
            sha256,
            streamed,
            data,
            pieces: self.pieces(segment),
        });
    }

    /// `Install`: resolve the target (announcing the slot), then install on the durability
    /// thread. A changed image's staging is closed first.
    fn install(&mut self, image_id: [u8; 32], total_size: u64, unchanged: bool) {
        let (manifest, resumed_direct) = if unchanged {
            (None, false)
        } else {
            // Nothing may write to the staging file once it becomes the install.
            match self.close_staging() {
                Some(r) => {
                    let resumed_direct = r.resumed && r.staging.is_device();
                    (r.manifest, resumed_direct)
                }
                None => (None, false),
            }
        };
        // An unchanged install re-reads the installed image; a resumed direct transfer
        // re-reads the device (its zero ranges were only verified by this process where it
        // wrote them).
        let check = if unchanged {
            self.hello.manifest.clone()
        } else if resumed_direct {
            manifest.clone()
        } else {
            None
        };
        let (target, target_error) = match self.dest.resolve() {
            Ok(t) => {
                self.install_target = self.dest.describe(&t);
                if let crate::config::InstallSpec::Slot { .. } = self.dest.spec() {
                    if let Some((slot, dev)) = self.dest.chosen_slot() {
                        self.out.show(&m::install_slot(
                            slot,
                            crate::slots::partition_name(slot),
                            dev.display(),
                        ));
                    }
                }
                (Some(t), None)
            }
            Err(e) => (None, Some(e)),
        };
        let before = std::mem::replace(&mut self.phase, Phase::Idle);
        self.phase = Phase::Installing {
            unchanged,
            manifest,
            before: Box::new(before),
        };
        self.outstanding += 1;
        self.durable.send(DurableJob::Install {
            staging: self.state.staging_location(),
            image_id,
            total_size,
            target,
            target_error,
            unchanged,
            check: check.map(Box::new),
        });
    }

    /// `Write`: decode one planned chunk, write it to staging and feed the hasher.
    fn write_chunk(&mut self, offset: u64, len: u32, body: WriteBody) -> Result<(), ActionError> {
        let (seg_index, seg_offset, first_data) = {
            let m = self.manifest().ok_or((
                ErrorCode::Storage,
                "WRITE before the image head".to_string(),
            ))?;
            let i = m
                .segments
                .iter()
                .position(|s| s.offset <= offset && offset < s.end())
                .ok_or((
                    ErrorCode::BadWrite,
                    format!("offset {offset} is in no segment"),
                ))?;
            let s = &m.segments[i];
            (i, s.offset, s.data_ranges.first().map(|r| r.offset))
        };
        let (data, kind): (Option<Bytes>, Kind) = match body {
            WriteBody::Raw(d) => (Some(d), Kind::Raw),
            WriteBody::Zstd(z) => {
                let wire = z.len() as u64;
                let d = self.decompress(&z, len)?;
                (Some(d), Kind::Zstd { wire })
            }
            WriteBody::Zero => (None, Kind::Zero),
            WriteBody::Copy { src_offset, hash } => {
                // With signed pieces the pool checks the copied bytes like any others
                // (a segment built from COPY that fails drops the skip index and starts
                // over, see the receiver), so the source's own hash is not needed.
                let pieces = self
                    .manifest()
                    .and_then(|m| m.segments.get(seg_index))
                    .is_some_and(|s| !s.chunk_sha256.is_empty());
                let d = self.copy_from_installed(src_offset, len, (!pieces).then_some(hash))?;
                (Some(d), Kind::Copy)
            }
            WriteBody::Derive => {
                let d = self.derived(seg_index, offset - seg_offset, len)?;
                (Some(d), Kind::Derived)
            }
            WriteBody::Patch {
                source,
                ref_offset,
                ref_len,
                frame,
            } => {
                let wire = frame.len() as u64;
                let d = self.unpatch(source, ref_offset, ref_len, &frame, len)?;
                (
                    Some(d),
                    Kind::Patch {
                        wire,
                        base: source == msg::PatchSource::Base,
                    },
                )
            }
        };
        let readback = self.staging_ref()?.staging.is_device();
        if let Some(d) = &data {
            // Verification covers only the data ranges (against `data_sha256`, so that no
            // zero run is ever hashed): every byte written outside them must be zero, as the
            // manifest says.
            if let Some(seg) = self.manifest().and_then(|m| m.segments.get(seg_index)) {
                if let Some(at) = nonzero_outside(&seg.data_ranges, offset - seg_offset, d) {
                    return Err((
                        ErrorCode::BadWrite,
                        format!(
                            "WRITE at {offset} has data at {} where segment {:?} is all zeros",
                            seg_offset + at,
                            seg.name
                        ),
                    ));
                }
            }
        }
        let s = &self.staging_ref()?.staging;
        match &data {
            Some(d) => s.write_at(offset, d).map_err(storage)?,
            None => s.write_zeros(offset, u64::from(len)).map_err(storage)?,
        }
        self.count(seg_index, u64::from(len), kind);
        // Streamed hashing: continue the segment's hash if this write follows the last one.
        let end = offset + u64::from(len);
        let tracked = self.open().and_then(|r| r.stream);
        let cont = matches!(tracked, Some(t) if t.segment == seg_index && offset >= t.next);
        let starts = first_data == Some(offset - seg_offset);
        let from = if cont {
            tracked.map(|t| t.next)
        } else if starts {
            let data = self.data_ranges(seg_index);
            self.hasher.send(HashJob::Begin {
                segment: seg_index,
                offset: seg_offset,
                data,
                pieces: self.pieces(seg_index),
            });
            Some(seg_offset)
        } else {
            None
        };
        match from {
            Some(from) => {
                if offset > from {
                    self.hasher.send(HashJob::Zeros(offset - from));
                }
                match data {
                    // Direct: the bytes are on the device now; the hasher reads them back.
                    Some(d) if readback => self.hasher.send(HashJob::Written(d.len() as u64)),
                    Some(d) => self.hasher.send(HashJob::Data(d)),
                    None => self.hasher.send(HashJob::Zeros(u64::from(len))),
                }
                self.staging_mut()?.stream = Some(StreamTrack {
                    segment: seg_index,
                    next: end,
                });
            }
            None => {
                if tracked.is_some_and(|t| t.segment == seg_index) {
                    self.staging_mut()?.stream = None;
                }
            }
        }
        Ok(())
    }

    /// Receipt counters of segment `seg` for `n` bytes that arrived as `kind`.
    fn count(&mut self, seg: usize, n: u64, kind: Kind) {
        let Some(c) = self.counters.as_mut().and_then(|c| c.segment_mut(seg)) else {
            return;
        };
        match kind {
            Kind::Raw => c.sent_bytes += n,
            Kind::Zstd { wire } => {
                c.sent_bytes += n;
                c.compressed_bytes += n.saturating_sub(wire);
            }
            Kind::Patch { wire, base } => {
                c.sent_bytes += n;
                if base {
                    c.patched_bytes += n.saturating_sub(wire);
                } else {
                    c.compressed_bytes += n.saturating_sub(wire);
                }
            }
            Kind::Zero => c.zero_bytes += n,
            Kind::Derived => c.derived_bytes += n,
            Kind::Copy => c.skipped_bytes += n,
        }
    }

    fn decompress(&mut self, z: &[u8], len: u32) -> Result<Bytes, ActionError> {
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                (
                    ErrorCode::Storage,
                    format!("cannot create a zstd decoder: {e}"),
                )
            })?);
        }
        let dec = self
            .zstd
            .as_mut()
            .ok_or((ErrorCode::Storage, "no zstd decoder".to_string()))?;
        // The output buffer is exactly `len` bytes: a frame that decodes to more is refused.
        let mut out: Vec<u8> = Vec::with_capacity(len as usize);
        let n = dec.decompress_to_buffer(z, &mut out).map_err(|e| {
            (
                ErrorCode::BadWrite,
                format!("zstd data does not decode to {len} bytes: {e}"),
            )
        })?;
        if n != len as usize || out.len() != len as usize {
            return Err((
                ErrorCode::BadWrite,
                format!("zstd data decodes to {n} bytes, the WRITE says {len}"),
            ));
        }
        Ok(Bytes::from(out))
    }

    /// `COPY`: `len` bytes of the installed image at `src_offset`; checked against `hash`
    /// (the skip index's) when given.
    fn copy_from_installed(
        &mut self,
        src_offset: u64,
        len: u32,
        hash: Option<msg::ChunkHash>,
    ) -> Result<Bytes, ActionError> {
        let target = self.dest.resolve().map_err(|e| (ErrorCode::Storage, e))?;
        let path = target.path().to_path_buf();
        let mut buf = vec![0u8; len as usize];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, src_offset))
            .map_err(|e| {
                (
                    ErrorCode::Storage,
                    format!("COPY from the installed image {}: {e}", path.display()),
                )
            })?;
        if hash.is_some_and(|h| msg::chunk_hash(&buf) != h) {
            // The installed image is not what its index says: stop offering it.
            if let Some(mut inst) = self.rx.installed().cloned() {
                inst.index = None;
                self.set_installed_record(inst);
            }
            return Err((
                ErrorCode::Storage,
                format!(
                    "COPY source at {src_offset}+{len} in {} does not hold the expected bytes; \
                     skip index dropped, run the same command again",
                    path.display()
                ),
            ));
        }
        Ok(Bytes::from(buf))
    }

    /// `DERIVE`: `len` bytes at `rel` of the dm-verity hash segment `seg`, computed here from
    /// its data segment in staging (the receiver checked that it was received before). The
    /// whole tree is built once per image and kept until the transfer ends.
    fn derived(&mut self, seg: usize, rel: u64, len: u32) -> Result<Bytes, ActionError> {
        let (image_id, name, data, size, salt) = {
            let r = self.staging_ref()?;
            let m = r.manifest.as_ref().ok_or((
                ErrorCode::Storage,
                "DERIVE before the image head".to_string(),
            ))?;
            let s = m
                .segments
                .get(seg)
                .ok_or((ErrorCode::BadWrite, format!("DERIVE: no segment {seg}")))?;
            let v = m.verity.iter().find(|v| v.hash == s.name).ok_or((
                ErrorCode::BadWrite,
                format!("DERIVE: {:?} is no dm-verity hash segment", s.name),
            ))?;
            let d = m.segment(&v.data).ok_or((
                ErrorCode::BadWrite,
                format!("DERIVE: no data segment {:?}", v.data),
            ))?;
            (
                r.image_id,
                s.name.clone(),
                (d.offset, d.size),
                s.size,
                v.salt.clone(),
            )
        };
        let cached =
            matches!(&self.derived_tree, Some((id, n, _)) if *id == image_id && *n == name);
        if !cached {
            if size > msg::MAX_DERIVED {
                return Err((
                    ErrorCode::BadWrite,
                    format!(
                        "DERIVE: segment {name:?} is larger than {}",
                        msg::MAX_DERIVED
                    ),
                ));
            }
            let staging = &self.staging_ref()?.staging;
            let mut t = proto::verity::TreeBuilder::new(&salt);
            let mut buf = vec![0u8; 1 << 20];
            let (start, total) = data;
            let mut done = 0u64;
            while done < total {
                let n = (total - done).min(buf.len() as u64) as usize;
                staging
                    .read_at(start + done, &mut buf[..n])
                    .map_err(storage)?;
                t.update(&buf[..n]);
                done += n as u64;
            }
            self.progress += 1;
            let tree = t.finish().bytes;
            self.out.log(&format!(
                "derived {name}: {} bytes of dm-verity hash tree from {total} bytes of data",
                tree.len()
            ));
            self.derived_tree = Some((image_id, name.clone(), Arc::new(tree)));
        }
        let tree = self
            .derived_tree
            .as_ref()
            .map(|(_, _, t)| t.clone())
            .ok_or((ErrorCode::Storage, "no derived tree".to_string()))?;
        // The segment is the tree padded with zeros to its size.
        let mut out = vec![0u8; len as usize];
        let from = usize::try_from(rel).unwrap_or(usize::MAX);
        if let Some(src) = tree.get(from..) {
            let n = src.len().min(out.len());
            out[..n].copy_from_slice(&src[..n]);
        }
        Ok(Bytes::from(out))
    }

    /// `PATCH`: decompress `frame` with `ref_len` bytes at `ref_offset` of the base image (the
    /// active slot or the installed file) or of the staging bytes already written as its
    /// prefix. The prefix is mapped read-only (page cache, not this process's heap); the
    /// output is exactly `len` bytes.
    fn unpatch(
        &mut self,
        source: msg::PatchSource,
        ref_offset: u64,
        ref_len: u32,
        frame: &[u8],
        len: u32,
    ) -> Result<Bytes, ActionError> {
        let (file, path) = match source {
            msg::PatchSource::Base => {
                let p = self.base_path.clone().ok_or((
                    ErrorCode::Storage,
                    "PATCH from the base image, but no base image is open".to_string(),
                ))?;
                let f = File::open(&p).map_err(|e| {
                    (
                        ErrorCode::Storage,
                        format!("cannot open the base image {}: {e}", p.display()),
                    )
                })?;
                (f, p)
            }
            msg::PatchSource::Staging => {
                let s = &self.staging_ref()?.staging;
                (s.file_handle().map_err(storage)?, s.path().to_path_buf())
            }
            msg::PatchSource::Unknown(c) => {
                return Err((ErrorCode::BadWrite, format!("unknown PATCH source {c}")))
            }
        };
        let end = ref_offset.checked_add(u64::from(ref_len));
        let size = crate::install::block_capacity(&path).unwrap_or(0);
        if end.is_none_or(|e| e > size) {
            return Err((
                ErrorCode::BadWrite,
                format!(
                    "PATCH reference {ref_offset}+{ref_len} is outside {} ({size} bytes)",
                    path.display()
                ),
            ));
        }
        let undecodable = |e| {
            (
                ErrorCode::BadWrite,
                format!("PATCH data does not decode: {e}"),
            )
        };
        if ref_len <= PATCH_READ_MAX {
            // Most of an update: the chunk's own place in the base. Read into a buffer kept
            // for the next one: mapping and unmapping each reference costs every vCPU a TLB
            // flush (under TCG a slow one), for a MiB that is read once.
            let buf = &mut self.patch_ref;
            if buf.len() < ref_len as usize {
                buf.resize(ref_len as usize, 0);
            }
            let prefix = buf.get_mut(..ref_len as usize).unwrap_or_default();
            file.read_exact_at(prefix, ref_offset).map_err(|e| {
                (
                    ErrorCode::Storage,
                    format!("cannot read {} for a PATCH: {e}", path.display()),
                )
            })?;
            return crate::patch::decode(prefix, frame, len as usize)
                .map(Bytes::from)
                .map_err(undecodable);
        }
        // SAFETY: a read-only private view of a range checked to lie inside the file or
        // device; flashd is the only writer of staging and never truncates it while a
        // transfer is open, and slot partitions cannot shrink.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(ref_offset)
                .len(ref_len as usize)
                .map(&file)
        }
        .map_err(|e| {
            (
                ErrorCode::Storage,
                format!("cannot map {} for a PATCH: {e}", path.display()),
            )
        })?;
        crate::patch::decode(&map, frame, len as usize)
            .map(Bytes::from)
            .map_err(undecodable)
    }

    /// The manifest of the image in the open staging.
    fn manifest(&self) -> Option<&proto::manifest::Manifest> {
        self.open().and_then(|r| r.manifest.as_ref())
    }

    /// In read-back mode (direct transfer into a device), the data ranges of `segment`: the
    /// hasher then hashes only those, against the manifest's `data_sha256`.
    fn data_ranges(&self, segment: usize) -> Option<Arc<[proto::manifest::DataRange]>> {
        let r = self.open()?;
        let seg = r.manifest.as_ref()?.segments.get(segment)?;
        Some(Arc::from(seg.data_ranges.as_slice()))
    }

    /// The signed 1 MiB pieces of `segment` (`chunk_sha256`): the hasher checks them on its
    /// pool, in parallel and as each is written. `None` without a manifest.
    fn pieces(&self, segment: usize) -> Option<Arc<[proto::manifest::HashedPiece]>> {
        let r = self.open()?;
        let seg = r.manifest.as_ref()?.segments.get(segment)?;
        Some(seg.hashed_pieces().collect())
    }

    fn staging_ref(&self) -> Result<&Receiving, ActionError> {
        self.open()
            .ok_or((ErrorCode::Storage, "no staging file is open".to_string()))
    }

    fn staging_mut(&mut self) -> Result<&mut Receiving, ActionError> {
        self.open_mut()
            .ok_or((ErrorCode::Storage, "no staging file is open".to_string()))
    }
}

/// The first offset (relative to the segment) of a non-zero byte of `data` — written at
/// `rel` in the segment — that lies outside `ranges` (sorted, relative), if any.
fn nonzero_outside(ranges: &[proto::manifest::DataRange], rel: u64, data: &[u8]) -> Option<u64> {
    let end = rel + data.len() as u64;
    let mut pos = rel;
    let mut i = ranges.partition_point(|r| r.end() <= rel);
    while pos < end {
        // The gap before the next range (or up to the end).
        let next = ranges.get(i).map_or(end, |r| r.offset.clamp(pos, end));
        if next > pos {
            let gap = data.get((pos - rel) as usize..(next - rel) as usize)?;
            if let Some(k) = gap.iter().position(|b| *b != 0) {
                return Some(pos + k as u64);
            }
        }
        // Skip the range itself.
        pos = ranges.get(i).map_or(end, |r| r.end().max(next));
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::nonzero_outside;
    use proto::manifest::DataRange;

    #[test]
    fn nonzero_bytes_outside_the_data_ranges_are_found() {
        let r = |offset, len| DataRange { offset, len };
        let ranges = [r(4096, 4096), r(16384, 100)];
        let mut d = vec![0u8; 20000];
        // Data inside the ranges is fine.
        d[4096] = 1;
        d[8191] = 1;
        d[16384 + 99] = 1;
        assert_eq!(nonzero_outside(&ranges, 0, &d), None);
        // Just before, just after, and past the last range.
        for at in [4095usize, 8192, 16484, 19999, 0] {
            let mut e = d.clone();
            e[at] = 7;
            assert_eq!(nonzero_outside(&ranges, 0, &e), Some(at as u64), "at {at}");
        }
        // A write that starts inside a range and at an offset.
        let part = &d[6000..9000];
        assert_eq!(nonzero_outside(&ranges, 6000, part), None);
        let mut e = part.to_vec();
        e[2500] = 1; // absolute 8500: outside
        assert_eq!(nonzero_outside(&ranges, 6000, &e), Some(8500));
        // No ranges: everything must be zero.
        assert_eq!(nonzero_outside(&[], 0, &[0, 0, 1]), Some(2));
        assert_eq!(nonzero_outside(&[], 10, &[]), None);
    }
}
