//! Flash end-to-end scenarios on a real QEMU guest (run by `cargo xtask ci`, or alone with
//! `cargo xtask e2e [--only NAME]`): the recovery ramdisk's flashd receives an image from
//! `nx flash send` over the real virtio-serial port. Each scenario gets fresh disks under
//! `build/e2e/<name>/` so runs do not depend on each other or on the user's build/state.img.
//!
//! - `flash`: one transfer, every flashd marker of `[flash]` in qemu/markers.toml in order,
//!   installed bytes of `system_b` == the image file.
//! - `flash-cut-resume`: `nx` is killed mid-transfer (the host side of the link is cut), a
//!   second `nx flash send` resumes (a `resumed` event), bytes verified.
//! - `flash-powercut-resume`: QEMU is killed mid-transfer (guest power cut), the guest boots
//!   recovery again, `nx flash send` resumes, bytes verified.
//!
//! The A/B update scenarios (`update`, `rollback`, `update-powercut`) are in `e2e_slots.rs`;
//! the factory-reset and recovery-console scenarios of issue 6 (`reset`, `reset-powercut`,
//! `reset-normal-guard`, `recovery-console`) in `e2e_reset.rs`; the fan-out scenario of issue 7
//! (`fanout`: two guests flashed by one `nx flash send --port A --port B`) in `e2e_fanout.rs`.

use crate::util::{self, cargo, run_cmd};
use anyhow::{bail, ensure, Context};
use nx_qemu::markers::Contract;
use nx_qemu::{BootTarget, Config, Runner};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Scenario names, in run order.
pub const SCENARIOS: [&str; 11] = [
    "flash",
    "flash-cut-resume",
    "flash-powercut-resume",
    "update",
    "rollback",
    "update-powercut",
    "reset",
    "reset-powercut",
    "reset-normal-guard",
    "recovery-console",
    "fanout",
];
/// Scenarios that run several guests, each with its own disks under `build/e2e/<name>/<guest>/`.
const MULTI_GUEST: [&str; 1] = ["fanout"];
/// Size of the incompressible payload of the big test image.
const BIG_PAYLOAD_MIB: usize = 24;
/// Per-scenario time budget for a boot or a transfer.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Arguments of `cargo xtask e2e`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Run only this scenario.
    #[arg(long)]
    pub only: Option<String>,
    /// Do not run `cargo xtask guest` first.
    #[arg(long)]
    pub no_build: bool,
    /// Echo the guest console.
    #[arg(long)]
    pub echo: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.no_build {
        crate::guest::build(&crate::guest::Args::default())?;
    }
    let names: Vec<&str> = match &args.only {
        Some(n) => {
            ensure!(
                SCENARIOS.contains(&n.as_str()),
                "unknown scenario {n}; known: {}",
                SCENARIOS.join(", ")
            );
            vec![n.as_str()]
        }
        None => SCENARIOS.to_vec(),
    };
    let mut failed = 0;
    for n in &names {
        if let Err(e) = run_scenario(n, args.echo) {
            eprintln!("[error] e2e {n}: {e:#}");
            failed += 1;
        }
    }
    println!("e2e: {} passed, {failed} failed", names.len() - failed);
    ensure!(failed == 0, "{failed} e2e scenario(s) failed");
    Ok(())
}

