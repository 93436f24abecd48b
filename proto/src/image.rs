//! The image file: a 4 KiB header, the canonical manifest, a 64-byte signature slot, zero
//! padding to the next 4 KiB boundary (`data_offset`), then the segments, each 4 KiB aligned and
//! zero padded. Byte tables: `docs/provisioning/overview.md`.
//!
//! * [`Header`]: the fixed 4 KiB header (magic, lengths, offsets, crc32).
//! * [`ImageHead`]: everything before the first segment, parsed strictly.
//! * [`layout`]: turn named segment digests into a [`Manifest`] with final offsets.
//! * [`ImageVerifier`]: check the bytes from `data_offset` to the end against the manifest,
//!   streaming, naming the segment on any mismatch.
//! * Signing key text format and Ed25519 helpers ([`sign_manifest`], [`decode_public_key`], …).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::manifest::{
    align_up, first_data_range_difference, image_sha256, is_aligned, is_all_zero, rebuild_hint,
    validate_version, Manifest, ManifestError, Segment, SegmentDigest, SegmentHasher, ALIGN,
    FORMAT_VERSION, MAX_IMAGE_SIZE, MAX_MANIFEST_LEN, MAX_SEGMENTS,
};

/// Length of the fixed header at offset 0.
pub const HEADER_LEN: usize = 4096;
/// Upper bound of the head (header + manifest + signature slot + padding): the most a reader
/// ever buffers before the first segment.
pub const MAX_HEAD_LEN: usize = 2 << 20;
/// Magic at offset 0.
pub const MAGIC: [u8; 8] = *b"NXOSIMG\0";
/// Length of an Ed25519 signature; this many bytes are always reserved after the manifest.
pub const SIGNATURE_LEN: usize = 64;
/// Offset of the manifest (right after the header).
pub const MANIFEST_OFFSET: u64 = HEADER_LEN as u64;
/// Offset of the crc32 in the header (the last 4 bytes).
const CRC_OFFSET: usize = HEADER_LEN - 4;
/// End of the defined header fields; bytes from here to [`CRC_OFFSET`] are reserved (zero).
const FIELDS_END: usize = 56;

/// First line tag of a secret key file (`nexus-ed25519-secret-v1 <64 hex digits>`).
pub const SECRET_KEY_TAG: &str = "nexus-ed25519-secret-v1";
/// First line tag of a public key file (`nexus-ed25519-public-v1 <64 hex digits>`).
pub const PUBLIC_KEY_TAG: &str = "nexus-ed25519-public-v1";

