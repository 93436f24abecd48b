//! The image manifest: what an image holds and the hashes that pin every byte of it.
//!
//! A [`Manifest`] lists the segments of an image file (name, offset, size, SHA-256 of the
//! content, SHA-256 of its data ranges only, and the data ranges: the parts that are not
//! all-zero) and the whole-image hash [`image_sha256`]. It is serialized
//! canonically ([`Manifest::to_canonical_bytes`]): compact JSON with a fixed field order,
//! lowercase hex hashes and plain integers, so the same manifest always gives the same bytes
//! and [`Manifest::id`] identifies it. [`Manifest::from_bytes`] bounds the input, parses,
//! validates every field and rejects input that is not byte-identical to the canonical form.
//!
//! The exact layout rules and the byte tables live in `docs/provisioning/overview.md`.
//!
//! Streaming helpers shared by the builder (`nx image build`) and the receiver (`flashd`):
//! [`DataRangeBuilder`] (which 4 KiB blocks are not all-zero) and [`SegmentHasher`]
//! (SHA-256, data SHA-256, data ranges and size of a segment fed in pieces of any size).

use std::fmt::Write as _;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Manifest (and image header) format version written by this crate; the only one it accepts.
///
/// Format 2 added the per-segment `data_sha256`; format 3 added `security_version` (anti-rollback)
/// and `verity` (dm-verity hash trees); format 4 added the per-segment `chunk_sha256` list
/// (SHA-256 of every [`HASH_CHUNK`] piece, so chunks verify independently). Older images must be
/// rebuilt.
pub const FORMAT_VERSION: u32 = 4;
/// Size of the pieces `chunk_sha256` hashes: the protocol's largest (and default) chunk
/// ([`nx_contract::defaults::CHUNK`]). WRITE chunks never cross a multiple of the chunk size
/// (a power of two ≤ this) relative to the segment start, so a whole 1 MiB WRITE is exactly
/// one hash piece.
pub const HASH_CHUNK: u64 = nx_contract::defaults::CHUNK as u64;
/// Most `chunk_sha256` entries over all segments: 64 hex digits each must fit in
/// [`MAX_MANIFEST_LEN`], so images above ~16 GiB cannot be described.
pub const MAX_CHUNK_HASHES: usize = MAX_MANIFEST_LEN / 64;
/// Most `verity` entries (each names two segments).
pub const MAX_VERITY: usize = MAX_SEGMENTS / 2;
/// Segment alignment in the image file and granularity of data ranges.
pub const ALIGN: u64 = 4096;
/// Most segments an image may have.
pub const MAX_SEGMENTS: usize = 64;
/// Longest canonical manifest, checked before any parsing.
pub const MAX_MANIFEST_LEN: usize = 1 << 20;
/// Longest segment name (names are `[a-z0-9_-]{1,32}`).
pub const MAX_NAME_LEN: usize = 32;
/// Longest image version string (`[A-Za-z0-9._+~:-]{1,64}`).
pub const MAX_VERSION_LEN: usize = 64;
/// Most data ranges one segment may list (a segment more fragmented than this cannot be
/// described within [`MAX_MANIFEST_LEN`] anyway).
pub const MAX_DATA_RANGES: usize = 1 << 16;
/// Largest image (1 TiB): a sanity bound that keeps every offset computation far from overflow.
pub const MAX_IMAGE_SIZE: u64 = 1 << 40;
/// Lowest possible offset of the first segment: the 4 KiB header plus at least one 4 KiB
/// page for the manifest and the signature slot.
pub const MIN_DATA_OFFSET: u64 = 2 * ALIGN;

