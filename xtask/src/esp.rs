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

/// A boot loader specification type #1 entry.
pub fn entry(title: &str, linux: &str, initrd: &str, options: &str) -> String {
    format!("title {title}\nlinux /{linux}\ninitrd /{initrd}\noptions {options}\n")
}

/// `loader.conf`: no menu (hold a key at start to get it), the default entry, no editor.
pub fn loader_conf(default: &str) -> String {
    format!("timeout 0\ndefault {default}\neditor no\nconsole-mode keep\n")
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
    // Directories first, parents before children, each once.
    let mut dirs: Vec<String> = Vec::new();
    let all: Vec<&str> = esp
        .files
        .iter()
        .map(|(p, _)| p.as_str())
        .chain(esp.texts.iter().map(|(p, _)| p.as_str()))
        .collect();
    for p in &all {
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

    #[test]
    fn entries_follow_the_boot_loader_specification() {
        let e = entry(
            "nexus recovery",
            "nexus/vmlinuz",
            "nexus/recovery.cpio",
            "console=ttyS0",
        );
        assert_eq!(
            e,
            "title nexus recovery\nlinux /nexus/vmlinuz\ninitrd /nexus/recovery.cpio\noptions console=ttyS0\n"
        );
        assert!(loader_conf("nexus.conf").contains("default nexus.conf\n"));
    }

    /// Same inputs, same bytes (needs mkfs.vfat and mtools: `cargo xtask` installs them).
    #[test]
    fn the_esp_is_deterministic() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, vec![7u8; 100_000]).unwrap();
        let esp = Esp {
            files: vec![("nexus/vmlinuz".into(), k.clone())],
            texts: vec![
                ("loader/loader.conf".into(), loader_conf("nexus.conf")),
                (
                    "loader/entries/nexus.conf".into(),
                    entry("nexus", "nexus/vmlinuz", "nexus/initrd.cpio", "quiet"),
                ),
            ],
        };
        let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
        build(&esp, &a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        build(&esp, &b).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }
}