/// Why an image (head, content or signature) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The manifest is invalid.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// Fewer bytes than the header needs.
    #[error("image is {len} bytes, shorter than the {HEADER_LEN}-byte header (truncated, or not an image)")]
    HeaderTooShort {
        /// Bytes available.
        len: usize,
    },
    /// Wrong magic.
    #[error("not a nexus image (magic is not \"NXOSIMG\\0\")")]
    BadMagic,
    /// Unknown format (the header's format number; e.g. a format-1 image).
    #[error(
        "unsupported image format {found} (this build understands format {FORMAT_VERSION}); {}",
        rebuild_hint(*.found)
    )]
    UnsupportedFormat {
        /// Format found.
        found: u32,
    },
    /// Header checksum mismatch.
    #[error("header crc32 mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is corrupt")]
    HeaderCrc {
        /// crc32 in the header.
        stored: u32,
        /// crc32 of the header bytes.
        computed: u32,
    },
    /// A header field is inconsistent.
    #[error("header field {field} is {found}, expected {expected}")]
    HeaderField {
        /// Field name.
        field: &'static str,
        /// What it holds.
        found: u64,
        /// What it must hold (a value or a description).
        expected: String,
    },
    /// Reserved header bytes are not zero.
    #[error("reserved header byte at offset {offset} is not zero")]
    ReservedNotZero {
        /// Offset in the file.
        offset: usize,
    },
    /// The head buffer does not have the length the header announces.
    #[error("image head is {found} bytes, the header says {expected} (data_offset)")]
    HeadLength {
        /// `data_offset`.
        expected: u64,
        /// Bytes given.
        found: usize,
    },
    /// The file ends before the end of its head.
    #[error(
        "image truncated: the file is {len} bytes, but its head alone (header, manifest, \
         signature slot) is {data_offset} bytes"
    )]
    HeadTruncated {
        /// File length.
        len: u64,
        /// `data_offset` from the header.
        data_offset: u64,
    },
    /// Non-zero bytes in the signature slot or the head padding.
    #[error("head padding byte at offset {offset} is not zero")]
    HeadPaddingNotZero {
        /// Offset in the file.
        offset: usize,
    },
    /// Header and manifest disagree.
    #[error("header and manifest disagree on {field}: header {header}, manifest {manifest}")]
    HeaderManifestMismatch {
        /// What they disagree on.
        field: &'static str,
        /// Header value.
        header: u64,
        /// Manifest value.
        manifest: u64,
    },
    /// `layout` could not place the segments.
    #[error("cannot lay out the image: {reason}")]
    Layout {
        /// Why.
        reason: String,
    },
    /// The image carries no signature but one was required.
    #[error("image is not signed")]
    Unsigned,
    /// The signature does not verify with the given key.
    #[error("signature does not verify with the given public key (wrong key, or the manifest was altered)")]
    BadSignature,
    /// The public key bytes are not a valid Ed25519 point.
    #[error("invalid Ed25519 public key")]
    BadPublicKey,
    /// A key file is malformed.
    #[error("malformed key text: {reason} (expected one line `{tag} <64 hex digits>`)")]
    BadKeyText {
        /// Expected tag.
        tag: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Segment content length differs (only when checking a digest of a different length).
    #[error("segment {segment:?}: size mismatch (expected {expected} bytes, got {found})")]
    SegmentSize {
        /// Segment name.
        segment: String,
        /// Manifest size.
        expected: u64,
        /// Digest size.
        found: u64,
    },
    /// Segment content hash differs.
    #[error("segment {segment:?}: sha256 mismatch (expected {expected}, got {found})")]
    SegmentHash {
        /// Segment name.
        segment: String,
        /// Manifest hash (hex).
        expected: String,
        /// Computed hash (hex).
        found: String,
    },
    /// The hash of the segment's data ranges differs from `data_sha256` in the manifest.
    #[error("segment {segment:?}: data_sha256 mismatch (expected {expected}, got {found})")]
    SegmentDataHash {
        /// Segment name.
        segment: String,
        /// Manifest data hash (hex).
        expected: String,
        /// Computed data hash (hex).
        found: String,
    },
    /// A `chunk_sha256` entry differs from the hash of that 1 MiB piece of the content.
    #[error("segment {segment:?}: chunk_sha256 entry #{piece} does not match the content")]
    SegmentChunkHash {
        /// Segment name.
        segment: String,
        /// Index of the first differing piece.
        piece: usize,
    },
    /// Data ranges do not describe the content.
    #[error("segment {segment:?}: data ranges do not match the content: {detail}")]
    DataRanges {
        /// Segment name.
        segment: String,
        /// Where and how they differ.
        detail: String,
    },
    /// Non-zero byte in the padding after a segment.
    #[error("segment {segment:?}: padding byte at image offset {offset} is not zero")]
    SegmentPadding {
        /// Segment whose padding it is.
        segment: String,
        /// Offset in the file.
        offset: u64,
    },
    /// The image ends inside a segment.
    #[error(
        "image truncated: it ends at offset {at}, inside segment {segment:?} (the manifest says \
         {total_size} bytes)"
    )]
    Truncated {
        /// The segment that is cut.
        segment: String,
        /// Where the data ended.
        at: u64,
        /// Expected image size.
        total_size: u64,
    },
    /// Bytes after the last segment's padding.
    #[error("image has trailing bytes after offset {total_size} (total_size)")]
    TrailingData {
        /// Expected image size.
        total_size: u64,
    },
}

impl ImageError {
    /// The segment this error is about, if any.
    pub fn segment(&self) -> Option<&str> {
        match self {
            ImageError::SegmentSize { segment, .. }
            | ImageError::SegmentHash { segment, .. }
            | ImageError::SegmentDataHash { segment, .. }
            | ImageError::DataRanges { segment, .. }
            | ImageError::SegmentPadding { segment, .. }
            | ImageError::Truncated { segment, .. } => Some(segment),
            _ => None,
        }
    }

