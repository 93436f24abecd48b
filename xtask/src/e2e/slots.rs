//! The A/B update scenarios on a real QEMU guest: one runner session each, with real resets
//! through OVMF and systemd-boot (the bootloader picks the entry, counts tries, falls back),
//! fresh disks under `build/e2e/<name>/` (system_a and the ESP seeded with the v1 image).
//!
//! - `update`: slot a boots → `nx flash reboot recovery` → `nx flash send build/nexus-os-v2.img`
//!   → flashd installs into slot b, `slotImaged`, `setActive(b, trial, 3)`, automatic reboot →
//!   `init: booted slot=b version=2 trial=true` → confirm → `nx boot reboot` → slot b boots
//!   again, not on trial; `nx boot status --json` shows b active and good at each step, and the
//!   snapshot read offline from state.img after the run says the same.
//!   v1 lies beside v2 in build/: the transfer must be a delta against the active slot (most
//!   data bytes patched, checked in nx's receipt).
//! - `update-cut`: the same delta update cut at 50 % (nx killed); the next `nx flash send`
//!   resumes it, v2 boots on trial and confirms.
//! - `rollback`: recovery → `nx flash send build/nexus-os-broken.img` (its rootfs is junk) →
//!   three trial boots of b that never mount: init resets at once, systemd-boot counts each
//!   try (`nexus-2-b+3.conf` → `+2-1` → `+1-2` → `+0-3`) → the bootloader boots slot a by
//!   itself → bootctld marks b bad and follows; status shows a active/good, b bad.
//! - `badkernel`: the same with `build/nexus-os-v3-badkernel.img`, whose initrd cannot run
//!   its init: three kernel panics before any userspace, then slot a — the counting and the
//!   fallback are the bootloader's alone.
//! - `update-powercut`: recovery → `nx flash send` of the big image → QEMU killed right after
//!   `flashd: verify ok`, i.e. while flashd writes slot b → the next normal boot boots slot a.
//!   How much of system_b was written when the power went is reported.
//!
//! After each scenario the whole console log is checked against `[e2e.<name>]` of
//! `qemu/markers.toml` (order and forbidden markers).
//!
//! These need flashd's slot hook (`--install-slot auto`, see `guest/flashd/src/slots.rs`):
//! with flashd still installing into the fixed partition `system_b` they stop at
//! `bootctl: slotImaged slot=b …` with a message saying so.

use super::support::{
    big_image, built_image, check_console, compact, fail, nx, partition_offset, receipt_installed,
    replayed_state_copy, wait, Ctx, STEP_TIMEOUT,
};
use crate::util;
use anyhow::{bail, ensure, Context};
use nx_contract::markers;
use nx_qemu::{BootTarget, Runner};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Longest wait between `flashd: install slot=b` and the power cut (`NX_E2E_CUT_DELAY_MS`).
const CUT_DELAY: Duration = Duration::from_secs(10);