/// Run one scenario by name.
pub fn run_scenario(name: &str, echo: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("xtask: e2e {name}: start");
    let ctx = Ctx::new(name, echo)?;
    match name {
        "flash" => flash_basic(&ctx)?,
        "flash-cut-resume" => flash_cut_resume(&ctx)?,
        "flash-powercut-resume" => flash_powercut_resume(&ctx)?,
        "update" => crate::e2e_slots::update(&ctx)?,
        "rollback" => crate::e2e_slots::rollback(&ctx)?,
        "update-powercut" => crate::e2e_slots::update_powercut(&ctx)?,
        "reset" => crate::e2e_reset::reset(&ctx)?,
        "reset-powercut" => crate::e2e_reset::reset_powercut(&ctx)?,
        "reset-normal-guard" => crate::e2e_reset::reset_normal_guard(&ctx)?,
        "recovery-console" => crate::e2e_reset::recovery_console(&ctx)?,
        "fanout" => crate::e2e_fanout::fanout(&ctx)?,
        other => bail!("unknown scenario {other}"),
    }
    eprintln!("[ok] e2e {name} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

pub struct Ctx {
    pub name: String,
    pub dir: PathBuf,
    pub nx: PathBuf,
    pub contract: Contract,
    pub echo: bool,
}

impl Ctx {
    fn new(name: &str, echo: bool) -> anyhow::Result<Ctx> {
        let dir = util::build_dir().join("e2e").join(name);
        // The fan-out scenario's guests have their own disks in sub-directories.
        Ctx::open(name, &dir, echo, !MULTI_GUEST.contains(&name))
    }

    /// A guest of scenario `name` with fresh disks (state.img, disk.img) and its run
    /// directory (console, sockets) in `dir`.
    pub fn at(name: &str, dir: &Path, echo: bool) -> anyhow::Result<Ctx> {
        Ctx::open(name, dir, echo, true)
    }

    fn open(name: &str, dir: &Path, echo: bool, disks: bool) -> anyhow::Result<Ctx> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        if disks {
            crate::disks::ensure_state(&dir.join("state.img"), true)?;
            crate::disks::ensure_disk(&dir.join("disk.img"), true, Some(&demo_image()?))?;
        }
        run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
        let nx = util::root().join("target/debug/nx");
        let contract = Contract::load(&util::root().join("qemu/markers.toml"))?;
        Ok(Ctx {
            name: name.to_string(),
            dir,
            nx,
            contract,
            echo,
        })
    }

    pub fn boot_recovery(&self) -> anyhow::Result<Runner> {
        let runner = self.boot(true)?;
        self.wait_ready(&runner)?;
        Ok(runner)
    }

    /// Start the firmware loop on this scenario's disks; the first boot is recovery
    /// (`RECOVERY=1`) or whatever the next-boot record says (normal on fresh disks).
    pub fn boot(&self, recovery: bool) -> anyhow::Result<Runner> {
        Ok(Runner::start(self.config(recovery)?)?)
    }

    /// The runner configuration of this scenario's disks and run directory.
    pub fn config(&self, recovery: bool) -> anyhow::Result<Config> {
        let build = util::build_dir();
        let mut cfg = Config::new(&build);
        cfg.qemu = util::tool("qemu-system-x86_64")?;
        cfg.debugfs = util::tool("debugfs")?;
        cfg.state_img = Some(self.dir.join("state.img"));
        cfg.disk_img = Some(self.dir.join("disk.img"));
        cfg.run_dir = self.dir.join("qemu");
        cfg.ports = Config::new(&build)
            .ports
            .into_iter()
            .map(|mut p| {
                p.socket = cfg.run_dir.join(p.socket.file_name().unwrap_or_default());
                p
            })
            .collect();
        cfg.recovery = recovery;
        cfg.echo = self.echo;
        Ok(cfg)
    }

    pub fn wait_ready(&self, runner: &Runner) -> anyhow::Result<()> {
        runner
            .wait_for("recovery: ready (serial=@/dev/vport0p1)", STEP_TIMEOUT)
            .map_err(|e| fail(runner, &format!("recovery did not become ready: {e}")))?;
        Ok(())
    }

    fn sock(&self, runner: &Runner) -> anyhow::Result<String> {
        self.port(runner, nx_qemu::FLASH_PORT.0)
    }

    /// `unix:<host socket>` of a port of this run.
    pub fn port(&self, runner: &Runner, name: &str) -> anyhow::Result<String> {
        let s = runner
            .config()
            .port_socket(name)
            .with_context(|| format!("no port {name}"))?;
        Ok(format!("unix:{}", s.display()))
    }

    /// `nx flash send --json`; returns its stdout lines.
    pub fn send(&self, runner: &Runner, image: &Path) -> anyhow::Result<Vec<String>> {
        let out = Command::new(&self.nx)
            .args(["flash", "send", "--json", "--port", &self.sock(runner)?])
            .arg(image)
            .stderr(Stdio::inherit())
            .output()
            .context("could not run nx")?;
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !out.status.success() {
            return Err(fail(
                runner,
                &format!(
                    "nx flash send failed ({}): {}",
                    out.status,
                    lines.join("\n")
                ),
            ));
        }
        Ok(lines)
    }

    /// Start `nx flash send --json` and kill it once `fraction` of the data went out; `then`
    /// runs right before the kill (e.g. a power cut). Fails when the transfer ended first.
    pub fn send_and_cut(
        &self,
        runner: &Runner,
        image: &Path,
        fraction: f64,
        then: &dyn Fn(),
    ) -> anyhow::Result<u64> {
        let mut child = Command::new(&self.nx)
            .args([
                "flash",
                "send",
                "--json",
                "--window",
                "4",
                "--chunk",
                "64K",
                "--port",
                &self.sock(runner)?,
            ])
            .arg(image)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("could not run nx")?;
        let stdout = child.stdout.take().context("nx stdout")?;
        // nx's stderr (progress bars are off with --json) is kept for the error message.
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                text
            })
        });
        let mut cut_at = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let (Some(done), Some(total)) = (
                json_u64(&line, "done_bytes"),
                json_u64(&line, "total_bytes"),
            ) {
                if line.contains("\"event\":\"progress\"")
                    && total > 0
                    && done as f64 >= total as f64 * fraction
                    && done < total
                {
                    cut_at = Some(done);
                    break;
                }
            }
        }
        then();
        let _ = child.kill();
        let status = child.wait();
        let Some(at) = cut_at else {
            let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(fail(
                runner,
                &format!(
                    "the transfer finished (or failed) before it could be cut (nx: {}; stderr: {})",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    tail.join(" | ")
                ),
            ));
        };
        eprintln!("xtask: e2e: cut the transfer at {at} bytes");
        Ok(at)
    }

    pub fn check_flash_markers(&self, runner: &Runner, markers: &[String]) -> anyhow::Result<()> {
        for m in markers {
            runner
                .wait_for(m, Duration::from_secs(30))
                .map_err(|e| fail(runner, &format!("[error] Missing marker: {m} ({e})")))?;
        }
        Ok(())
    }
}