    /// Whether this is a signature problem (unsigned, bad signature, bad key).
    pub fn is_signature_error(&self) -> bool {
        matches!(
            self,
            ImageError::Unsigned | ImageError::BadSignature | ImageError::BadPublicKey
        )
    }
}

/// The fixed 4 KiB header. All integers little-endian.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `NXOSIMG\0` |
/// | 8 | 4 | format ([`FORMAT_VERSION`], 2) |
/// | 12 | 4 | header_len (4096) |
/// | 16 | 8 | manifest_offset (4096) |
/// | 24 | 4 | manifest_len |
/// | 28 | 8 | signature_offset (= manifest_offset + manifest_len) |
/// | 36 | 4 | signature_len (0 or 64) |
/// | 40 | 8 | data_offset |
/// | 48 | 8 | total_size |
/// | 56 | 4036 | reserved, zero |
/// | 4092 | 4 | crc32 of bytes 0..4092 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Always [`MANIFEST_OFFSET`].
    pub manifest_offset: u64,
    /// Length of the canonical manifest, 1..=[`MAX_MANIFEST_LEN`].
    pub manifest_len: u32,
    /// Always `manifest_offset + manifest_len`.
    pub signature_offset: u64,
    /// 0 (unsigned) or [`SIGNATURE_LEN`].
    pub signature_len: u32,
    /// `align_up(signature_offset + SIGNATURE_LEN)`: the 64-byte slot is reserved even when
    /// unsigned, so signing does not move the segments.
    pub data_offset: u64,
    /// Size of the whole image file.
    pub total_size: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// `data_offset` for a manifest of `manifest_len` bytes.
pub fn data_offset_for(manifest_len: usize) -> Option<u64> {
    MANIFEST_OFFSET
        .checked_add(manifest_len as u64)?
        .checked_add(SIGNATURE_LEN as u64)
        .and_then(align_up)
}

impl Header {
    /// Parse and check the header in the first [`HEADER_LEN`] bytes of `b` (more may follow).
    ///
    /// Checks magic, format, header_len, crc32, reserved bytes and the consistency of every
    /// offset and length, so a caller may then read exactly `data_offset` bytes (at most
    /// [`MAX_HEAD_LEN`]) for [`ImageHead::parse`].
    pub fn parse(b: &[u8]) -> Result<Header, ImageError> {
        let Some(b) = b.get(..HEADER_LEN) else {
            return Err(ImageError::HeaderTooShort { len: b.len() });
        };
        if b[..8] != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let format = le_u32(b, 8);
        if format != FORMAT_VERSION {
            return Err(ImageError::UnsupportedFormat { found: format });
        }
        let stored = le_u32(b, CRC_OFFSET);
        let computed = crc32fast::hash(&b[..CRC_OFFSET]);
        if stored != computed {
            return Err(ImageError::HeaderCrc { stored, computed });
        }
        let field = |field, found: u64, expected: String| ImageError::HeaderField {
            field,
            found,
            expected,
        };
        let header_len = le_u32(b, 12);
        if header_len as usize != HEADER_LEN {
            return Err(field(
                "header_len",
                header_len.into(),
                HEADER_LEN.to_string(),
            ));
        }
        if let Some(i) = b[FIELDS_END..CRC_OFFSET].iter().position(|x| *x != 0) {
            return Err(ImageError::ReservedNotZero {
                offset: FIELDS_END + i,
            });
        }
        let h = Header {
            manifest_offset: le_u64(b, 16),
            manifest_len: le_u32(b, 24),
            signature_offset: le_u64(b, 28),
            signature_len: le_u32(b, 36),
            data_offset: le_u64(b, 40),
            total_size: le_u64(b, 48),
        };
        if h.manifest_offset != MANIFEST_OFFSET {
            return Err(field(
                "manifest_offset",
                h.manifest_offset,
                MANIFEST_OFFSET.to_string(),
            ));
        }
        if h.manifest_len == 0 || h.manifest_len as usize > MAX_MANIFEST_LEN {
            return Err(field(
                "manifest_len",
                h.manifest_len.into(),
                format!("1..={MAX_MANIFEST_LEN}"),
            ));
        }
        let sig_off = MANIFEST_OFFSET + u64::from(h.manifest_len);
        if h.signature_offset != sig_off {
            return Err(field(
                "signature_offset",
                h.signature_offset,
                sig_off.to_string(),
            ));
        }
        if h.signature_len != 0 && h.signature_len as usize != SIGNATURE_LEN {
            return Err(field(
                "signature_len",
                h.signature_len.into(),
                format!("0 or {SIGNATURE_LEN}"),
            ));
        }
        let data_offset = data_offset_for(h.manifest_len as usize).unwrap_or(u64::MAX);
        if h.data_offset != data_offset {
            return Err(field("data_offset", h.data_offset, data_offset.to_string()));
        }
        if h.total_size <= h.data_offset
            || !is_aligned(h.total_size)
            || h.total_size > MAX_IMAGE_SIZE
        {
            return Err(field(
                "total_size",
                h.total_size,
                format!("a multiple of {ALIGN} above data_offset and at most {MAX_IMAGE_SIZE}"),
            ));
        }
        Ok(h)
    }