fn cut_delay() -> Duration {
    std::env::var("NX_E2E_CUT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(CUT_DELAY)
}

/// How long flashd may take from `verify ok` to activating the slot.
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(20);

/// Wait for flashd's activation of the new slot; say clearly when flashd has no slot hook.
pub(super) fn wait_activation(runner: &Runner, version: &str) -> anyhow::Result<()> {
    let imaged = format!("bootctl: slotImaged slot=b version={version}");
    if let Err(e) = runner.wait_for(&imaged, ACTIVATE_TIMEOUT) {
        let hint = if runner.console_contains("flashd: installed") {
            "flashd installed the image but never told bootctld (no `bootctl: slotImaged`): \
             flashd has no slot-aware install yet — it needs the slot hook \
             (guest/flashd/src/slots.rs) and recovery-init must start it with --install-slot auto"
        } else {
            "flashd did not finish the install"
        };
        return Err(fail(
            runner,
            &format!("[error] Missing marker: {imaged} ({e}); {hint}"),
        ));
    }
    wait(
        runner,
        &[
            "bootctl: setActive slot=b trial=true tries=3",
            "rebootd: next-boot=normal",
        ],
    )
}

/// After slot b's last trial try: the bootloader boots slot a by itself, bootctld marks b bad
/// and follows, a boots and confirms.
pub(super) fn wait_fallback_to_a(runner: &Runner) -> anyhow::Result<()> {
    wait(
        runner,
        &[
            markers::init::loader_slot("a", false).as_str(),
            "bootctl: markBad slot=b",
            "bootctl: rollback to slot=a",
            markers::init::booted("a", "1", false).as_str(),
            markers::init::confirmed("a").as_str(),
            markers::init::ready().as_str(),
        ],
    )
}

/// `nx boot status --json` of the running guest must contain every `want` (compact JSON).
fn expect_status(ctx: &Ctx, runner: &Runner, want: &[&str]) -> anyhow::Result<()> {
    let port = ctx.port(runner, nx_contract::ports::BOOTCTL.name)?;
    let json = nx(ctx, runner, &["boot", "status", "--json", "--port", &port])?;
    let c = compact(&json);
    for w in want {
        if !c.contains(w) {
            return Err(fail(
                runner,
                &format!("nx boot status --json lacks {w}:\n{json}"),
            ));
        }
    }
    eprintln!("xtask: e2e: nx boot status --json ok ({})", want.join(" "));
    Ok(())
}

/// The snapshot `/bootctl/state.nxs` read offline from the scenario's state.img (QEMU
/// stopped) through the host build of bootctld's JSON export; must contain every `want`.
///
/// The run ends with QEMU killed, so the last boot's ext4 journal was not checkpointed (the
/// snapshot's fsync + rename are committed in the journal only): like the next boot would, a
/// copy of state.img gets its journal replayed (`e2fsck -E journal_only`) before reading.
fn expect_snapshot(ctx: &Ctx, want: &[&str]) -> anyhow::Result<()> {
    let (tmp, img) = replayed_state_copy(ctx)?;
    std::fs::create_dir_all(tmp.path().join("bootctl"))?;
    let nxs = tmp.path().join("bootctl/state.nxs");
    util::run_cmd(
        Command::new(util::tool("debugfs")?)
            .arg("-R")
            .arg(format!("dump /bootctl/state.nxs {}", nxs.display()))
            .arg(&img)
            .stderr(Stdio::null()),
    )?;
    let len = std::fs::metadata(&nxs).map(|m| m.len()).unwrap_or(0);
    ensure!(
        len > 0,
        "/bootctl/state.nxs is missing from {} after the run",
        ctx.dir.join("state.img").display()
    );
    util::run_cmd(util::cargo().args(["build", "-q", "-p", "bootctld", "--bin", "bootctld"]))?;
    let out = util::capture(
        Command::new(util::host_bin("bootctld"))
            .arg("--state")
            .arg(tmp.path())
            .args(["--allow-unmounted-state", "--export-json"]),
    )?;
    let c = compact(&out);
    for w in want {
        ensure!(
            c.contains(w),
            "state.nxs ({len} bytes) read offline lacks {w}:\n{out}"
        );
    }
    eprintln!(
        "xtask: e2e: /state/bootctl/state.nxs ({len} bytes) survived the run: {}",
        want.join(" ")
    );
    Ok(())
}

/// Scenario `update`.
pub fn update(ctx: &Ctx) -> anyhow::Result<()> {
    let v2 = built_image("nexus-os-v2.img")?;
    let mut runner = ctx.boot(false)?;
    wait(
        &runner,
        &[
            markers::init::booted("a", "1", false).as_str(),
            markers::init::confirmed("a").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    expect_status(
        ctx,
        &runner,
        &[r#""active":"a""#, r#""a":{"health":"good""#],
    )?;

    ctx.reboot_to_recovery(&runner)?;

    let lines = ctx.send(&runner, &v2)?;
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    expect_delta(&lines)?;
    wait_activation(&runner, "2")?;
    wait(
        &runner,
        &[
            markers::init::booted("b", "2", true).as_str(),
            "bootctl: confirm",
            markers::init::confirmed("b").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    expect_status(
        ctx,
        &runner,
        &[
            r#""active":"b""#,
            r#""b":{"health":"good","trial":false,"tries_left":0,"version":"2"}"#,
            r#""a":{"health":"good""#,
        ],
    )?;

    let bootctl_port = ctx.port(&runner, nx_contract::ports::BOOTCTL.name)?;
    nx(ctx, &runner, &["boot", "reboot", "--port", &bootctl_port])?;
    wait(
        &runner,
        &[
            "bootctl: reboot",
            markers::init::booted("b", "2", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    expect_status(
        ctx,
        &runner,
        &[
            r#""active":"b""#,
            r#""b":{"health":"good","trial":false,"tries_left":0,"version":"2"}"#,
        ],
    )?;
    runner.stop();
    check_console(ctx, &runner)?;
    expect_snapshot(
        ctx,
        &[
            r#""storage":"persistent""#,
            r#""active":"b""#,
            r#""b":{"health":"good","trial":false,"tries_left":0,"version":"2"}"#,
        ],
    )?;
    plain_qemu_boots(ctx, markers::init::booted("b", "2", false).as_str())
}

/// The documented plain QEMU command (`nx_qemu::plain_args`, no runner, no ports) boots the
/// scenario's flashed disk: the console shows `marker` within two minutes.
fn plain_qemu_boots(ctx: &Ctx, marker: &str) -> anyhow::Result<()> {
    let dir = &ctx.dir;
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let log = dir.join("plain-qemu.log");
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let mut child = Command::new(util::tool("qemu-system-x86_64")?)
        .args(nx_qemu::plain_args(
            &path("ovmf-vars.fd"),
            &path("disk.img"),
            &path("state.img"),
        ))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .context("start the plain qemu-system-x86_64")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(marker) {
            break true;
        }
        if std::time::Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    if !seen {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        bail!(
            "the plain QEMU command did not boot the flashed disk to {marker:?} (console {}):\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!(
        "xtask: e2e: the plain QEMU command (docs/runner/boot.md) boots the flashed disk: {marker}"
    );
    Ok(())
}

/// Scenario `rollback`.
pub fn rollback(ctx: &Ctx) -> anyhow::Result<()> {
    let broken = built_image("nexus-os-broken.img")?;
    bootloader_rollback(ctx, &broken, crate::guest::BROKEN_VERSION, &|| {
        vec![
            markers::init::loader_slot("b", true).into_string(),
            markers::init::rootfs_unusable_of("b", true).into_string(),
            markers::init::reset_for_next_try("b").into_string(),
        ]
    })
}

/// `v3-badkernel`: the slot's initrd cannot run its init, the kernel panics before any
/// userspace three times; systemd-boot counts the tries down and then boots slot a by itself.
pub fn badkernel(ctx: &Ctx) -> anyhow::Result<()> {
    let bad = built_image("nexus-os-v3-badkernel.img")?;
    bootloader_rollback(ctx, &bad, crate::guest::BADKERNEL_VERSION, &|| {
        vec![
            nx_qemu::FIRMWARE_BOOT_LINE.to_string(),
            "Kernel panic - not syncing".to_string(),
        ]
    })
}

/// Install `image` (a slot that never comes up) from recovery; each of its three trial boots
/// shows `each_try`; then the bootloader boots slot a, bootctld marks b bad and follows.
fn bootloader_rollback(
    ctx: &Ctx,
    image: &Path,
    version: &str,
    each_try: &dyn Fn() -> Vec<String>,
) -> anyhow::Result<()> {
    let mut runner = ctx.boot_recovery()?;
    let lines = ctx.send(&runner, image)?;
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    wait_activation(&runner, version)?;
    for _ in 0..3 {
        let want = each_try();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        wait(&runner, &want)?;
    }
    wait_fallback_to_a(&runner)?;
    expect_status(
        ctx,
        &runner,
        &[
            r#""active":"a""#,
            r#""a":{"health":"good""#,
            &format!(
                r#""b":{{"health":"bad","trial":false,"tries_left":0,"version":"{version}"}}"#
            ),
        ],
    )?;
    runner.stop();
    check_console(ctx, &runner)?;
    expect_snapshot(ctx, &[r#""active":"a""#, r#""b":{"health":"bad""#])
}

/// How much of `image` is at the start of system_b in `disk`: `(matching prefix, total)`.
fn written_prefix(disk: &Path, image: &Path) -> anyhow::Result<(u64, u64)> {
    let off = partition_offset(disk, "system_b")?;
    let d = std::fs::File::open(disk)?;
    let mut img = std::fs::File::open(image)?;
    let total = img.metadata()?.len();
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < total {
        let n = usize::try_from((total - done).min(1 << 20))?;
        img.read_exact(&mut a[..n])?;
        d.read_exact_at(&mut b[..n], off + done)?;
        if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
            return Ok((done + i as u64, total));
        }
        done += n as u64;
    }
    Ok((total, total))
}

/// Poll (every millisecond, up to `max`) until the first 4 KiB of `image` are at the start of
/// system_b in `disk`: the slot write has started reaching the disk.
fn wait_for_write_start(disk: &Path, image: &Path, max: Duration) {
    let Ok(off) = partition_offset(disk, "system_b") else {
        return;
    };
    let mut want = vec![0u8; 4096];
    let Ok(()) = std::fs::File::open(image).and_then(|mut f| f.read_exact(&mut want)) else {
        return;
    };
    let Ok(d) = std::fs::File::open(disk) else {
        return;
    };
    let t0 = std::time::Instant::now();
    let mut got = vec![0u8; 4096];
    while t0.elapsed() < max {
        if d.read_exact_at(&mut got, off).is_ok() && got == want {
            eprintln!(
                "xtask: e2e: the slot write reached disk.img {} ms after `flashd: install slot=b`; cutting the power",
                t0.elapsed().as_millis()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// v1 (the running slot's image) sits beside v2 in build/: the transfer must have been a delta
/// against the active slot — most data bytes patched, not sent.
fn expect_delta(lines: &[String]) -> anyhow::Result<()> {
    expect_patched(lines, 0.5)
}

/// At least `fraction` of the data bytes not held from an earlier session were patched.
fn expect_patched(lines: &[String], fraction: f64) -> anyhow::Result<()> {
    let receipt = lines.last().map(String::as_str).unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(receipt).context("nx's receipt is not JSON")?;
    let segs = v["segments"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| segs.iter().filter_map(|s| s[k].as_u64()).sum::<u64>();
    let (patched, size, zero) = (
        sum("patched_bytes"),
        sum("size"),
        sum("zero_bytes") + sum("resumed_bytes"),
    );
    eprintln!(
        "xtask: e2e: delta update: {patched} of {} data bytes patched against the active slot, {} bytes on the wire",
        size - zero,
        v["wire_bytes"]
    );
    ensure!(
        patched as f64 >= (size - zero) as f64 * fraction && patched > 0,
        "the update was not sent as a delta against the active slot: {patched} of {} data bytes patched",
        size - zero
    );
    Ok(())
}

/// Scenario `update-cut`: like `update`, but the delta transfer is cut at 50 % (nx killed);
/// the next `nx flash send` resumes it and v2 boots.
pub fn update_cut(ctx: &Ctx) -> anyhow::Result<()> {
    let v2 = built_image("nexus-os-v2.img")?;
    let mut runner = ctx.boot(false)?;
    wait(
        &runner,
        &[
            markers::init::booted("a", "1", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    ctx.reboot_to_recovery(&runner)?;
    ctx.send_and_cut(&runner, &v2, 0.5, &|| {})?;
    let lines = ctx.send(&runner, &v2)?;
    ensure!(
        lines.iter().any(|l| l.contains("\"event\":\"resumed\"")),
        "the delta transfer did not resume (no `resumed` event)"
    );
    expect_patched(&lines, 0.5)?;
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    wait_activation(&runner, "2")?;
    wait(
        &runner,
        &[
            markers::init::booted("b", "2", true).as_str(),
            markers::init::confirmed("b").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    runner.stop();
    check_console(ctx, &runner)
}

/// Scenario `update-powercut`.
pub fn update_powercut(ctx: &Ctx) -> anyhow::Result<()> {
    let image = big_image()?;
    let mut runner = ctx.boot_recovery()?;
    let mut child = Command::new(&ctx.nx)
        .args([
            "flash",
            "send",
            "--json",
            "--port",
            &ctx.port(&runner, nx_contract::ports::FLASH.name)?,
        ])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("could not run nx")?;
    // Cut while flashd writes system_b: it prints `flashd: install slot=b (…)` right before
    // the write starts (after `flashd: verify ok`). The guest's writes reach disk.img when its
    // page cache is flushed (the install's fsync), so the cut comes as soon as the image's
    // first block shows up in system_b on the host — mid-write — or `cut_delay()` at most.
    let started = runner
        .wait_for("flashd: verify ok", STEP_TIMEOUT)
        .and_then(|_| runner.wait_for("flashd: install slot=b", Duration::from_secs(10)));
    if started.is_ok() {
        wait_for_write_start(&ctx.dir.join("disk.img"), &image, cut_delay());
        runner.power_cycle(Some(BootTarget::Normal));
    }
    let _ = child.kill();
    let _ = child.wait();
    started.map_err(|e| {
        fail(
            &runner,
            &format!(
                "[error] Missing marker: flashd: install slot=b ({e}); flashd has no slot-aware install yet?"
            ),
        )
    })?;
    wait(&runner, &["[nx-qemu] power cut"])?;
    if runner.console_contains("bootctl: setActive slot=b") {
        bail!(
            "the power cut came too late: slot b was already activated (`bootctl: setActive slot=b` \
             before the cut), so this run did not test a cut during the slot write"
        );
    }
    wait(
        &runner,
        &[
            markers::init::booted("a", "1", false).as_str(),
            markers::init::confirmed("a").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    expect_status(
        ctx,
        &runner,
        &[r#""active":"a""#, r#""a":{"health":"good""#],
    )?;
    runner.stop();
    let (written, total) = written_prefix(&ctx.dir.join("disk.img"), &image)?;
    let when = if written == total {
        "the write had completed (cut before activation)".to_string()
    } else if written == 0 {
        "the write had not reached system_b yet".to_string()
    } else {
        format!("during the write: {written} of {total} bytes of system_b were the image")
    };
    eprintln!("xtask: e2e: power cut {when}; slot a booted");
    check_console(ctx, &runner)?;
    expect_snapshot(ctx, &[r#""active":"a""#, r#""a":{"health":"good""#])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_of_a_partial_write() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk.img");
        crate::disks::ensure_disk(&disk, true, None).unwrap();
        let img = d.path().join("img");
        std::fs::write(&img, vec![7u8; 10_000]).unwrap();
        assert_eq!(written_prefix(&disk, &img).unwrap(), (0, 10_000));
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let off = crate::disks::slot_offset('b');
        assert_eq!(partition_offset(&disk, "system_b").unwrap(), off);
        f.write_all_at(&[7u8; 4096], off).unwrap();
        assert_eq!(written_prefix(&disk, &img).unwrap(), (4096, 10_000));
    }
}