/// Why a manifest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is longer than [`MAX_MANIFEST_LEN`]; nothing was parsed.
    #[error("manifest is {len} bytes, more than the limit of {max} bytes")]
    TooLong {
        /// Length found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape (includes "too many segments/data ranges").
    #[error("manifest is not a valid format-{FORMAT_VERSION} manifest: {detail}")]
    Json {
        /// What the JSON parser reported.
        detail: String,
    },
    /// Valid content, but not the canonical encoding of it.
    #[error(
        "manifest bytes are not canonical (they differ from the canonical re-encoding at byte {at}); \
         rebuild the image with `nx image build`"
    )]
    NonCanonical {
        /// First byte offset where input and canonical form differ.
        at: usize,
    },
    /// A format this crate does not understand (e.g. a format-1 manifest, which has no
    /// `data_sha256`).
    #[error(
        "unsupported manifest format {found} (this build understands format {FORMAT_VERSION}); {}",
        rebuild_hint(*.found)
    )]
    UnsupportedFormat {
        /// Format found.
        found: u32,
    },
    /// Bad image version string.
    #[error("bad image version {version:?}: {reason}")]
    BadVersion {
        /// The version (shortened if very long).
        version: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Bad segment name.
    #[error("bad segment name {name:?}: {reason} (names are [a-z0-9_-]{{1,32}})")]
    BadName {
        /// The name (shortened if very long).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two segments with the same name.
    #[error("segment name {name:?} is used twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// No segment at all.
    #[error("manifest lists no segments (an image needs at least one)")]
    NoSegments,
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("manifest lists {count} segments, more than the limit of {MAX_SEGMENTS}")]
    TooManySegments {
        /// Count found.
        count: usize,
    },
    /// A segment of size 0 (not allowed: every segment holds at least one byte).
    #[error("segment {segment:?} is empty (size 0); empty segments are not allowed")]
    EmptySegment {
        /// Segment name.
        segment: String,
    },
    /// A segment is not where the layout rule puts it.
    #[error(
        "segment {segment:?} is at offset {found}, expected {expected} (segments are contiguous \
         in table order, each at the next 4 KiB boundary after the previous one)"
    )]
    Layout {
        /// Segment name.
        segment: String,
        /// Where the layout rule puts it.
        expected: u64,
        /// Where the manifest puts it.
        found: u64,
    },
    /// The first segment does not start on a 4 KiB boundary inside the allowed head area.
    #[error(
        "first segment {segment:?} is at offset {offset}: it must be 4 KiB aligned and between \
         {MIN_DATA_OFFSET} and {max}"
    )]
    FirstOffset {
        /// Segment name.
        segment: String,
        /// Its offset.
        offset: u64,
        /// Highest allowed offset.
        max: u64,
    },
    /// The image would be larger than [`MAX_IMAGE_SIZE`].
    #[error("segment {segment:?} ends beyond the image size limit of {MAX_IMAGE_SIZE} bytes")]
    TooLarge {
        /// Segment name.
        segment: String,
    },
    /// `total_size` does not match the segments.
    #[error("total_size is {found}, but the segments end at {expected} (4 KiB aligned)")]
    TotalSize {
        /// What the segments imply.
        expected: u64,
        /// What the manifest says.
        found: u64,
    },
    /// A hash field is not 64 hex digits.
    #[error("{field} is not a SHA-256 in lowercase hex (64 digits)")]
    BadHex {
        /// Which field.
        field: String,
    },
    /// A data range breaks the rules (aligned, sorted, merged, inside the segment).
    #[error("segment {segment:?}: data range #{index} [{offset}, +{len}): {reason}")]
    DataRange {
        /// Segment name.
        segment: String,
        /// Index of the range in the segment's list.
        index: usize,
        /// Range offset (relative to the segment).
        offset: u64,
        /// Range length.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A segment lists more than [`MAX_DATA_RANGES`] data ranges.
    #[error(
        "segment {segment:?} lists {count} data ranges, more than the limit of {MAX_DATA_RANGES}"
    )]
    TooManyDataRanges {
        /// Segment name.
        segment: String,
        /// Count found.
        count: usize,
    },
    /// A bad `verity` entry.
    #[error("verity entry for segment {data:?}: {reason}")]
    Verity {
        /// Its data segment name (shortened).
        data: String,
        /// What is wrong.
        reason: String,
    },
    /// A segment's `chunk_sha256` list does not have one entry per [`HASH_CHUNK`] piece.
    #[error(
        "segment {segment:?} lists {found} chunk hashes, expected {expected} (one per 1 MiB \
         piece); rebuild the image with `nx image build`"
    )]
    ChunkHashes {
        /// Segment name.
        segment: String,
        /// Pieces of the segment that hold data.
        expected: usize,
        /// Entries found.
        found: usize,
    },
    /// `image_sha256` does not match the segment table.
    #[error("image_sha256 is {found}, but the segment table hashes to {expected}")]
    ImageHash {
        /// Hash of the segment table (hex).
        expected: String,
        /// Hash in the manifest (hex).
        found: String,
    },
}

/// A contiguous part of a segment that is not all-zero.
///
/// `offset` is relative to the segment start and a multiple of [`ALIGN`]; `len` is a multiple
/// of [`ALIGN`] except for a range that ends exactly at the segment's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataRange {
    /// Offset relative to the segment start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DataRange {
    /// End offset (relative to the segment start). Saturates instead of overflowing.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// One segment of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `[a-z0-9_-]{1,32}`.
    pub name: String,
    /// Absolute offset in the image file, [`ALIGN`]-aligned.
    pub offset: u64,
    /// Bytes of content (the zero padding after it is not counted). Never 0.
    pub size: u64,
    /// SHA-256 of the `size` content bytes (zeros included).
    pub sha256: [u8; 32],
    /// SHA-256 of the bytes of the data ranges, concatenated in order: every non-zero 4 KiB
    /// block of the content (the last, possibly short, block included), nothing else. For a
    /// segment without data ranges, the SHA-256 of the empty string.
    ///
    /// Lets a target verify a sparse segment without hashing its zero runs: since the data
    /// ranges are part of the (signed) manifest, `data_sha256` plus "every byte outside the
    /// data ranges is zero" pins the whole content just as `sha256` does.
    pub data_sha256: [u8; 32],
    /// SHA-256 of each [`HASH_CHUNK`] piece of the content that holds data (overlaps a data
    /// range), in order; the last piece may be short. All-zero pieces are never sent and have
    /// no entry, so a sparse segment needs few. Exactly [`Segment::data_pieces`] entries. A
    /// receiver checks a whole piece against it before writing it; `sha256` stays the final
    /// check of the assembled segment.
    pub chunk_sha256: Vec<[u8; 32]>,
    /// The parts that are not all-zero, exactly the maximal runs of non-zero 4 KiB blocks.
    pub data_ranges: Vec<DataRange>,
}

/// Indexes of the [`HASH_CHUNK`] pieces that overlap `ranges` (sorted, merged), in order,
/// each once; stops after `limit` of them.
fn data_piece_indexes(ranges: &[DataRange], limit: usize) -> impl Iterator<Item = u64> + '_ {
    let mut last: Option<u64> = None;
    ranges
        .iter()
        .filter(|r| r.len > 0)
        .flat_map(|r| (r.offset / HASH_CHUNK)..=((r.end() - 1) / HASH_CHUNK))
        .filter(move |k| {
            let new = last != Some(*k);
            last = Some(*k);
            new
        })
        .take(limit)
}

