//! The deterministic `tar.zst` encoding of a bundle, and its bounded read-back.

use crate::DiagError;
use std::io::{Read, Write};

/// The zstd level (fixed: the same input gives the same bytes).
pub const ZSTD_LEVEL: i32 = 9;
/// Largest bundle written or read back (fits one RPC message to the host).
pub const MAX_BUNDLE_BYTES: u64 = 448 * 1024;
/// Largest uncompressed tar accepted on read-back.
pub const MAX_TAR_BYTES: u64 = 1024 * 1024;
/// Directory all members live in (the contract's [`nx_contract::diag::MEMBER_DIR`]).
pub const PREFIX: &str = nx_contract::diag::MEMBER_DIR;

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name below [`PREFIX`] (`kernel.log`).
    pub name: String,
    /// Content (already bounded by its cap).
    pub data: Vec<u8>,
}

/// The bundle: ustar entries sorted by name, mode 0644, uid/gid 0, mtime 0, no user or
/// group names; compressed with zstd at [`ZSTD_LEVEL`] with a content checksum.
pub fn encode(members: &[Member]) -> Result<Vec<u8>, DiagError> {
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let err = |e: std::io::Error| DiagError::Bundle(format!("tar: {e}"));
    let mut tar = tar::Builder::new(Vec::new());
    for m in sorted {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(m.data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        tar.append_data(&mut h, format!("{PREFIX}{}", m.name), m.data.as_slice())
            .map_err(err)?;
    }
    let tar = tar.into_inner().map_err(err)?;
    let zerr = |e: std::io::Error| DiagError::Bundle(format!("zstd: {e}"));
    let mut enc = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(zerr)?;
    enc.include_checksum(true).map_err(zerr)?;
    enc.set_pledged_src_size(Some(tar.len() as u64))
        .map_err(zerr)?;
    enc.write_all(&tar).map_err(zerr)?;
    enc.finish().map_err(zerr)
}

/// Decode a bundle (bounded) and return its members in archive order. Fails unless it is a
/// valid zstd frame (checksum verified) holding a tar of regular files under [`PREFIX`].
pub fn decode(bytes: &[u8]) -> Result<Vec<Member>, DiagError> {
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(DiagError::Bundle(format!(
            "{} bytes, more than the {MAX_BUNDLE_BYTES}-byte bound",
            bytes.len()
        )));
    }
    let dec =
        zstd::stream::Decoder::new(bytes).map_err(|e| DiagError::Bundle(format!("zstd: {e}")))?;
    let mut tar = Vec::new();
    dec.take(MAX_TAR_BYTES + 1)
        .read_to_end(&mut tar)
        .map_err(|e| DiagError::Bundle(format!("zstd: {e}")))?;
    if tar.len() as u64 > MAX_TAR_BYTES {
        return Err(DiagError::Bundle(format!(
            "decompresses to more than {MAX_TAR_BYTES} bytes"
        )));
    }
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(tar.as_slice());
    let entries = ar
        .entries()
        .map_err(|e| DiagError::Bundle(format!("tar: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| DiagError::Bundle(format!("tar: {e}")))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(DiagError::Bundle(
                "tar: a member is not a regular file".into(),
            ));
        }
        let path = e
            .path()
            .map_err(|e| DiagError::Bundle(format!("tar: {e}")))?
            .to_string_lossy()
            .into_owned();
        let Some(name) = path.strip_prefix(PREFIX).filter(|n| is_member_name(n)) else {
            return Err(DiagError::Bundle(format!(
                "tar: unexpected member {path:?}"
            )));
        };
        let name = name.to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)
            .map_err(|e| DiagError::Bundle(format!("tar: {e}")))?;
        out.push(Member { name, data });
    }
    Ok(out)
}

use nx_contract::diag::is_member_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_sorted() {
        let m = |n: &str, d: &[u8]| Member {
            name: n.into(),
            data: d.to_vec(),
        };
        let a = encode(&[m("b.txt", b"bee"), m("a.txt", b"")]).unwrap();
        let b = encode(&[m("a.txt", b""), m("b.txt", b"bee")]).unwrap();
        assert_eq!(a, b);
        let back = decode(&a).unwrap();
        assert_eq!(back, [m("a.txt", b""), m("b.txt", b"bee")]);
        assert!(decode(b"garbage").is_err());
        let mut cut = a.clone();
        cut.truncate(a.len() - 3);
        assert!(decode(&cut).is_err());
    }
}
