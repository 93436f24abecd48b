//! The flash scenarios: `flash` (one transfer, every flashd marker of `[flash]` in order, the
//! installed bytes equal the image), `flash-cut-resume` (nx killed mid-transfer, the second
//! send resumes) and `flash-powercut-resume` (QEMU killed mid-transfer, recovery boots again,
//! the send resumes).

use super::support::{big_image, demo_image, partition_offset, receipt_installed, Ctx};
use anyhow::{bail, ensure};
use nx_qemu::BootTarget;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The first `len(image)` bytes of `system_b` equal the image file.
pub(super) fn verify_installed(disk: &Path, image: &Path) -> anyhow::Result<()> {
    let want = std::fs::read(image)?;
    let off = partition_offset(disk, "system_b")?;
    let mut f = std::fs::File::open(disk)?;
    f.seek(SeekFrom::Start(off))?;
    let mut got = vec![0u8; want.len()];
    f.read_exact(&mut got)?;
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        bail!(
            "system_b differs from {} at byte {first} (of {})",
            image.display(),
            want.len()
        );
    }
    eprintln!(
        "xtask: e2e: system_b holds the {} bytes of {}",
        want.len(),
        image.display()
    );
    Ok(())
}

pub fn flash_basic(ctx: &Ctx) -> anyhow::Result<()> {
    let image = demo_image()?;
    let mut runner = ctx.boot_recovery()?;
    let lines = ctx.send(&runner, &image)?;
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    ctx.check_flash_markers(&runner, &ctx.contract.flash.markers)?;
    runner.stop();
    verify_installed(&ctx.dir.join("disk.img"), &image)
}

pub fn flash_cut_resume(ctx: &Ctx) -> anyhow::Result<()> {
    let image = big_image()?;
    let mut runner = ctx.boot_recovery()?;
    ctx.send_and_cut(&runner, &image, 0.3, &|| {})?;
    let lines = ctx.send(&runner, &image)?;
    ensure!(
        lines.iter().any(|l| l.contains("\"event\":\"resumed\"")),
        "the second transfer did not resume (no `resumed` event)"
    );
    ensure!(receipt_installed(&lines), "no installed receipt from nx");
    ctx.check_flash_markers(&runner, &ctx.contract.flash.resume_markers)?;
    runner.stop();
    verify_installed(&ctx.dir.join("disk.img"), &image)
}

pub fn flash_powercut_resume(ctx: &Ctx) -> anyhow::Result<()> {
    let image = big_image()?;
    let mut runner = ctx.boot_recovery()?;
    ctx.send_and_cut(&runner, &image, 0.5, &|| {
        runner.power_cycle(Some(BootTarget::Recovery))
    })?;
    // The firmware powers the guest on again into recovery.
    ctx.wait_ready(&runner)?;
    ensure!(
        runner.boots() >= 2,
        "the guest did not boot again after the power cut"
    );
    let lines = ctx.send(&runner, &image)?;
    ensure!(
        lines.iter().any(|l| l.contains("\"event\":\"resumed\"")),
        "the transfer after the power cut did not resume (no `resumed` event)"
    );
    ensure!(receipt_installed(&lines), "no installed receipt from nx");
    ctx.check_flash_markers(&runner, &ctx.contract.flash.resume_markers)?;
    runner.stop();
    verify_installed(&ctx.dir.join("disk.img"), &image)
}
