//! The dm-verity scenario (issue 14, item 3) on a real QEMU guest, fresh disks under
//! `build/e2e/verity/` (system_a seeded with the demo image, which carries a verity tree):
//!
//! - `verity`: slot a boots through dm-verity (`init: rootfs verity root=<the manifest's root
//!   hash>`), is confirmed; QEMU stops. One byte of the rootfs's squashfs superblock is flipped
//!   on the slot disk from the host — the `mkfs_time` field, which squashfs itself never
//!   checks, so only dm-verity can notice. The next power-on: the verity device refuses the
//!   read at the mount (`EIO`), init reports the slot's rootfs unusable with the dm-verity
//!   error and, slot a being blessed (not on trial), resets into recovery through the
//!   bootloader's one-shot entry, as the boot flow dictates.
//!
//! - `verity-rollback` (the acceptance of issue 14: "a byte flipped on the slot disk after
//!   install makes the next boot fail verity and roll back"): recovery → `nx flash send` v2 →
//!   slot b activated on trial → power cut right after `rebootd: next-boot=normal` (before the
//!   firmware starts b) → one byte of b's squashfs superblock flipped from the host → power on:
//!   three trial boots of b, each refused by dm-verity at the mount; systemd-boot counts them
//!   and falls back to slot a by itself; bootctld marks b bad; a boots and confirms.
//!
//! The second power-on's console is checked against `[e2e.verity]` / `[e2e.verity-rollback]`
//! of `qemu/markers.toml`.

use super::slots::{wait_activation, wait_fallback_to_a};
use super::support::{
    built_image, check_console, fail, partition_offset, receipt_installed, wait, Ctx,
};
use anyhow::{ensure, Context};
use nx_contract::markers;
use std::os::unix::fs::FileExt;

/// Byte of the squashfs superblock that is flipped: `mkfs_time` (bytes 8..12).
const FLIPPED_BYTE: u64 = 8;

/// The rootfs segment's offset in the image and the first 16 hex digits of its verity root.
fn rootfs_and_root(image: &std::path::Path) -> anyhow::Result<(u64, String)> {
    let f = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let mut header = vec![0u8; proto::image::HEADER_LEN];
    f.read_exact_at(&mut header, 0)?;
    let h = proto::image::Header::parse(&header)?;
    let mut head = vec![0u8; usize::try_from(h.data_offset)?];
    f.read_exact_at(&mut head, 0)?;
    let head = proto::image::ImageHead::parse(&head)?;
    let m = &head.manifest;
    let rootfs = m
        .segment("rootfs")
        .with_context(|| format!("{} has no rootfs segment", image.display()))?;
    let v = m.verity_of("rootfs").with_context(|| {
        format!(
            "{} has no verity entry for its rootfs (built with --no-verity?)",
            image.display()
        )
    })?;
    let root: String = v.root_hash[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((rootfs.offset, root))
}

/// Flip byte [`FLIPPED_BYTE`] of the rootfs of `image` installed on `partition` of the
/// scenario's disk (QEMU stopped).
fn flip_rootfs_byte(ctx: &Ctx, partition: &str, image: &std::path::Path) -> anyhow::Result<()> {
    let (rootfs_offset, _) = rootfs_and_root(image)?;
    let disk = ctx.dir.join("disk.img");
    let at = partition_offset(&disk, partition)? + rootfs_offset + FLIPPED_BYTE;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .with_context(|| format!("open {}", disk.display()))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    f.write_all_at(&[b[0] ^ 0xff], at)?;
    f.sync_all()?;
    eprintln!(
        "xtask: e2e: flipped byte {at} of {} (squashfs superblock mkfs_time of {partition}'s rootfs: {:#04x} -> {:#04x})",
        disk.display(),
        b[0],
        b[0] ^ 0xff
    );
    Ok(())
}

/// Scenario `verity-rollback`.
pub fn verity_rollback(ctx: &Ctx) -> anyhow::Result<()> {
    let v2 = built_image("nexus-os-v2.img")?;
    let mut runner = ctx.boot_recovery()?;
    let lines = ctx.send(&runner, &v2)?;
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    wait_activation(&runner, "2")?;
    // Power cut before the firmware starts slot b: what flashd wrote is on the disk.
    runner.stop();
    flip_rootfs_byte(ctx, "system_b", &v2)?;

    let mut runner = ctx.boot(false)?;
    for _ in 0..3 {
        wait(
            &runner,
            &[
                markers::init::loader_slot("b", true).as_str(),
                markers::init::rootfs_unusable_of("b", true).as_str(),
            ],
        )?;
    }
    wait_fallback_to_a(&runner)?;
    let refused = runner.grep(markers::init::rootfs_unusable_of("b", true).as_str());
    ensure!(
        refused.len() == 3
            && refused
                .iter()
                .all(|l| l.contains(markers::init::VERITY_REFUSED)),
        "{}",
        fail(
            &runner,
            &format!("slot b's three tries were not all refused by dm-verity: {refused:?}")
        )
    );
    runner.stop();
    check_console(ctx, &runner)
}

/// Scenario `verity`.
pub fn verity(ctx: &Ctx) -> anyhow::Result<()> {
    let image = built_image("nexus-os.img")?;
    let (_, root) = rootfs_and_root(&image)?;
    let mut runner = ctx.boot(false)?;
    wait(
        &runner,
        &[
            markers::init::loader_slot("a", false).as_str(),
            markers::init::rootfs_verity(&root).as_str(),
            markers::init::booted("a", "1", false).as_str(),
            markers::init::confirmed("a").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    runner.stop();
    flip_rootfs_byte(ctx, "system_a", &image)?;

    let mut runner = ctx.boot(false)?;
    wait(
        &runner,
        &[
            markers::init::loader_slot("a", false).as_str(),
            markers::init::rootfs_unusable_of("a", false).as_str(),
        ],
    )?;
    let unusable = runner.grep(markers::init::rootfs_unusable_of("a", false).as_str());
    ensure!(
        unusable
            .iter()
            .any(|l| l.contains(markers::init::VERITY_REFUSED)),
        "{}",
        fail(
            &runner,
            &format!("the rootfs was refused, but not by dm-verity: {unusable:?}")
        )
    );
    // The kernel's own report of the refused block (KERN_ERR: shown despite `quiet`).
    ensure!(
        runner
            .grep("device-mapper: verity:")
            .iter()
            .any(|l| l.contains("data block 0 is corrupted")),
        "{}",
        fail(
            &runner,
            "the kernel did not report `device-mapper: verity: …: data block 0 is corrupted`"
        )
    );
    ensure!(
        !runner.console_contains(markers::init::BOOTED_PREFIX),
        "{}",
        fail(&runner, "a slot booted although its rootfs was corrupted")
    );
    ctx.wait_ready(&runner)?;
    runner.stop();
    check_console(ctx, &runner)
}
