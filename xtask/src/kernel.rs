//! The guest kernel: the newest Debian `linux-image-*-cloud-amd64-unsigned` package, fetched
//! with `apt-get download` and unpacked with `dpkg -x` under `build/kernel/` (nothing is
//! installed system-wide, no root-owned hooks run), plus the virtio modules in load order.
//!
//! The module load order is computed from each module's `.modinfo` `depends=` field (the .deb
//! ships no modules.dep and the order changes between kernel builds), never hard-coded.

use crate::util::{self, capture};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules whose closure we load (virtio PCI transport, virtio-serial, virtio-blk; vfat
/// with its code page and the kernel's default I/O character set for the ESP, efivarfs for the
/// bootloader's variables, qemu_fw_cfg for the test harness's options).
pub const ROOT_MODULES: [&str; 8] = [
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
    "qemu_fw_cfg",
];
/// The normal initramfs also mounts the booted slot's rootfs: a squashfs segment of the
/// image in the slot partition, on a loop device (zstd decompression is built in), through
/// dm-verity when the manifest has a hash tree for it (`dm_verity` pulls in `dm_mod`,
/// `dm_bufio` and `reed_solomon` by its `depends=`; SHA-256 is built into the Debian kernel).
pub const NORMAL_EXTRA_MODULES: [&str; 3] = ["loop", "squashfs", "dm_verity"];

/// A kernel ready to boot.
#[derive(Debug)]
pub struct Kernel {
    /// The Debian package it came from.
    pub package: String,
    /// `build/kernel/vmlinuz` (a stable copy of `boot/vmlinuz-*`).
    pub vmlinuz: PathBuf,
    /// Modules in load order: `(file name, path)` (the recovery ramdisk).
    pub modules: Vec<(String, PathBuf)>,
    /// Modules of the normal initramfs, in load order (adds loop, squashfs and dm-verity).
    pub normal_modules: Vec<(String, PathBuf)>,
}

/// Fetch (when needed) and prepare the kernel under `build/kernel`.
pub fn ensure(build: &Path, fresh: bool) -> anyhow::Result<Kernel> {
    let kdir = build.join("kernel");
    let stamp = kdir.join("package");
    let unpacked = kdir.join("root");
    let cached = std::fs::read_to_string(&stamp)
        .ok()
        .map(|s| s.trim().to_string());
    let package = match cached {
        Some(p) if !fresh && !p.is_empty() && unpacked.join("boot").is_dir() => {
            eprintln!(
                "xtask: kernel: using cached {p} (`cargo xtask guest --fresh` fetches the newest)"
            );
            p
        }
        _ => fetch(&kdir)?,
    };
    let vmlinuz_src = find_vmlinuz(&unpacked.join("boot"))?;
    let vmlinuz = kdir.join("vmlinuz");
    let bytes =
        std::fs::read(&vmlinuz_src).with_context(|| format!("read {}", vmlinuz_src.display()))?;
    util::write_if_changed(&vmlinuz, &bytes)?;
    let moddir = module_root(&unpacked)?;
    let modules = load_order(&moddir, &ROOT_MODULES)?;
    let normal_roots: Vec<&str> = ROOT_MODULES
        .iter()
        .chain(NORMAL_EXTRA_MODULES.iter())
        .copied()
        .collect();
    let normal_modules = load_order(&moddir, &normal_roots)?;
    Ok(Kernel {
        package,
        vmlinuz,
        modules,
        normal_modules,
    })
}

/// Candidate package names from `apt-cache search`, newest first.
pub fn candidates() -> anyhow::Result<Vec<String>> {
    let search = || -> anyhow::Result<Vec<String>> {
        let out = capture(Command::new("apt-cache").args([
            "search",
            "--names-only",
            "^linux-image-[0-9.-]+-cloud-amd64-unsigned$",
        ]))?;
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        names.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        names.dedup();
        Ok(names)
    };
    let names = search()?;
    if !names.is_empty() {
        return Ok(names);
    }
    util::apt_update()?;
    let names = search()?;
    if names.is_empty() {
        bail!("apt-cache finds no linux-image-*-cloud-amd64-unsigned package; is this Debian bookworm with the main archive in sources.list?");
    }
    Ok(names)
}

/// Numeric components of a package name (`linux-image-6.1.0-56-…` → [6, 1, 0, 56]).
pub fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn fetch(kdir: &Path) -> anyhow::Result<String> {
    let dl = kdir.join("dl");
    let root = kdir.join("root");
    let mut last_err = None;
    for name in candidates()? {
        match util::download_deb(&name, &dl, &root) {
            Ok(_) => {
                std::fs::write(kdir.join("package"), format!("{name}\n"))?;
                std::fs::remove_dir_all(&dl).ok();
                return Ok(name);
            }
            Err(e) => {
                eprintln!(
                    "xtask: kernel: {name} could not be downloaded ({e:#}); trying the next one"
                );
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) => Err(e.context("no cloud kernel package could be downloaded")),
        None => bail!("no cloud kernel package could be downloaded"),
    }
}

pub fn find_vmlinuz(boot: &Path) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)
        .with_context(|| format!("list {}", boot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no vmlinuz-* in {}; run `cargo xtask guest --fresh`",
            boot.display()
        )
    })
}

