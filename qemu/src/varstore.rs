//! Writing one EFI variable into an OVMF variable store file (`OVMF_VARS_4M.fd`, the device's
//! NVRAM) while QEMU is not running: how the runner starts a device in recovery
//! (`RECOVERY=1`) through its own bootloader — the same `LoaderEntryOneShot` rebootd writes
//! from inside the guest, consumed by systemd-boot on the next boot.
//!
//! The format (EDK II `VariableFormat.h`, authenticated store as OVMF builds it): a firmware
//! volume header (`_FVH` at byte 40, header length at 48), then the variable store header
//! (the authenticated-variable GUID, size u32, format `0x5A`, state `0xFE`), then variables,
//! each 4-byte aligned: `StartId 0x55AA`, state (`0x3F` added; AND `0xFD` deleted), attributes,
//! monotonic count, timestamp, public key index, name size, data size, vendor GUID (60 bytes),
//! then the UTF-16 name and the data. Free space is `0xFF`. Writing appends after the last
//! variable and marks an older copy of the same variable deleted, as the firmware itself
//! does; the store is only ever grown within its declared size.

/// Errors; messages name what is wrong with the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VarStoreError {
    #[error("not an OVMF variable store: {0}")]
    Format(String),
    #[error("the variable store is full ({need} bytes needed, {free} free)")]
    Full { need: usize, free: usize },
}

const FVH: &[u8; 4] = b"_FVH";
/// `gEfiAuthenticatedVariableGuid` aaf32c78-947b-439a-a180-2e144ec37792.
const AUTH_VARIABLE_GUID: [u8; 16] = [
    0x78, 0x2c, 0xf3, 0xaa, 0x7b, 0x94, 0x9a, 0x43, 0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92,
];
const STORE_HEADER: usize = 28;
const VAR_HEADER: usize = 60;
const START_ID: u16 = 0x55AA;
const VAR_ADDED: u8 = 0x3F;
const VAR_IN_DELETED_TRANSITION: u8 = 0xFE;
const VAR_DELETED: u8 = 0xFD;