impl Segment {
    /// Absolute end of the content (`offset + size`), saturating.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    /// Absolute end of the content plus its zero padding: the next 4 KiB boundary.
    pub fn padded_end(&self) -> u64 {
        align_up(self.end()).unwrap_or(u64::MAX)
    }

    /// Bytes covered by the data ranges.
    pub fn data_bytes(&self) -> u64 {
        self.data_ranges.iter().map(|r| r.len).sum()
    }

    /// Whether the byte at `rel` (relative to the segment start) lies inside a data range.
    pub fn is_data(&self, rel: u64) -> bool {
        covered(&self.data_ranges, rel)
    }

    /// The signed hash of the piece `[rel_offset, rel_offset + len)` when that range is exactly
    /// one whole [`HASH_CHUNK`] piece (aligned, full length, or the short last piece); `None`
    /// for any other range (it is checked by the segment hash only).
    pub fn piece_hash(&self, rel_offset: u64, len: u64) -> Option<[u8; 32]> {
        if !rel_offset.is_multiple_of(HASH_CHUNK) || len == 0 {
            return None;
        }
        let whole = HASH_CHUNK.min(self.size.checked_sub(rel_offset)?);
        if len != whole {
            return None;
        }
        let k = rel_offset / HASH_CHUNK;
        let rank =
            data_piece_indexes(&self.data_ranges, self.chunk_sha256.len()).position(|p| p == k)?;
        self.chunk_sha256.get(rank).copied()
    }

    /// The pieces `chunk_sha256` covers, in order: (offset relative to the segment, length —
    /// [`HASH_CHUNK`], or less for the last piece of the segment — and the signed hash). A
    /// receiver that checked every one of them (and wrote zeros everywhere else, as the data
    /// ranges say) holds the segment: the pieces verify independently, in any order.
    pub fn hashed_pieces(&self) -> impl Iterator<Item = HashedPiece> + '_ {
        data_piece_indexes(&self.data_ranges, self.chunk_sha256.len())
            .zip(self.chunk_sha256.iter())
            .filter_map(|(k, h)| {
                let rel = k.checked_mul(HASH_CHUNK)?;
                let len = HASH_CHUNK.min(self.size.checked_sub(rel)?);
                (len > 0).then_some(HashedPiece {
                    rel_offset: rel,
                    len,
                    sha256: *h,
                })
            })
    }

    /// Number of [`HASH_CHUNK`] pieces that hold data (the `chunk_sha256` entries), counting
    /// at most `limit`.
    pub fn data_pieces(&self, limit: usize) -> usize {
        data_piece_indexes(&self.data_ranges, limit).count()
    }
}

/// One entry of [`Segment::chunk_sha256`] with the range it covers ([`Segment::hashed_pieces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedPiece {
    /// Offset relative to the segment start (a multiple of [`HASH_CHUNK`]).
    pub rel_offset: u64,
    /// Length: [`HASH_CHUNK`], or less for the segment's last piece.
    pub len: u64,
    /// The signed SHA-256 of these bytes.
    pub sha256: [u8; 32],
}

/// An image manifest. See the module docs and `docs/provisioning/overview.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Image version string, `[A-Za-z0-9._+~:-]{1,64}` (e.g. `1`, `2.0.1`).
    pub version: String,
    /// Size of the whole image file.
    pub total_size: u64,
    /// The segments, in file order.
    pub segments: Vec<Segment>,
    /// Anti-rollback counter (like AVB's rollback index): a device refuses an image whose
    /// `security_version` is below the floor it keeps, and raises the floor when a slot holding
    /// this image is confirmed.
    pub security_version: u64,
    /// dm-verity hash trees: which segment is protected by which tree, with the salt and root
    /// hash (sorted by data segment name, see [`crate::verity`]).
    pub verity: Vec<Verity>,
    /// [`image_sha256`] of `segments`.
    pub image_sha256: [u8; 32],
}

/// A dm-verity hash tree in the image: segment `hash` holds the tree of segment `data`
/// (format 1, SHA-256, 4 KiB blocks; [`crate::verity`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verity {
    /// The protected segment.
    pub data: String,
    /// The segment holding the hash area (exactly [`crate::verity::tree_size`] bytes).
    pub hash: String,
    /// Salt, at most [`crate::verity::MAX_SALT`] bytes.
    pub salt: Vec<u8>,
    /// Root hash of the tree.
    pub root_hash: [u8; 32],
}

/// Round `x` up to the next multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// Whether `x` is a multiple of [`ALIGN`].
pub fn is_aligned(x: u64) -> bool {
    x & (ALIGN - 1) == 0
}

/// The whole-image hash: SHA-256 over, for each segment in table order,
/// `name_len:u8 || name || offset:u64le || size:u64le || sha256[32]`.
///
/// Together with the zero-padding rule and the head being a pure function of the manifest and
/// the signature, this fixes every byte of the image file.
pub fn image_sha256(segments: &[Segment]) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in segments {
        // Names are at most 32 bytes once validated; clamp so an invalid one still hashes.
        let name = s.name.as_bytes();
        let name = &name[..name.len().min(usize::from(u8::MAX))];
        h.update([name.len() as u8]);
        h.update(name);
        h.update(s.offset.to_le_bytes());
        h.update(s.size.to_le_bytes());
        h.update(s.sha256);
    }
    h.finalize().into()
}