    /// Encode, crc32 included.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[28..36].copy_from_slice(&self.signature_offset.to_le_bytes());
        b[36..40].copy_from_slice(&self.signature_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.total_size.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Everything before the first segment: header, manifest, optional 64-byte Ed25519 signature
/// (the slot is always reserved), zero padding up to `data_offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageHead {
    /// The header.
    pub header: Header,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Its canonical bytes (what the signature covers).
    pub manifest_bytes: Vec<u8>,
    /// Ed25519 signature over `manifest_bytes`, if signed.
    pub signature: Option<[u8; 64]>,
}

impl ImageHead {
    /// Parse the head: `head` must be exactly the file bytes `[0, data_offset)` (read the
    /// header first, [`Header::parse`] it, then read `data_offset` bytes).
    ///
    /// Strict: header checks, canonical manifest, zero signature slot when unsigned, zero
    /// padding, and header/manifest consistency (`total_size`, first segment at `data_offset`).
    pub fn parse(head: &[u8]) -> Result<ImageHead, ImageError> {
        let header = Header::parse(head)?;
        if head.len() as u64 != header.data_offset {
            return Err(ImageError::HeadLength {
                expected: header.data_offset,
                found: head.len(),
            });
        }
        // All offsets below were checked by Header::parse and fit inside `head`.
        let m_start = HEADER_LEN;
        let m_end = m_start + header.manifest_len as usize;
        let manifest_bytes = head[m_start..m_end].to_vec();
        let manifest = Manifest::from_bytes(&manifest_bytes)?;
        let signature = if header.signature_len as usize == SIGNATURE_LEN {
            let mut s = [0u8; 64];
            s.copy_from_slice(&head[m_end..m_end + SIGNATURE_LEN]);
            Some(s)
        } else {
            None
        };
        let pad_start = m_end + header.signature_len as usize;
        if let Some(i) = head[pad_start..].iter().position(|x| *x != 0) {
            return Err(ImageError::HeadPaddingNotZero {
                offset: pad_start + i,
            });
        }
        check_consistent(&header, &manifest)?;
        Ok(ImageHead {
            header,
            manifest,
            manifest_bytes,
            signature,
        })
    }