/// An error carrying the last 40 console lines.
pub fn fail(runner: &Runner, what: &str) -> anyhow::Error {
    let tail = runner.tail(nx_qemu::markers::TAIL_LINES).join("\n");
    anyhow::anyhow!("{what}\n--- last console lines ---\n{tail}\n--- end of console ---")
}

/// A top-level unsigned integer field of a one-line JSON object (`"key":123`).
pub fn json_u64(line: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let rest = &line[line.find(&pat)? + pat.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The small demo image (`cargo xtask guest` builds it).
pub fn demo_image() -> anyhow::Result<PathBuf> {
    let p = util::build_dir().join("nexus-os.img");
    ensure!(
        p.exists(),
        "{} is missing: `nx image build` failed in `cargo xtask guest`",
        p.display()
    );
    Ok(p)
}

/// A deterministic image big enough to cut mid-transfer (incompressible payload).
pub fn big_image() -> anyhow::Result<PathBuf> {
    let dir = util::build_dir().join("e2e");
    let out = dir.join("big.img");
    if out.exists() {
        return Ok(out);
    }
    let rootfs = dir.join("big-rootfs");
    let mut data = vec![0u8; BIG_PAYLOAD_MIB << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(b.get(..chunk.len()).unwrap_or_default());
    }
    util::write_if_changed(&rootfs.join("opt/payload.bin"), &data)?;
    util::write_if_changed(
        &rootfs.join("etc/os-release"),
        b"NAME=\"nexus\"\nID=nexus\nVERSION=\"2.0.0\"\nVERSION_ID=2.0.0\n",
    )?;
    run_cmd(
        cargo()
            .args([
                "run", "-q", "-p", "nx-cli", "--bin", "nx", "--", "image", "build", "--rootfs",
            ])
            .arg(&rootfs)
            .args(["--version", "2.0.0", "--out"])
            .arg(&out),
    )?;
    Ok(out)
}

/// Byte offset of the GPT partition `name` in `disk` (from `sfdisk --dump`).
pub fn partition_offset(disk: &Path, name: &str) -> anyhow::Result<u64> {
    let dump = util::capture(Command::new(util::tool("sfdisk")?).arg("--dump").arg(disk))?;
    let line = dump
        .lines()
        .find(|l| l.contains(&format!("name=\"{name}\"")))
        .with_context(|| format!("no partition {name} in {}", disk.display()))?;
    let start = line
        .split(',')
        .find_map(|f| f.split_once("start=").map(|(_, v)| v.trim()))
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no start= in {line:?}"))?;
    Ok(start * 512)
}

/// The first `len(image)` bytes of `system_b` equal the image file.
fn verify_installed(disk: &Path, image: &Path) -> anyhow::Result<()> {
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

pub fn receipt_installed(lines: &[String]) -> bool {
    lines
        .last()
        .is_some_and(|l| l.contains("\"state\":\"installed\""))
}

fn flash_basic(ctx: &Ctx) -> anyhow::Result<()> {
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

fn flash_cut_resume(ctx: &Ctx) -> anyhow::Result<()> {
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

fn flash_powercut_resume(ctx: &Ctx) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields() {
        let l = r#"{"event":"progress","done_bytes":1234,"total_bytes": 99}"#;
        assert_eq!(json_u64(l, "done_bytes"), Some(1234));
        assert_eq!(json_u64(l, "total_bytes"), Some(99));
        assert_eq!(json_u64(l, "nope"), None);
    }
}