/// The advice appended to an unsupported-format error.
pub(crate) fn rebuild_hint(found: u32) -> &'static str {
    if found < FORMAT_VERSION {
        "rebuild the image with `nx image build`"
    } else {
        "the image was made by a newer build: update nx, or rebuild the image with this \
         build's `nx image build`"
    }
}

/// Check a segment name: `[a-z0-9_-]{1,32}`. Used by the manifest parser and the wire decoder.
pub fn validate_segment_name(name: &str) -> Result<(), ManifestError> {
    let bad = |reason| ManifestError::BadName {
        name: shorten(name),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("longer than 32 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(bad(
            "only lowercase ASCII letters, digits, '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Check an image version string: `[A-Za-z0-9._+~:-]{1,64}`.
pub fn validate_version(version: &str) -> Result<(), ManifestError> {
    let bad = |reason| ManifestError::BadVersion {
        version: shorten(version),
        reason,
    };
    if version.is_empty() {
        return Err(bad("empty"));
    }
    if version.len() > MAX_VERSION_LEN {
        return Err(bad("longer than 64 bytes"));
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+~:-".contains(&b))
    {
        return Err(bad(
            "only ASCII letters, digits and . _ + ~ : - are allowed",
        ));
    }
    Ok(())
}

impl Manifest {
    /// The canonical encoding: compact JSON, fields in the order of the struct, hashes as
    /// lowercase hex, data ranges as `[offset,len]` pairs. Same manifest → same bytes.
    ///
    /// Example (one segment, wrapped here for reading):
    /// `{"format":2,"version":"1","total_size":12288,"segments":[{"name":"rootfs","offset":8192,
    /// "size":5,"sha256":"…","data_sha256":"…","data_ranges":[[0,5]]}],"image_sha256":"…"}`
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        let mut s = String::with_capacity(160 + self.segments.len() * 280);
        s.push_str("{\"format\":");
        let _ = write!(s, "{}", self.format);
        s.push_str(",\"version\":");
        push_json_str(&mut s, &self.version);
        let _ = write!(
            s,
            ",\"security_version\":{},\"total_size\":{},\"segments\":[",
            self.security_version, self.total_size
        );
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str("{\"name\":");
            push_json_str(&mut s, &seg.name);
            let _ = write!(
                s,
                ",\"offset\":{},\"size\":{},\"sha256\":\"",
                seg.offset, seg.size
            );
            s.push_str(&hex::encode(seg.sha256));
            s.push_str("\",\"data_sha256\":\"");
            s.push_str(&hex::encode(seg.data_sha256));
            s.push_str("\",\"chunk_sha256\":\"");
            for h in &seg.chunk_sha256 {
                s.push_str(&hex::encode(h));
            }
            s.push_str("\",\"data_ranges\":[");
            for (j, r) in seg.data_ranges.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                let _ = write!(s, "[{},{}]", r.offset, r.len);
            }
            s.push_str("]}");
        }
        s.push_str("],\"verity\":[");
        for (i, v) in self.verity.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str("{\"data\":");
            push_json_str(&mut s, &v.data);
            s.push_str(",\"hash\":");
            push_json_str(&mut s, &v.hash);
            s.push_str(",\"salt\":\"");
            s.push_str(&hex::encode(&v.salt));
            s.push_str("\",\"root_hash\":\"");
            s.push_str(&hex::encode(v.root_hash));
            s.push_str("\"}");
        }
        s.push_str("],\"image_sha256\":\"");
        s.push_str(&hex::encode(self.image_sha256));
        s.push_str("\"}");
        s.into_bytes()
    }

    /// Parse and fully validate canonical manifest bytes.
    ///
    /// The length is checked against [`MAX_MANIFEST_LEN`] before parsing; segment and data-range
    /// counts are bounded while parsing; the result is [`validate`](Self::validate)d and must
    /// re-encode to exactly `b`.
    pub fn from_bytes(b: &[u8]) -> Result<Manifest, ManifestError> {
        if b.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLong {
                len: b.len(),
                max: MAX_MANIFEST_LEN,
            });
        }
        let raw: RawManifest = match serde_json::from_slice(b) {
            Ok(raw) => raw,
            Err(e) => {
                // Another format has other fields: say "unsupported format" (with the advice to
                // rebuild) rather than "missing field data_sha256".
                if let Ok(probe) = serde_json::from_slice::<FormatProbe>(b) {
                    if probe.format != FORMAT_VERSION {
                        return Err(ManifestError::UnsupportedFormat {
                            found: probe.format,
                        });
                    }
                }
                return Err(ManifestError::Json {
                    detail: e.to_string(),
                });
            }
        };
        let mut segments = Vec::with_capacity(raw.segments.0.len());
        let mut hashes_left = MAX_CHUNK_HASHES;
        for (i, rs) in raw.segments.0.into_iter().enumerate() {
            let sha256 = parse_hash(&rs.sha256, || format!("sha256 of segment #{i}"))?;
            let data_sha256 =
                parse_hash(&rs.data_sha256, || format!("data_sha256 of segment #{i}"))?;
            let data_ranges: Vec<DataRange> = rs
                .data_ranges
                .0
                .into_iter()
                .map(|(offset, len)| DataRange { offset, len })
                .collect();
            let expected = data_piece_indexes(&data_ranges, MAX_CHUNK_HASHES + 1).count();
            let chunk_sha256 = parse_hash_list(&rs.chunk_sha256, expected, &mut hashes_left, i)?;
            segments.push(Segment {
                name: rs.name,
                offset: rs.offset,
                size: rs.size,
                sha256,
                data_sha256,
                chunk_sha256,
                data_ranges,
            });
        }
        let mut verity = Vec::with_capacity(raw.verity.0.len());
        for (i, rv) in raw.verity.0.into_iter().enumerate() {
            verity.push(Verity {
                salt: parse_salt(&rv.salt, i)?,
                root_hash: parse_hash(&rv.root_hash, || format!("root_hash of verity #{i}"))?,
                data: rv.data,
                hash: rv.hash,
            });
        }
        let m = Manifest {
            format: raw.format,
            version: raw.version,
            security_version: raw.security_version,
            total_size: raw.total_size,
            segments,
            verity,
            image_sha256: parse_hash(&raw.image_sha256, || "image_sha256".to_string())?,
        };
        m.validate()?;
        let canonical = m.to_canonical_bytes();
        if canonical != b {
            let at = canonical
                .iter()
                .zip(b)
                .position(|(x, y)| x != y)
                .unwrap_or(canonical.len().min(b.len()));
            return Err(ManifestError::NonCanonical { at });
        }
        Ok(m)
    }

    /// Check every rule: format, version, names, sizes, the contiguous layout, data ranges,
    /// `total_size` and `image_sha256`.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat { found: self.format });
        }
        validate_version(&self.version)?;
        if self.segments.is_empty() {
            return Err(ManifestError::NoSegments);
        }
        if self.segments.len() > MAX_SEGMENTS {
            return Err(ManifestError::TooManySegments {
                count: self.segments.len(),
            });
        }
        let mut names: Vec<&str> = Vec::with_capacity(self.segments.len());
        let mut expected_offset: Option<u64> = None;
        let mut end = 0u64;
        for seg in &self.segments {
            validate_segment_name(&seg.name)?;
            if names.contains(&seg.name.as_str()) {
                return Err(ManifestError::DuplicateName {
                    name: seg.name.clone(),
                });
            }
            names.push(&seg.name);
            match expected_offset {
                None => {
                    let max = crate::image::MAX_HEAD_LEN as u64;
                    if !is_aligned(seg.offset) || seg.offset < MIN_DATA_OFFSET || seg.offset > max {
                        return Err(ManifestError::FirstOffset {
                            segment: seg.name.clone(),
                            offset: seg.offset,
                            max,
                        });
                    }
                }
                Some(expected) if seg.offset != expected => {
                    return Err(ManifestError::Layout {
                        segment: seg.name.clone(),
                        expected,
                        found: seg.offset,
                    });
                }
                Some(_) => {}
            }
            if seg.size == 0 {
                return Err(ManifestError::EmptySegment {
                    segment: seg.name.clone(),
                });
            }
            end = seg
                .offset
                .checked_add(seg.size)
                .and_then(align_up)
                .filter(|e| *e <= MAX_IMAGE_SIZE)
                .ok_or_else(|| ManifestError::TooLarge {
                    segment: seg.name.clone(),
                })?;
            expected_offset = Some(end);
            validate_data_ranges(seg)?;
            let pieces = seg.data_pieces(MAX_CHUNK_HASHES + 1);
            if seg.chunk_sha256.len() != pieces {
                return Err(ManifestError::ChunkHashes {
                    segment: seg.name.clone(),
                    expected: pieces,
                    found: seg.chunk_sha256.len(),
                });
            }
        }
        if self.total_size != end {
            return Err(ManifestError::TotalSize {
                expected: end,
                found: self.total_size,
            });
        }
        self.validate_verity()?;
        let expected = image_sha256(&self.segments);
        if expected != self.image_sha256 {
            return Err(ManifestError::ImageHash {
                expected: hex::encode(expected),
                found: hex::encode(self.image_sha256),
            });
        }
        Ok(())
    }

    /// The segment called `name`.
    pub fn segment(&self, name: &str) -> Option<&Segment> {
        self.segments.iter().find(|s| s.name == name)
    }

    /// SHA-256 of the canonical bytes: the identity of this manifest (and thus of the image).
    pub fn id(&self) -> [u8; 32] {
        Sha256::digest(self.to_canonical_bytes()).into()
    }

    /// Offset of the first segment (= the head length, `data_offset` in the header).
    pub fn data_offset(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.offset)
    }

    /// Bytes covered by data ranges, over all segments.
    pub fn data_bytes(&self) -> u64 {
        self.segments.iter().map(Segment::data_bytes).sum()
    }

    /// The verity entry protecting segment `data`, if any.
    pub fn verity_of(&self, data: &str) -> Option<&Verity> {
        self.verity.iter().find(|v| v.data == data)
    }

    fn validate_verity(&self) -> Result<(), ManifestError> {
        if self.verity.len() > MAX_VERITY {
            return Err(ManifestError::Verity {
                data: String::new(),
                reason: format!("{} entries, at most {MAX_VERITY}", self.verity.len()),
            });
        }
        let mut used: Vec<&str> = Vec::new();
        let mut prev: Option<&str> = None;
        for v in &self.verity {
            let bad = |reason: String| ManifestError::Verity {
                data: shorten(&v.data),
                reason,
            };
            if prev.is_some_and(|p| p >= v.data.as_str()) {
                return Err(bad("entries must be sorted by data segment name".into()));
            }
            prev = Some(&v.data);
            let data = self
                .segment(&v.data)
                .ok_or_else(|| bad("no such data segment".into()))?;
            let hash = self
                .segment(&v.hash)
                .ok_or_else(|| bad(format!("no hash segment {:?}", shorten(&v.hash))))?;
            if v.data == v.hash {
                return Err(bad("a segment cannot hold its own hash tree".into()));
            }
            for name in [&v.data, &v.hash] {
                if used.contains(&name.as_str()) {
                    return Err(bad(format!(
                        "segment {:?} is in more than one verity entry",
                        shorten(name)
                    )));
                }
                used.push(name);
            }
            if v.salt.len() > crate::verity::MAX_SALT {
                return Err(bad(format!(
                    "salt is {} bytes, at most {}",
                    v.salt.len(),
                    crate::verity::MAX_SALT
                )));
            }
            let blocks = crate::verity::data_blocks(data.size);
            if blocks < 2 {
                return Err(bad(
                    "the data segment is smaller than two 4 KiB blocks".into()
                ));
            }
            let want = crate::verity::tree_size(blocks);
            if hash.size != want {
                return Err(bad(format!(
                    "hash segment {:?} is {} bytes, a tree of {blocks} blocks is {want}",
                    shorten(&v.hash),
                    hash.size
                )));
            }
        }
        Ok(())
    }
}