    /// Build the head for a manifest (laid out by [`layout`]) and an optional signature over
    /// its canonical bytes (see [`sign_manifest`]).
    pub fn build(
        manifest: &Manifest,
        signature: Option<[u8; 64]>,
    ) -> Result<ImageHead, ImageError> {
        manifest.validate()?;
        let manifest_bytes = manifest.to_canonical_bytes();
        if manifest_bytes.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLong {
                len: manifest_bytes.len(),
                max: MAX_MANIFEST_LEN,
            }
            .into());
        }
        let data_offset = data_offset_for(manifest_bytes.len()).unwrap_or(u64::MAX);
        let header = Header {
            manifest_offset: MANIFEST_OFFSET,
            manifest_len: manifest_bytes.len() as u32,
            signature_offset: MANIFEST_OFFSET + manifest_bytes.len() as u64,
            signature_len: if signature.is_some() {
                SIGNATURE_LEN as u32
            } else {
                0
            },
            data_offset,
            total_size: manifest.total_size,
        };
        check_consistent(&header, manifest)?;
        Ok(ImageHead {
            header,
            manifest: manifest.clone(),
            manifest_bytes,
            signature,
        })
    }

    /// Encode: exactly `data_offset` bytes; `ImageHead::parse(&h.to_bytes()) == Ok(h)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = (self.header.data_offset as usize).min(MAX_HEAD_LEN);
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&self.header.to_bytes());
        v.extend_from_slice(&self.manifest_bytes);
        v.extend_from_slice(&self.signature.unwrap_or([0u8; 64]));
        v.resize(len, 0);
        v
    }

    /// Whether a signature is present.
    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// Check the signature with `public_key`. [`ImageError::Unsigned`] when there is none.
    pub fn verify_signature(&self, public_key: &[u8; 32]) -> Result<(), ImageError> {
        let sig = self.signature.ok_or(ImageError::Unsigned)?;
        let key = VerifyingKey::from_bytes(public_key).map_err(|_| ImageError::BadPublicKey)?;
        key.verify_strict(&self.manifest_bytes, &Signature::from_bytes(&sig))
            .map_err(|_| ImageError::BadSignature)
    }
}

fn check_consistent(header: &Header, manifest: &Manifest) -> Result<(), ImageError> {
    if header.total_size != manifest.total_size {
        return Err(ImageError::HeaderManifestMismatch {
            field: "total_size",
            header: header.total_size,
            manifest: manifest.total_size,
        });
    }
    if header.data_offset != manifest.data_offset() {
        return Err(ImageError::HeaderManifestMismatch {
            field: "data_offset (first segment offset)",
            header: header.data_offset,
            manifest: manifest.data_offset(),
        });
    }
    Ok(())
}

/// Lay out an image: place the segments (in the given order) contiguously from `data_offset`,
/// solving the fixpoint "offsets depend on the manifest length, which depends on the offsets"
/// by starting from the smallest `data_offset` and raising it until it is stable. Deterministic.
pub fn layout(version: &str, parts: &[(String, SegmentDigest)]) -> Result<Manifest, ImageError> {
    layout_with(
        &LayoutOptions {
            version: version.to_string(),
            ..LayoutOptions::default()
        },
        parts,
    )
}

/// What goes into a manifest besides the segments (see [`layout_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutOptions {
    /// Image version string.
    pub version: String,
    /// Anti-rollback counter ([`Manifest::security_version`]).
    pub security_version: u64,
    /// dm-verity entries (sorted by data segment name here).
    pub verity: Vec<crate::manifest::Verity>,
}

/// [`layout`] with a security version and verity entries.
pub fn layout_with(
    opts: &LayoutOptions,
    parts: &[(String, SegmentDigest)],
) -> Result<Manifest, ImageError> {
    let version = opts.version.as_str();
    let mut verity = opts.verity.clone();
    verity.sort_by(|a, b| a.data.cmp(&b.data));
    validate_version(version)?;
    if parts.len() > MAX_SEGMENTS {
        return Err(ManifestError::TooManySegments { count: parts.len() }.into());
    }
    let mut data_offset = data_offset_for(1).unwrap_or(u64::MAX);
    // The manifest length is non-decreasing in data_offset, so this converges; a handful of
    // rounds suffices in practice (one per extra decimal digit of the offsets).
    for _ in 0..32 {
        let mut segments = Vec::with_capacity(parts.len());
        let mut offset = data_offset;
        for (name, d) in parts {
            segments.push(Segment {
                name: name.clone(),
                offset,
                size: d.size,
                sha256: d.sha256,
                data_sha256: d.data_sha256,
                chunk_sha256: d.chunk_sha256.clone(),
                data_ranges: d.data_ranges.clone(),
            });
            offset = offset
                .checked_add(d.size)
                .and_then(align_up)
                .filter(|o| *o <= MAX_IMAGE_SIZE)
                .ok_or_else(|| ImageError::Layout {
                    reason: format!("the image exceeds {MAX_IMAGE_SIZE} bytes"),
                })?;
        }
        let mut m = Manifest {
            format: FORMAT_VERSION,
            version: version.to_string(),
            security_version: opts.security_version,
            verity: verity.clone(),
            total_size: offset,
            image_sha256: [0u8; 32],
            segments,
        };
        m.image_sha256 = image_sha256(&m.segments);
        let len = m.to_canonical_bytes().len();
        if len > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLong {
                len,
                max: MAX_MANIFEST_LEN,
            }
            .into());
        }
        let needed = data_offset_for(len).unwrap_or(u64::MAX);
        if needed == data_offset {
            m.validate()?;
            return Ok(m);
        }
        data_offset = needed;
    }
    Err(ImageError::Layout {
        reason: "data_offset did not converge".to_string(),
    })
}