fn module_root(unpacked: &Path) -> anyhow::Result<PathBuf> {
    let base = unpacked.join("lib/modules");
    let mut vers: Vec<PathBuf> = std::fs::read_dir(&base)
        .with_context(|| format!("list {}", base.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    vers.sort();
    vers.pop()
        .with_context(|| format!("no kernel version directory in {}", base.display()))
}

/// Module name as the kernel spells it in `depends=` (`-` → `_`).
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// The `.modinfo` key/value strings of an ELF64 little-endian kernel module.
pub fn modinfo(elf: &[u8]) -> anyhow::Result<Vec<String>> {
    fn u16_at(b: &[u8], o: usize) -> Option<u16> {
        Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
    }
    fn u32_at(b: &[u8], o: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    }
    fn u64_at(b: &[u8], o: usize) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)).ok()
    }
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not an ELF64 little-endian file (compressed module?)");
    }
    let bad = || anyhow::anyhow!("truncated or malformed ELF section table");
    let shoff = u64_at(elf, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or_else(bad)?);
    let sh = |i: usize| -> Option<(usize, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = usize::try_from(u32_at(elf, base)?).ok()?;
        Some((name, u64_at(elf, base + 24)?, u64_at(elf, base + 32)?))
    };
    let (_, stroff, strsize) = sh(shstrndx).ok_or_else(bad)?;
    let strtab = elf
        .get(stroff..stroff.checked_add(strsize).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = sh(i).ok_or_else(bad)?;
        let nm = strtab.get(name..).ok_or_else(bad)?;
        let nm = nm
            .get(..nm.iter().position(|&b| b == 0).unwrap_or(nm.len()))
            .ok_or_else(bad)?;
        if nm == b".modinfo" {
            let data = elf
                .get(off..off.checked_add(size).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            return Ok(data
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// `depends=` of a module (empty when it has none).
pub fn depends(info: &[String]) -> Vec<String> {
    info.iter()
        .filter_map(|kv| kv.strip_prefix("depends="))
        .flat_map(|v| v.split(','))
        .filter(|s| !s.is_empty())
        .map(norm)
        .collect()
}

/// Every `.ko` under `moddir/kernel`, by normalised module name.
fn index_modules(moddir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko") {
                    out.insert(norm(stem), p.clone());
                } else if n.contains(".ko.") {
                    bail!("{} is compressed; this kernel package is not supported (expected plain .ko files)", p.display());
                }
            }
        }
    }
    Ok(out)
}

fn builtin(moddir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect()
}