/// A GUID in its textual form (`4a67b082-0a4c-41cf-b6c7-440b29bb8c4f`) as EFI lays it out.
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    let mut out = raw;
    // data1 (u32), data2 (u16), data3 (u16) are little-endian; data4 is bytes.
    out[..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Some(out)
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The variable store's byte range in `fd` (after the firmware volume header).
fn store_range(fd: &[u8]) -> Result<(usize, usize), VarStoreError> {
    let bad = |w: &str| VarStoreError::Format(w.to_string());
    if fd.get(40..44) != Some(FVH.as_slice()) {
        return Err(bad("no _FVH firmware volume signature at byte 40"));
    }
    let start = usize::from(u16_at(fd, 48).ok_or_else(|| bad("truncated header"))?);
    if fd.get(start..start + 16) != Some(AUTH_VARIABLE_GUID.as_slice()) {
        return Err(bad(
            "no authenticated variable store after the volume header",
        ));
    }
    let size = u32_at(fd, start + 16).ok_or_else(|| bad("truncated store header"))? as usize;
    let end = start
        .checked_add(size)
        .filter(|e| *e <= fd.len())
        .ok_or_else(|| bad("store size beyond the end of the file"))?;
    if fd.get(start + 20) != Some(&0x5A) {
        return Err(bad("store is not formatted"));
    }
    Ok((start, end))
}

/// Every variable header offset in the store, in order, and the first free offset.
fn walk(fd: &[u8], start: usize, end: usize) -> Result<(Vec<usize>, usize), VarStoreError> {
    let mut at = align4(start + STORE_HEADER);
    let mut vars = Vec::new();
    while at + VAR_HEADER <= end && u16_at(fd, at) == Some(START_ID) {
        let name = u32_at(fd, at + 36).unwrap_or(0) as usize;
        let data = u32_at(fd, at + 40).unwrap_or(0) as usize;
        let next = align4(at + VAR_HEADER + name + data);
        if next > end || name > end || data > end {
            return Err(VarStoreError::Format(format!(
                "variable at byte {at} runs past the store"
            )));
        }
        vars.push(at);
        at = next;
    }
    Ok((vars, at))
}

fn name_utf16(name: &str) -> Vec<u8> {
    name.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

fn is_live(state: u8) -> bool {
    state == VAR_ADDED || state == (VAR_ADDED & VAR_IN_DELETED_TRANSITION)
}

/// The live copy of variable `name` of vendor `guid`: its header offset.
fn find(fd: &[u8], vars: &[usize], guid: &[u8; 16], name: &[u8]) -> Option<usize> {
    vars.iter().copied().find(|&at| {
        let ns = u32_at(fd, at + 36).unwrap_or(0) as usize;
        is_live(fd.get(at + 2).copied().unwrap_or(0))
            && fd.get(at + 44..at + 60) == Some(guid.as_slice())
            && fd.get(at + VAR_HEADER..at + VAR_HEADER + ns) == Some(name)
    })
}

/// The data of the live variable `name` of vendor `guid`, if any.
pub fn get(fd: &[u8], guid: &[u8; 16], name: &str) -> Result<Option<Vec<u8>>, VarStoreError> {
    let (start, end) = store_range(fd)?;
    let (vars, _) = walk(fd, start, end)?;
    let n = name_utf16(name);
    Ok(find(fd, &vars, guid, &n).and_then(|at| {
        let ds = u32_at(fd, at + 40)? as usize;
        let d = at + VAR_HEADER + n.len();
        fd.get(d..d + ds).map(<[u8]>::to_vec)
    }))
}

/// Set variable `name` of vendor `guid` to `data` with `attributes` (non-authenticated:
/// count, time and key index zero), replacing a live copy.
pub fn set(
    fd: &mut [u8],
    guid: &[u8; 16],
    name: &str,
    attributes: u32,
    data: &[u8],
) -> Result<(), VarStoreError> {
    let (start, end) = store_range(fd)?;
    let (vars, free) = walk(fd, start, end)?;
    let n = name_utf16(name);
    let need = VAR_HEADER + n.len() + data.len();
    if free + need > end {
        return Err(VarStoreError::Full {
            need,
            free: end.saturating_sub(free),
        });
    }
    let old = find(fd, &vars, guid, &n);
    let mut v = Vec::with_capacity(need);
    v.extend_from_slice(&START_ID.to_le_bytes());
    v.push(VAR_ADDED);
    v.push(0);
    v.extend_from_slice(&attributes.to_le_bytes());
    v.extend_from_slice(&[0u8; 8 + 16 + 4]); // monotonic count, timestamp, pubkey index
    v.extend_from_slice(&(n.len() as u32).to_le_bytes());
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(guid);
    v.extend_from_slice(&n);
    v.extend_from_slice(data);
    if let Some(dst) = fd.get_mut(free..free + need) {
        dst.copy_from_slice(&v);
    }
    if let Some(at) = old {
        if let Some(st) = fd.get_mut(at + 2) {
            *st &= VAR_DELETED;
        }
    }
    Ok(())
}

/// Delete the live copy of variable `name` of vendor `guid` (marked deleted, as the firmware
/// does). Returns whether there was one.
pub fn remove(fd: &mut [u8], guid: &[u8; 16], name: &str) -> Result<bool, VarStoreError> {
    let (start, end) = store_range(fd)?;
    let (vars, _) = walk(fd, start, end)?;
    match find(fd, &vars, guid, &name_utf16(name)) {
        Some(at) => {
            if let Some(st) = fd.get_mut(at + 2) {
                *st &= VAR_DELETED;
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The one-shot entry for the next boot in the variable store file `vars` (QEMU stopped):
/// `Some(entry)` sets `LoaderEntryOneShot` (e.g. `recovery.conf`), `None` removes it.
pub fn set_oneshot(vars: &std::path::Path, entry: Option<&str>) -> Result<(), String> {
    use nx_contract::loader;
    let guid = guid_bytes(loader::LOADER_GUID)
        .ok_or_else(|| "the loader GUID does not parse".to_string())?;
    let mut fd = std::fs::read(vars).map_err(|e| format!("read {}: {e}", vars.display()))?;
    let name = loader::LOADER_ENTRY_ONESHOT;
    match entry {
        Some(e) => set(
            &mut fd,
            &guid,
            name,
            loader::EFI_VARIABLE_NV_BS_RT,
            &loader::encode_utf16_var(e),
        )
        .map_err(|e| format!("{}: {e}", vars.display()))?,
        None => {
            remove(&mut fd, &guid, name).map_err(|e| format!("{}: {e}", vars.display()))?;
        }
    }
    std::fs::write(vars, &fd).map_err(|e| format!("write {}: {e}", vars.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal store laid out like OVMF's: volume header of 72 bytes, then the store.
    fn store(size: usize) -> Vec<u8> {
        let mut fd = vec![0xFFu8; 72 + size + 64];
        fd[..72].fill(0);
        fd[40..44].copy_from_slice(FVH);
        fd[48..50].copy_from_slice(&72u16.to_le_bytes());
        fd[72..88].copy_from_slice(&AUTH_VARIABLE_GUID);
        fd[88..92].copy_from_slice(&(size as u32).to_le_bytes());
        fd[92] = 0x5A;
        fd[93] = 0xFE;
        fd[94..100].fill(0);
        fd
    }

    #[test]
    fn guids_are_laid_out_like_efi() {
        let g = guid_bytes("4a67b082-0a4c-41cf-b6c7-440b29bb8c4f").unwrap();
        assert_eq!(
            g,
            [
                0x82, 0xb0, 0x67, 0x4a, 0x4c, 0x0a, 0xcf, 0x41, 0xb6, 0xc7, 0x44, 0x0b, 0x29, 0xbb,
                0x8c, 0x4f
            ]
        );
        assert_eq!(
            guid_bytes("aaf32c78-947b-439a-a180-2e144ec37792").unwrap(),
            AUTH_VARIABLE_GUID
        );
        assert_eq!(guid_bytes("nope"), None);
    }

    #[test]
    fn set_replaces_and_get_reads_back() {
        let g = guid_bytes("4a67b082-0a4c-41cf-b6c7-440b29bb8c4f").unwrap();
        let mut fd = store(4096);
        assert_eq!(get(&fd, &g, "LoaderEntryOneShot").unwrap(), None);
        set(&mut fd, &g, "LoaderEntryOneShot", 7, b"r\0e\0\0\0").unwrap();
        assert_eq!(
            get(&fd, &g, "LoaderEntryOneShot").unwrap().as_deref(),
            Some(&b"r\0e\0\0\0"[..])
        );
        set(&mut fd, &g, "LoaderEntryOneShot", 7, b"x\0\0\0").unwrap();
        assert_eq!(
            get(&fd, &g, "LoaderEntryOneShot").unwrap().as_deref(),
            Some(&b"x\0\0\0"[..])
        );
        let (start, end) = store_range(&fd).unwrap();
        let (vars, _) = walk(&fd, start, end).unwrap();
        assert_eq!(vars.len(), 2);
        assert_eq!(fd[vars[0] + 2], VAR_ADDED & VAR_DELETED, "old copy deleted");
        // Another vendor's variable of the same name is separate.
        let other = guid_bytes("8be4df61-93ca-11d2-aa0d-00e098032b8c").unwrap();
        assert_eq!(get(&fd, &other, "LoaderEntryOneShot").unwrap(), None);
    }

    #[test]
    fn refuses_what_is_not_a_store_and_never_grows_past_it() {
        let g = [1u8; 16];
        assert!(matches!(
            set(&mut [0u8; 200], &g, "x", 7, b""),
            Err(VarStoreError::Format(_))
        ));
        let mut fd = store(200);
        let e = set(&mut fd, &g, "x", 7, &[0u8; 300]).unwrap_err();
        assert!(matches!(e, VarStoreError::Full { .. }), "{e}");
        assert!(
            fd[72 + 28..72 + 200].iter().all(|&b| b == 0xFF),
            "nothing written"
        );
    }

    /// The real template from Debian's `ovmf` package (installed by every `cargo xtask` recipe).
    #[test]
    fn the_ovmf_template_is_understood() {
        let fd = std::fs::read(crate::OVMF_VARS).expect("apt-get install -y ovmf");
        let (start, end) = store_range(&fd).unwrap();
        assert!(end - start > 64 * 1024);
        let mut fd = fd;
        let g = guid_bytes(nx_contract::loader::LOADER_GUID).unwrap();
        set(&mut fd, &g, "LoaderEntryOneShot", 7, &[b'r', 0, 0, 0]).unwrap();
        assert!(get(&fd, &g, "LoaderEntryOneShot").unwrap().is_some());
        assert!(remove(&mut fd, &g, "LoaderEntryOneShot").unwrap());
        assert_eq!(get(&fd, &g, "LoaderEntryOneShot").unwrap(), None);
        assert!(!remove(&mut fd, &g, "LoaderEntryOneShot").unwrap());
    }
}