fn validate_data_ranges(seg: &Segment) -> Result<(), ManifestError> {
    if seg.data_ranges.len() > MAX_DATA_RANGES {
        return Err(ManifestError::TooManyDataRanges {
            segment: seg.name.clone(),
            count: seg.data_ranges.len(),
        });
    }
    let mut prev_end: Option<u64> = None;
    for (index, r) in seg.data_ranges.iter().enumerate() {
        let bad = |reason| ManifestError::DataRange {
            segment: seg.name.clone(),
            index,
            offset: r.offset,
            len: r.len,
            reason,
        };
        if r.len == 0 {
            return Err(bad("empty range"));
        }
        if !is_aligned(r.offset) {
            return Err(bad("offset is not a multiple of 4096"));
        }
        let end = r
            .offset
            .checked_add(r.len)
            .ok_or_else(|| bad("end overflows"))?;
        if end > seg.size {
            return Err(bad("ends beyond the segment's size"));
        }
        if !is_aligned(end) && end != seg.size {
            return Err(bad(
                "length is not a multiple of 4096 and the range does not end the segment",
            ));
        }
        if let Some(p) = prev_end {
            if r.offset < p {
                return Err(bad(
                    "overlaps or is before the previous range (ranges must be sorted)",
                ));
            }
            if r.offset == p {
                return Err(bad(
                    "touches the previous range (adjacent ranges must be merged)",
                ));
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

fn covered(ranges: &[DataRange], x: u64) -> bool {
    let i = ranges.partition_point(|r| r.end() <= x);
    ranges.get(i).is_some_and(|r| r.offset <= x)
}

/// The first offset (relative to the segment start, below `size`) where the two data-range
/// lists disagree about whether a byte is data, or `None` when they describe the same bytes.
pub fn first_data_range_difference(a: &[DataRange], b: &[DataRange], size: u64) -> Option<u64> {
    let mut points: Vec<u64> = Vec::with_capacity(2 * (a.len() + b.len()) + 1);
    points.push(0);
    for r in a.iter().chain(b) {
        points.push(r.offset);
        points.push(r.end());
    }
    points.sort_unstable();
    points.dedup();
    points
        .into_iter()
        .filter(|p| *p < size)
        .find(|p| covered(a, *p) != covered(b, *p))
}

fn shorten(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let mut cut = 64;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn parse_hash(s: &str, field: impl Fn() -> String) -> Result<[u8; 32], ManifestError> {
    let mut out = [0u8; 32];
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ManifestError::BadHex { field: field() });
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| ManifestError::BadHex { field: field() })?;
    Ok(out)
}

// ---- JSON shape (parse side only; encoding is hand-written above) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: u32,
    version: String,
    security_version: u64,
    total_size: u64,
    segments: Bounded<RawSegment>,
    verity: Bounded<RawVerity>,
    image_sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerity {
    data: String,
    hash: String,
    salt: String,
    root_hash: String,
}

impl BoundedItem for RawVerity {
    const MAX: usize = MAX_VERITY;
    const WHAT: &'static str = "verity entries";
}

/// Parse a `chunk_sha256` string (64 hex digits per entry, concatenated) of a segment with
/// `expected` data pieces: the entry count is checked against it and against `left` (what
/// remains of [`MAX_CHUNK_HASHES`]) before anything is allocated.
fn parse_hash_list(
    hex_list: &str,
    expected: usize,
    left: &mut usize,
    i: usize,
) -> Result<Vec<[u8; 32]>, ManifestError> {
    let field = || format!("chunk_sha256 of segment #{i}");
    if !hex_list.len().is_multiple_of(64) {
        return Err(ManifestError::BadHex { field: field() });
    }
    let found = hex_list.len() / 64;
    if found != expected || found > *left {
        return Err(ManifestError::ChunkHashes {
            segment: format!("#{i}"),
            expected,
            found,
        });
    }
    *left -= found;
    let mut out = Vec::with_capacity(found);
    for k in 0..found {
        let part = hex_list
            .get(k * 64..(k + 1) * 64)
            .ok_or_else(|| ManifestError::BadHex { field: field() })?;
        out.push(parse_hash(part, field)?);
    }
    Ok(out)
}

fn parse_salt(s: &str, i: usize) -> Result<Vec<u8>, ManifestError> {
    let field = || format!("salt of verity #{i}");
    if s.len() > 2 * crate::verity::MAX_SALT
        || !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ManifestError::BadHex { field: field() });
    }
    hex::decode(s).map_err(|_| ManifestError::BadHex { field: field() })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    name: String,
    offset: u64,
    size: u64,
    sha256: String,
    data_sha256: String,
    chunk_sha256: String,
    data_ranges: Bounded<(u64, u64)>,
}

/// Only the format number, whatever else the object holds (used to name an unsupported format
/// when the full parse fails).
#[derive(Deserialize)]
struct FormatProbe {
    format: u32,
}

/// How many elements of a JSON array of `Self` may be read, and what to call them.
trait BoundedItem {
    const MAX: usize;
    const WHAT: &'static str;
}

impl BoundedItem for RawSegment {
    const MAX: usize = MAX_SEGMENTS;
    const WHAT: &'static str = "segments";
}

impl BoundedItem for (u64, u64) {
    const MAX: usize = MAX_DATA_RANGES;
    const WHAT: &'static str = "data ranges in one segment";
}

/// A JSON array that stops with an error after `T::MAX` elements, so a hostile count never
/// makes us allocate more than the bound.
struct Bounded<T>(Vec<T>);

impl<'de, T: Deserialize<'de> + BoundedItem> Deserialize<'de> for Bounded<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + BoundedItem> Visitor<'de> for V<T> {
            type Value = Bounded<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of at most {} {}", T::MAX, T::WHAT)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(T::MAX).min(64));
                while let Some(x) = seq.next_element()? {
                    if v.len() >= T::MAX {
                        return Err(de::Error::custom(format_args!(
                            "too many {} (max {})",
                            T::WHAT,
                            T::MAX
                        )));
                    }
                    v.push(x);
                }
                Ok(Bounded(v))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

// ---- streaming helpers ----

/// True when every byte of `b` is zero (vectorisation-friendly).
pub fn is_all_zero(b: &[u8]) -> bool {
    b.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// Computes the data ranges of a byte stream fed in pieces of any size: the maximal runs of
/// 4 KiB blocks (relative to the stream start) that contain a non-zero byte. The last block
/// may be short; its range is clipped to the stream length.
#[derive(Clone, Debug, Default)]
pub struct DataRangeBuilder {
    pos: u64,
    block_nonzero: bool,
    ranges: Vec<DataRange>,
}

impl DataRangeBuilder {
    /// An empty builder at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let in_block = (self.pos % ALIGN) as usize;
            let n = (ALIGN as usize - in_block).min(data.len());
            let (now, rest) = data.split_at(n);
            let nonzero = !self.block_nonzero && !is_all_zero(now);
            self.advance(n as u64, nonzero);
            data = rest;
        }
    }

    /// Account for the next `n` bytes, which do not cross a 4 KiB boundary and contain a
    /// non-zero byte iff `nonzero`.
    fn advance(&mut self, n: u64, nonzero: bool) {
        self.block_nonzero |= nonzero;
        self.pos += n;
        if is_aligned(self.pos) {
            self.commit(self.pos - ALIGN, ALIGN);
        }
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn commit(&mut self, start: u64, len: u64) {
        if self.block_nonzero {
            match self.ranges.last_mut() {
                Some(last) if last.end() == start => last.len += len,
                _ => self.ranges.push(DataRange { offset: start, len }),
            }
        }
        self.block_nonzero = false;
    }

    /// The ranges of the whole stream.
    pub fn finish(mut self) -> Vec<DataRange> {
        let tail = self.pos % ALIGN;
        if tail != 0 {
            self.commit(self.pos - tail, tail);
        }
        self.ranges
    }
}

/// The data ranges of `bytes` (see [`DataRangeBuilder`]).
pub fn data_ranges_of(bytes: &[u8]) -> Vec<DataRange> {
    let mut b = DataRangeBuilder::new();
    b.update(bytes);
    b.finish()
}

/// What a segment's content hashes to: size, SHA-256, data SHA-256 and data ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentDigest {
    /// Content length.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// SHA-256 of the non-zero 4 KiB blocks of the content, in order (the bytes of the data
    /// ranges concatenated; see [`Segment::data_sha256`]).
    pub data_sha256: [u8; 32],
    /// SHA-256 of each [`HASH_CHUNK`] piece (see [`Segment::chunk_sha256`]).
    pub chunk_sha256: Vec<[u8; 32]>,
    /// Maximal runs of non-zero 4 KiB blocks.
    pub data_ranges: Vec<DataRange>,
}

/// Streaming digest of a segment's content: feed it the bytes in order, in pieces of any size.
#[derive(Clone, Debug, Default)]
pub struct SegmentHasher {
    sha: Sha256,
    data_sha: Sha256,
    ranges: DataRangeBuilder,
    /// The bytes fed so far of the current 4 KiB block, when it arrived in several pieces
    /// (empty at a block boundary; whole blocks fed in one piece are never copied).
    pending: Vec<u8>,
    /// Whether `pending` holds a non-zero byte.
    pending_nonzero: bool,
    /// SHA-256 of the current [`HASH_CHUNK`] piece, its bytes so far and whether one is
    /// non-zero (only pieces with data get an entry).
    piece: Sha256,
    piece_len: u64,
    piece_nonzero: bool,
    /// Hashes of the completed pieces.
    pieces: Vec<[u8; 32]>,
}

impl SegmentHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.sha.update(data);
        while !data.is_empty() {
            let block = ALIGN as usize;
            let n = (block - self.pending.len()).min(data.len());
            let (now, rest) = data.split_at(n);
            data = rest;
            let nonzero = !is_all_zero(now);
            self.ranges.advance(n as u64, nonzero);
            // `now` never crosses a 4 KiB block boundary, so never a piece boundary either.
            self.piece_update(now, nonzero);
            if self.pending.is_empty() && n == block {
                // A whole block in one piece: hash it in place.
                if nonzero {
                    self.data_sha.update(now);
                }
                continue;
            }
            if self.pending.capacity() < block {
                self.pending.reserve_exact(block - self.pending.len());
            }
            self.pending.extend_from_slice(now);
            self.pending_nonzero |= nonzero;
            if self.pending.len() == block {
                self.flush_pending();
            }
        }
    }

    /// Feed `now` (inside one piece) to the current piece's hash; close the piece at a
    /// [`HASH_CHUNK`] boundary (an all-zero piece gets no entry).
    fn piece_update(&mut self, now: &[u8], nonzero: bool) {
        self.piece.update(now);
        self.piece_len += now.len() as u64;
        self.piece_nonzero |= nonzero;
        if self.piece_len == HASH_CHUNK {
            let done = std::mem::take(&mut self.piece);
            if self.piece_nonzero {
                self.pieces.push(done.finalize().into());
            }
            self.piece_len = 0;
            self.piece_nonzero = false;
        }
    }

    /// Hash the pending (complete, or final short) block if it is not all-zero; start a new one.
    fn flush_pending(&mut self) {
        if self.pending_nonzero {
            self.data_sha.update(&self.pending);
        }
        self.pending.clear();
        self.pending_nonzero = false;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.ranges.position()
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The digest of everything fed.
    pub fn finish(mut self) -> SegmentDigest {
        // The final short block counts like any other.
        self.flush_pending();
        let size = self.ranges.position();
        if self.piece_len > 0 && self.piece_nonzero {
            self.pieces.push(self.piece.finalize().into());
        }
        SegmentDigest {
            chunk_sha256: self.pieces,
            size,
            sha256: self.sha.finalize().into(),
            data_sha256: self.data_sha.finalize().into(),
            data_ranges: self.ranges.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_merge_and_clip() {
        let mut v = vec![0u8; 5 * 4096 + 10];
        v[1] = 1; // block 0
        v[4096 + 5] = 1; // block 1 (merged with 0)
        v[3 * 4096] = 1; // block 3
        v[5 * 4096 + 9] = 1; // short tail block
        assert_eq!(
            data_ranges_of(&v),
            vec![
                DataRange {
                    offset: 0,
                    len: 8192
                },
                DataRange {
                    offset: 3 * 4096,
                    len: 4096
                },
                DataRange {
                    offset: 5 * 4096,
                    len: 10
                },
            ]
        );
        // byte-at-a-time feeding gives the same answer
        let mut b = DataRangeBuilder::new();
        for x in v.chunks(1) {
            b.update(x);
        }
        assert_eq!(b.finish(), data_ranges_of(&v));
    }

    #[test]
    fn data_sha256_hashes_only_non_zero_blocks() {
        let mut v = vec![0u8; 5 * 4096 + 10];
        v[1] = 1; // block 0
        v[3 * 4096 + 4095] = 2; // block 3
        v[5 * 4096 + 9] = 3; // short tail block
        let mut want = Sha256::new();
        want.update(&v[..4096]);
        want.update(&v[3 * 4096..4 * 4096]);
        want.update(&v[5 * 4096..]);
        let want: [u8; 32] = want.finalize().into();
        for piece in [1, 7, 4095, 4096, 4097, 1 << 20] {
            let mut h = SegmentHasher::new();
            for c in v.chunks(piece) {
                h.update(c);
            }
            let d = h.finish();
            assert_eq!(d.data_sha256, want, "piece {piece}");
            assert_eq!(d.sha256, <[u8; 32]>::from(Sha256::digest(&v)));
        }
        // no data at all: the hash of the empty string
        let empty: [u8; 32] = Sha256::digest([]).into();
        let mut h = SegmentHasher::new();
        h.update(&[0u8; 9000]);
        assert_eq!(h.finish().data_sha256, empty);
        assert_eq!(SegmentHasher::new().finish().data_sha256, empty);
    }

    #[test]
    fn all_zero_has_no_ranges() {
        assert!(data_ranges_of(&[0u8; 10000]).is_empty());
        assert!(data_ranges_of(&[]).is_empty());
    }

    #[test]
    fn difference_finds_first_point() {
        let a = [DataRange {
            offset: 0,
            len: 8192,
        }];
        let b = [DataRange {
            offset: 0,
            len: 4096,
        }];
        assert_eq!(first_data_range_difference(&a, &b, 8192), Some(4096));
        assert_eq!(first_data_range_difference(&a, &a, 8192), None);
        assert_eq!(first_data_range_difference(&[], &b, 8192), Some(0));
    }

    #[test]
    fn align_up_works() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(4096));
        assert_eq!(align_up(4096), Some(4096));
        assert_eq!(align_up(u64::MAX), None);
    }
}