/// Dependency order (dependencies first) of the closure of `roots`, from `.modinfo`.
/// Built-in modules are skipped. Deterministic: depth-first in sorted order.
pub fn load_order(moddir: &Path, roots: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let index = index_modules(moddir)?;
    let builtin = builtin(moddir);
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo: Vec<String> = roots.iter().map(|r| norm(r)).collect();
    while let Some(m) = todo.pop() {
        if deps.contains_key(&m) || builtin.contains(&m) {
            continue;
        }
        let path = index.get(&m).with_context(|| {
            format!(
                "kernel module {m} is neither a .ko in {} nor built in",
                moddir.display()
            )
        })?;
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let d = depends(&modinfo(&bytes).with_context(|| format!("{}", path.display()))?);
        todo.extend(d.iter().cloned());
        deps.insert(m, d);
    }
    let order = topo(&deps, roots)?;
    order
        .into_iter()
        .map(|m| {
            let p = index
                .get(&m)
                .cloned()
                .with_context(|| format!("module {m} vanished"))?;
            Ok((format!("{m}.ko"), p))
        })
        .collect()
}

/// Topological order of `deps` restricted to the closure of `roots` (built-ins, absent from
/// `deps`, are dropped). Fails on a cycle.
pub fn topo(deps: &BTreeMap<String, Vec<String>>, roots: &[&str]) -> anyhow::Result<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if done.contains(m) {
            return Ok(());
        }
        if path.iter().any(|p| p == m) {
            bail!("module dependency cycle: {} -> {m}", path.join(" -> "));
        }
        let Some(ds) = deps.get(m) else { return Ok(()) };
        path.push(m.to_string());
        let mut sorted = ds.clone();
        sorted.sort();
        for d in &sorted {
            visit(d, deps, done, path, out)?;
        }
        path.pop();
        done.insert(m.to_string());
        out.push(m.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    let mut rs: Vec<String> = roots.iter().map(|r| norm(r)).collect();
    rs.sort();
    for r in &rs {
        visit(r, deps, &mut done, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        let mut v = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-50-cloud-amd64-unsigned",
        ];
        v.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        assert_eq!(v[0], "linux-image-6.1.0-56-cloud-amd64-unsigned");
        assert_eq!(v[2], "linux-image-6.1.0-9-cloud-amd64-unsigned");
    }

    #[test]
    fn order_follows_depends() {
        let mut deps = BTreeMap::new();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // 6.1.0-56: virtio depends on virtio_ring
        deps.insert("virtio".into(), s(&["virtio_ring"]));
        deps.insert("virtio_ring".into(), s(&[]));
        deps.insert(
            "virtio_pci".into(),
            s(&[
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
            ]),
        );
        deps.insert("virtio_pci_modern_dev".into(), s(&[]));
        deps.insert("virtio_pci_legacy_dev".into(), s(&[]));
        deps.insert("virtio_console".into(), s(&["virtio", "virtio_ring"]));
        deps.insert("virtio_blk".into(), s(&["virtio", "virtio_ring"]));
        let order = topo(&deps, &ROOT_MODULES).unwrap();
        let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert_eq!(order.len(), 7);
        // 6.1.0-50: virtio had no dependencies — the order adapts
        deps.insert("virtio".into(), s(&[]));
        assert_eq!(topo(&deps, &ROOT_MODULES).unwrap().len(), 7);
        // cycles are refused
        deps.insert("virtio_ring".into(), s(&["virtio_blk"]));
        assert!(topo(&deps, &ROOT_MODULES).is_err());
    }

    #[test]
    fn modinfo_of_handmade_elf() {
        // A minimal ELF64 LE with a section table: [null, .shstrtab, .modinfo].
        let shstr = b"\0.shstrtab\0.modinfo\0".to_vec();
        let info = b"license=GPL\0depends=virtio_ring,virtio-x\0name=virtio\0".to_vec();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let stroff = elf.len();
        elf.extend_from_slice(&shstr);
        let infooff = elf.len();
        elf.extend_from_slice(&info);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut e = vec![0u8; 64];
            e[..4].copy_from_slice(&name.to_le_bytes());
            e[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            e[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&e);
        };
        sh(0, 0, 0);
        sh(1, stroff, shstr.len());
        sh(11, infooff, info.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let kv = modinfo(&elf).unwrap();
        assert_eq!(depends(&kv), vec!["virtio_ring", "virtio_x"]);
        assert!(modinfo(&elf[..70]).is_err());
        assert!(modinfo(b"not elf").is_err());
    }
}