impl Segment {
    /// Compare a digest of this segment's content with the manifest entry: size, sha256, data
    /// ranges, then data_sha256 (every error names the segment).
    pub fn check(&self, d: &SegmentDigest) -> Result<(), ImageError> {
        if d.size != self.size {
            return Err(ImageError::SegmentSize {
                segment: self.name.clone(),
                expected: self.size,
                found: d.size,
            });
        }
        if d.sha256 != self.sha256 {
            return Err(ImageError::SegmentHash {
                segment: self.name.clone(),
                expected: hex::encode(self.sha256),
                found: hex::encode(d.sha256),
            });
        }
        if let Some(at) = first_data_range_difference(&self.data_ranges, &d.data_ranges, self.size)
        {
            let detail = if self.is_data(at) {
                format!("the 4 KiB block at segment offset {at} is listed as data but is all zero")
            } else {
                format!("non-zero data at segment offset {at} lies outside the listed data ranges")
            };
            return Err(ImageError::DataRanges {
                segment: self.name.clone(),
                detail,
            });
        }
        // With the content and the data ranges right, this fails only when the manifest's
        // data_sha256 itself is wrong; a target that checks data_sha256 alone must not accept
        // such an image either.
        if d.data_sha256 != self.data_sha256 {
            return Err(ImageError::SegmentDataHash {
                segment: self.name.clone(),
                expected: hex::encode(self.data_sha256),
                found: hex::encode(d.data_sha256),
            });
        }
        // Likewise for the per-piece hashes: the content is right, so a difference here means
        // the manifest's chunk_sha256 list is wrong (a target would reject those pieces).
        if let Some(k) = (0..self.chunk_sha256.len().max(d.chunk_sha256.len()))
            .find(|k| self.chunk_sha256.get(*k) != d.chunk_sha256.get(*k))
        {
            return Err(ImageError::SegmentChunkHash {
                segment: self.name.clone(),
                piece: k,
            });
        }
        Ok(())
    }
}

/// Streaming check of the image bytes from `data_offset` to the end: feed them in order, in
/// pieces of any size, then call [`finish`](Self::finish). Checks each segment's size, SHA-256,
/// data ranges and data SHA-256 as soon as it is complete, the zero padding after it, and the total size.
/// Together with a parsed [`ImageHead`] this verifies every byte of the file (the whole-image
/// hash follows from the per-segment hashes, see [`image_sha256`]). Stop at the first error.
#[derive(Clone, Debug)]
pub struct ImageVerifier {
    segments: Vec<Segment>,
    total_size: u64,
    pos: u64,
    idx: usize,
    content_done: bool,
    hasher: SegmentHasher,
    verified: usize,
    invalid: Option<ImageError>,
}

impl ImageVerifier {
    /// A verifier positioned at the manifest's `data_offset`. An invalid manifest (possible
    /// only if it was built by hand, not parsed) makes every later call fail with its error.
    pub fn new(manifest: &Manifest) -> Self {
        ImageVerifier {
            invalid: manifest.validate().err().map(ImageError::from),
            segments: manifest.segments.clone(),
            total_size: manifest.total_size,
            pos: manifest.data_offset(),
            idx: 0,
            content_done: false,
            hasher: SegmentHasher::new(),
            verified: 0,
        }
    }

