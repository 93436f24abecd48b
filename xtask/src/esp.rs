//! The EFI system partition (ESP) of `build/disk.img`: Debian's systemd-boot as the removable
//! boot path `\EFI\BOOT\BOOTX64.EFI`, `loader.conf`, boot entries, and the kernel and
//! initramfs images they load. Built without root or loop devices (`mkfs.vfat` + mtools) and
//! deterministic: fixed volume id, `--invariant`, `SOURCE_DATE_EPOCH` for every mtools call and
//! fixed file times, so the same inputs give the same bytes.
//!
//! With it, `build/disk.img` boots in plain QEMU with OVMF (docs/runner/boot.md shows the
//! command). The runner of the tests still boots the kernel directly (`-kernel`) and plays the
//! firmware; moving the boot decision to the bootloader is the rest of the boot-chain issue.

use crate::util::{run_cmd, tool};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of the ESP.
pub const ESP_MIB: u64 = 256;
/// FAT volume id (fixed: same inputs, same bytes).
const VOLUME_ID: &str = "4e584553";
/// The time every file and directory on the ESP carries (2001-09-09, a valid FAT date).
const EPOCH: u64 = 1_000_000_000;

/// What goes onto the ESP.
#[derive(Debug, Clone)]
pub struct Esp {
    /// `(path on the ESP, host file)`, e.g. `("nexus/vmlinuz", build/kernel/vmlinuz)`.
    pub files: Vec<(String, PathBuf)>,
    /// `(path on the ESP, content)` for small generated files (loader.conf, entries).
    pub texts: Vec<(String, String)>,
}

impl Esp {
    /// The directories of every file, parents before children, each once.
    fn dirs(&self) -> Vec<String> {
        let mut dirs: Vec<String> = Vec::new();
        let all = self
            .files
            .iter()
            .map(|(p, _)| p.as_str())
            .chain(self.texts.iter().map(|(p, _)| p.as_str()));
        for p in all {
            let mut acc = String::new();
            let parts: Vec<&str> = p.split('/').collect();
            for d in parts.iter().take(parts.len().saturating_sub(1)) {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(d);
                if !dirs.contains(&acc) {
                    dirs.push(acc.clone());
                }
            }
        }
        dirs
    }
}

/// Copy `part`'s files over those of the FAT file system at byte `offset` of `disk` (in
/// place, other files untouched): the device's own part of an existing ESP follows the build.
pub fn refresh(disk: &Path, offset: u64, part: &Esp) -> anyhow::Result<()> {
    let target = PathBuf::from(format!("{}@@{offset}", disk.display()));
    let stage = tempfile::tempdir().context("temporary directory for the ESP")?;
    for d in &part.dirs() {
        // `mmd` fails on an existing directory: that is fine.
        let _ = mtools(tool("mmd")?, &target)
            .arg(format!("::/{d}"))
            .stderr(std::process::Stdio::null())
            .status();
    }
    for (i, (dest, text)) in part.texts.iter().enumerate() {
        let p = stage.path().join(format!("t{i}"));
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        run_cmd(
            mtools(tool("mcopy")?, &target)
                .args(["-o", "-m"])
                .arg(&p)
                .arg(format!("::/{dest}")),
        )?;
    }
    for (dest, src) in &part.files {
        run_cmd(
            mtools(tool("mcopy")?, &target)
                .args(["-o", "-m"])
                .arg(src)
                .arg(format!("::/{dest}")),
        )?;
    }
    Ok(())
}

/// Build the FAT image of `esp` at `out` (replaced atomically).
pub fn build(esp: &Esp, out: &Path) -> anyhow::Result<()> {
    let stage = tempfile::tempdir().context("temporary directory for the ESP")?;
    let tmp = out.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(ESP_MIB << 20))
        .with_context(|| format!("create {}", tmp.display()))?;
    run_cmd(
        Command::new(tool("mkfs.vfat")?)
            .args(["-F", "32", "-n", "ESP", "-i", VOLUME_ID, "--invariant"])
            .arg(&tmp),
    )?;
    let dirs = esp.dirs();
    if !dirs.is_empty() {
        let mut mmd = mtools(tool("mmd")?, &tmp);
        for d in &dirs {
            mmd.arg(format!("::/{d}"));
        }
        run_cmd(&mut mmd)?;
    }
    let fixed = std::time::UNIX_EPOCH + std::time::Duration::from_secs(EPOCH);
    // Stage every file with a fixed mtime (`mcopy -m` keeps it).
    let mut staged: Vec<(String, PathBuf)> = Vec::new();
    for (i, (dest, src)) in esp.files.iter().enumerate() {
        let p = stage.path().join(format!("f{i}"));
        std::fs::copy(src, &p).with_context(|| format!("read {}", src.display()))?;
        staged.push((dest.clone(), p));
    }
    for (i, (dest, text)) in esp.texts.iter().enumerate() {
        let p = stage.path().join(format!("t{i}"));
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        staged.push((dest.clone(), p));
    }
    for (dest, p) in &staged {
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_modified(fixed))
            .with_context(|| format!("set the time of {}", p.display()))?;
        let mut mcopy = mtools(tool("mcopy")?, &tmp);
        mcopy.arg("-m").arg(p).arg(format!("::/{dest}"));
        run_cmd(&mut mcopy)?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("rename to {}", out.display()))?;
    Ok(())
}

/// An mtools command on the image `img`, reproducible.
fn mtools(bin: PathBuf, img: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .arg("-i")
        .arg(img);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_contract::loader;

    /// Same inputs, same bytes; `refresh` replaces files in place (needs mkfs.vfat and mtools:
    /// `cargo xtask` installs them).
    #[test]
    fn the_esp_is_deterministic_and_refreshable() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, vec![7u8; 100_000]).unwrap();
        let esp = Esp {
            files: vec![("nexus/a/vmlinuz".into(), k.clone())],
            texts: vec![
                ("loader/loader.conf".into(), loader::loader_conf()),
                (
                    "loader/entries/nexus-1-a.conf".into(),
                    loader::slot_entry_text('a', "1"),
                ),
            ],
        };
        let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
        build(&esp, &a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        build(&esp, &b).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

        // A disk with the ESP at 1 MiB: refresh one file, the other stays.
        let disk = d.path().join("disk.img");
        let mut bytes = vec![0u8; 1 << 20];
        bytes.extend(std::fs::read(&a).unwrap());
        std::fs::write(&disk, bytes).unwrap();
        let k2 = d.path().join("k2");
        std::fs::write(&k2, b"new kernel").unwrap();
        let part = Esp {
            files: vec![("nexus/recovery/vmlinuz".into(), k2)],
            texts: vec![("loader/loader.conf".into(), "timeout 3\n".into())],
        };
        refresh(&disk, 1 << 20, &part).unwrap();
        let img = format!("{}@@{}", disk.display(), 1 << 20);
        let read = |p: &str| {
            let out = mtools(tool("mtype").unwrap(), Path::new(&img))
                .arg(format!("::/{p}"))
                .output()
                .unwrap();
            assert!(out.status.success(), "mtype {p}");
            out.stdout
        };
        assert_eq!(read("nexus/recovery/vmlinuz"), b"new kernel");
        assert_eq!(read("loader/loader.conf"), b"timeout 3\n");
        assert!(read("loader/entries/nexus-1-a.conf").starts_with(b"title nexus 1 (slot a)"));
    }
}
