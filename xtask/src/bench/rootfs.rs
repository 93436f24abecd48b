//! `cargo xtask bench rootfs` (issue 14): how long the normal init spends on the slot's rootfs
//! (opening the partition → mounted: head, checks, devices, squashfs mount), as init reports it
//! on the console (`init: rootfs mount took <ms> ms (<how>)`), for the normal rootfs and for the
//! same rootfs padded with an incompressible file, each with its dm-verity tree (checked block
//! by block when read) and built with `--no-verity` (the whole segment hashed before the
//! mount). One fresh device per case under `build/bench/rootfs/`, slot a seeded with the image.

use crate::util::{self, run_cmd};
use anyhow::Context;
use nx_contract::markers;
use nx_qemu::Runner;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Size of the incompressible file of the big rootfs.
pub const PAD_MIB: usize = 48;

/// One measured case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// `normal` or `normal + <n> MiB`.
    pub rootfs: String,
    /// Bytes of the rootfs segment.
    pub rootfs_bytes: u64,
    /// `dm-verity` or `whole-segment hash`.
    pub how: String,
    /// What init reported.
    pub mount_ms: u64,
}

/// `(ms, how)` of an `init: rootfs mount took <ms> ms (<how>)` line.
pub fn parse_took(line: &str) -> Option<(u64, String)> {
    let rest = line.split(markers::init::ROOTFS_MOUNT_TOOK_PREFIX).nth(1)?;
    let (ms, rest) = rest.split_once(" ms (")?;
    let how = rest.strip_suffix(')')?;
    Some((ms.trim().parse().ok()?, how.to_string()))
}

fn build_image(
    nx: &Path,
    tree: &Path,
    out: &Path,
    verity: bool,
    build: &Path,
) -> anyhow::Result<u64> {
    let mut c = Command::new(nx);
    c.args(["image", "build", "--version", "1", "--rootfs"])
        .arg(tree)
        .arg("--segment")
        .arg(format!("kernel={}", build.join("kernel/vmlinuz").display()))
        .arg("--segment")
        .arg(format!("initrd={}", build.join("initrd.cpio").display()))
        .arg("--out")
        .arg(out);
    if !verity {
        c.arg("--no-verity");
    }
    run_cmd(&mut c)?;
    let text = util::capture(
        Command::new(nx)
            .args(["image", "inspect", "--json"])
            .arg(out),
    )?;
    let v: serde_json::Value = serde_json::from_str(&text).context("nx image inspect --json")?;
    v["segments"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "rootfs"))
        .and_then(|s| s["size"].as_u64())
        .context("no rootfs segment in nx image inspect --json")
}

fn boot(dir: &Path, image: &Path) -> anyhow::Result<(u64, String)> {
    let cfg = crate::disks::fresh_device(dir, Some(image))?;
    let runner = Runner::start(cfg)?;
    let t = Duration::from_secs(180);
    runner.wait_for(markers::init::ROOTFS_MOUNT_TOOK_PREFIX, t)?;
    runner.wait_for(markers::init::ready().as_str(), t)?;
    let line = runner
        .grep(markers::init::ROOTFS_MOUNT_TOOK_PREFIX)
        .into_iter()
        .next()
        .context("no rootfs mount line")?;
    parse_took(&line).with_context(|| format!("cannot parse {line:?}"))
}

/// Build the images and boot each case.
pub fn measure() -> anyhow::Result<Vec<Case>> {
    let build = util::build_dir();
    let work = build.join("bench/rootfs");
    std::fs::create_dir_all(&work)?;
    run_cmd(util::cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
    let nx = util::root().join("target/debug/nx");
    let normal = build.join("rootfs/nexus-os");
    anyhow::ensure!(
        normal.join("etc/os-release").is_file(),
        "{} is missing: run `cargo xtask guest` first",
        normal.display()
    );
    let big = work.join("big-tree");
    let _ = std::fs::remove_dir_all(&big);
    run_cmd(
        Command::new(util::tool("cp")?)
            .arg("-a")
            .arg(&normal)
            .arg(&big),
    )?;
    let data = crate::guest::junk(PAD_MIB << 20, 0x2545_F491_4F6C_DD1D);
    std::fs::write(big.join("opt-padding.bin"), &data)?;
    drop(data);
    let mut out = Vec::new();
    let trees: [(String, PathBuf); 2] = [
        ("normal".to_string(), normal),
        (format!("normal + {PAD_MIB} MiB"), big),
    ];
    for (label, tree) in &trees {
        for verity in [true, false] {
            let img = work.join("case.img");
            let bytes = build_image(&nx, tree, &img, verity, &build)?;
            let (ms, how) = boot(&work.join("device"), &img)?;
            eprintln!("xtask: bench rootfs: {label} ({bytes} bytes), {how}: {ms} ms");
            out.push(Case {
                rootfs: label.clone(),
                rootfs_bytes: bytes,
                how,
                mount_ms: ms,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn took_lines() {
        let l = markers::init::rootfs_mount_took(346, "dm-verity").into_string();
        assert_eq!(parse_took(&l), Some((346, "dm-verity".to_string())));
        assert_eq!(parse_took("init: ready"), None);
    }
}