    /// Absolute file offset of the next byte expected.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// How many segments have been fully checked (content; their padding may still follow).
    pub fn verified_segments(&self) -> usize {
        self.verified
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), ImageError> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
        // The manifest is valid: segments are contiguous, non-empty and end at total_size,
        // so every round below consumes at least one byte or finishes a segment.
        while !data.is_empty() {
            let Some(seg) = self.segments.get(self.idx) else {
                return Err(ImageError::TrailingData {
                    total_size: self.total_size,
                });
            };
            if !self.content_done {
                let n = seg.end().saturating_sub(self.pos).min(data.len() as u64) as usize;
                let (now, rest) = data.split_at(n);
                self.hasher.update(now);
                self.pos += n as u64;
                data = rest;
                if self.pos == seg.end() {
                    let digest = std::mem::take(&mut self.hasher).finish();
                    seg.check(&digest)?;
                    self.verified += 1;
                    self.content_done = true;
                }
            } else {
                let n = seg
                    .padded_end()
                    .saturating_sub(self.pos)
                    .min(data.len() as u64) as usize;
                let (now, rest) = data.split_at(n);
                if !is_all_zero(now) {
                    let i = now.iter().position(|x| *x != 0).unwrap_or(0);
                    return Err(ImageError::SegmentPadding {
                        segment: seg.name.clone(),
                        offset: self.pos + i as u64,
                    });
                }
                self.pos += n as u64;
                data = rest;
            }
            if self.content_done && self.pos == seg.padded_end() {
                self.idx += 1;
                self.content_done = false;
            }
        }
        Ok(())
    }

    /// End of input: every segment and its padding must have been seen.
    pub fn finish(self) -> Result<(), ImageError> {
        if let Some(e) = self.invalid {
            return Err(e);
        }
        match self.segments.get(self.idx) {
            None => Ok(()),
            Some(seg) => Err(ImageError::Truncated {
                segment: seg.name.clone(),
                at: self.pos,
                total_size: self.total_size,
            }),
        }
    }
}

// ---- keys and signatures ----

/// Ed25519 signature of `manifest_bytes` with the secret key `seed`.
pub fn sign_manifest(seed: &[u8; 32], manifest_bytes: &[u8]) -> [u8; 64] {
    SigningKey::from_bytes(seed).sign(manifest_bytes).to_bytes()
}

/// Public key of the secret key `seed`.
pub fn public_key_of(seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(seed).verifying_key().to_bytes()
}

/// Secret key file text: `nexus-ed25519-secret-v1 <64 hex digits>\n`.
pub fn encode_secret_key(seed: &[u8; 32]) -> String {
    format!("{SECRET_KEY_TAG} {}\n", hex::encode(seed))
}

/// Public key file text: `nexus-ed25519-public-v1 <64 hex digits>\n`.
pub fn encode_public_key(key: &[u8; 32]) -> String {
    format!("{PUBLIC_KEY_TAG} {}\n", hex::encode(key))
}

/// Parse a secret key file.
pub fn decode_secret_key(text: &str) -> Result<[u8; 32], ImageError> {
    decode_key(text, SECRET_KEY_TAG)
}

/// Parse a public key file (also checks that it is a valid Ed25519 point).
pub fn decode_public_key(text: &str) -> Result<[u8; 32], ImageError> {
    let key = decode_key(text, PUBLIC_KEY_TAG)?;
    VerifyingKey::from_bytes(&key).map_err(|_| ImageError::BadPublicKey)?;
    Ok(key)
}

fn decode_key(text: &str, tag: &'static str) -> Result<[u8; 32], ImageError> {
    let bad = |reason| ImageError::BadKeyText { tag, reason };
    if text.len() > 256 {
        return Err(bad("too long"));
    }
    let line = text.trim_end_matches(['\n', '\r']);
    if line.contains('\n') {
        return Err(bad("more than one line"));
    }
    let Some(hexpart) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) else {
        let other = if tag == SECRET_KEY_TAG {
            PUBLIC_KEY_TAG
        } else {
            SECRET_KEY_TAG
        };
        if line.starts_with(other) {
            return Err(bad(if tag == SECRET_KEY_TAG {
                "this is a public key; a secret key is needed"
            } else {
                "this is a secret key; pass the .pub file"
            }));
        }
        return Err(bad("wrong tag"));
    };
    let mut out = [0u8; 32];
    if hexpart.len() != 64 {
        return Err(bad("key is not 64 hex digits"));
    }
    hex::decode_to_slice(hexpart, &mut out).map_err(|_| bad("key is not 64 hex digits"))?;
    Ok(out)
}
