//! What the e2e scenarios share: the per-scenario context [`Ctx`] (fresh disks, the runner,
//! `nx` transfers), console checks, the test images and small helpers. Scenario modules import
//! only from here.

use crate::util::{self, cargo, run_cmd};
use anyhow::{ensure, Context};
use nx_contract::markers;
use nx_qemu::markers::Contract;
use nx_qemu::{Config, Runner};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Scenarios that run several guests, each with its own disks under `build/e2e/<name>/<guest>/`.
const MULTI_GUEST: [&str; 1] = ["fanout"];

/// Size of the incompressible payload of the big test image.
const BIG_PAYLOAD_MIB: usize = 24;

/// Per-scenario time budget for a boot or a transfer.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Ctx {
    pub name: String,
    pub dir: PathBuf,
    pub nx: PathBuf,
    pub contract: Contract,
    pub echo: bool,
}

impl Ctx {
    pub fn new(name: &str, echo: bool) -> anyhow::Result<Ctx> {
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
            // A new device: fresh NVRAM too (the runner copies OVMF's template).
            let _ = std::fs::remove_file(dir.join("ovmf-vars.fd"));
        }
        run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
        let nx = util::host_bin("nx");
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
        cfg.state_img = Some(self.dir.join("state.img"));
        cfg.disk_img = Some(self.dir.join("disk.img"));
        cfg.run_dir = self.dir.join("qemu");
        cfg.uefi = Some(nx_qemu::Uefi::ovmf(self.dir.join("ovmf-vars.fd")));
        cfg.ports = Config::new(&build)
            .ports
            .into_iter()
            .map(|mut p| {
                p.socket = cfg.run_dir.join(p.socket.file_name().unwrap_or_default());
                p
            })
            .collect();
        // The UART's socket in the scenario's run directory too (scenarios never share one).
        cfg.uart = Some(cfg.run_dir.join(nx_contract::ports::UART.socket));
        cfg.recovery = recovery;
        cfg.echo = self.echo;
        Ok(cfg)
    }

    pub fn wait_ready(&self, runner: &Runner) -> anyhow::Result<()> {
        runner
            .wait_for(
                markers::recovery::ready("/dev/vport0p1").as_str(),
                STEP_TIMEOUT,
            )
            .map_err(|e| fail(runner, &format!("recovery did not become ready: {e}")))?;
        Ok(())
    }

    /// `nx flash reboot recovery` on the running normal guest, then wait for recovery's flashd.
    pub fn reboot_to_recovery(&self, runner: &Runner) -> anyhow::Result<()> {
        let reboot_port = self.port(runner, nx_contract::ports::REBOOT.name)?;
        nx(
            self,
            runner,
            &["flash", "reboot", "recovery", "--port", &reboot_port],
        )?;
        wait(runner, &["rebootd: next-boot=recovery"])?;
        self.wait_ready(runner)
    }

    fn sock(&self, runner: &Runner) -> anyhow::Result<String> {
        self.port(runner, nx_contract::ports::FLASH.name)
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
        self.send_over(runner, &self.sock(runner)?, &[], image)
    }

    /// [`Self::send`] over `port` (any `nx --port` spec) with `flags` added.
    pub fn send_over(
        &self,
        runner: &Runner,
        port: &str,
        flags: &[String],
        image: &Path,
    ) -> anyhow::Result<Vec<String>> {
        let out = Command::new(&self.nx)
            .args(["flash", "send", "--json", "--port", port])
            .args(flags)
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

/// Whether `path` is an image of this build's format, signed (a cached image made by an older
/// build is rebuilt).
fn current_signed_image(path: &Path) -> bool {
    use std::io::Read;
    let mut bytes = Vec::new();
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    if f.take(proto::image::MAX_HEAD_LEN as u64)
        .read_to_end(&mut bytes)
        .is_err()
    {
        return false;
    }
    let Ok(header) = proto::image::Header::parse(&bytes) else {
        return false;
    };
    usize::try_from(header.data_offset)
        .ok()
        .and_then(|n| bytes.get(..n))
        .and_then(|h| proto::image::ImageHead::parse(h).ok())
        .is_some_and(|h| h.is_signed())
}

/// A deterministic image big enough to cut mid-transfer (incompressible payload).
pub fn big_image() -> anyhow::Result<PathBuf> {
    payload_image("big", BIG_PAYLOAD_MIB << 20, 0x9E37_79B9_7F4A_7C15)
}

/// `build/e2e/<name>.img`: a signed image (version 2.0.0, security version 2) whose rootfs
/// holds `payload` bytes of incompressible junk from `seed`; rebuilt when stale.
pub fn payload_image(name: &str, payload: usize, seed: u64) -> anyhow::Result<PathBuf> {
    let dir = util::build_dir().join("e2e");
    let out = dir.join(format!("{name}.img"));
    let rootfs = dir.join(format!("{name}-rootfs"));
    let data = crate::guest::junk(payload, seed);
    let changed = util::write_if_changed(&rootfs.join("opt/payload.bin"), &data)?;
    if !changed && current_signed_image(&out) {
        return Ok(out);
    }
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
            .args(["--version", "2.0.0", "--security-version", "2", "--sign"])
            .arg(crate::keys::ensure_dev_key(&util::build_dir())?)
            .arg("--out")
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

pub fn receipt_installed(lines: &[String]) -> bool {
    lines
        .last()
        .is_some_and(|l| l.contains("\"state\":\"installed\""))
}

pub fn built_image(file: &str) -> anyhow::Result<PathBuf> {
    let p = util::build_dir().join(file);
    ensure!(
        p.exists(),
        "{} is missing: `cargo xtask guest` builds it (nx image build failed?)",
        p.display()
    );
    Ok(p)
}

/// Wait for each marker in order (after the previous hit).
pub fn wait(runner: &Runner, markers: &[&str]) -> anyhow::Result<()> {
    for m in markers {
        runner
            .wait_for(m, STEP_TIMEOUT)
            .map_err(|e| fail(runner, &format!("[error] Missing marker: {m} ({e})")))?;
    }
    Ok(())
}

/// Run `nx` with `args`; its stdout, or an error with its stderr.
pub fn nx(ctx: &Ctx, runner: &Runner, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&ctx.nx)
        .args(args)
        .output()
        .context("could not run nx")?;
    if !out.status.success() {
        return Err(fail(
            runner,
            &format!(
                "nx {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// JSON without whitespace (the view is deterministic; this makes substring checks easy).
pub fn compact(json: &str) -> String {
    json.chars().filter(|c| !c.is_whitespace()).collect()
}

/// A copy of the scenario's state.img (in a temp dir, QEMU stopped) with its ext4 journal
/// replayed (`e2fsck -E journal_only`), as the next boot's mount would: `(dir, copy)`.
pub fn replayed_state_copy(ctx: &Ctx) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("state.img");
    util::run_cmd(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(ctx.dir.join("state.img"))
            .arg(&img),
    )?;
    let st = Command::new(util::tool("e2fsck")?)
        .args(["-E", "journal_only", "-y"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("could not run e2fsck")?;
    // 0: clean, 1: errors corrected (the journal was replayed).
    ensure!(
        matches!(st.code(), Some(0 | 1)),
        "e2fsck -E journal_only on a copy of state.img failed ({st})"
    );
    Ok((tmp, img))
}

/// The whole console of the run against `[e2e.<name>]` of qemu/markers.toml.
pub fn check_console(ctx: &Ctx, runner: &Runner) -> anyhow::Result<()> {
    let sc = ctx
        .contract
        .e2e
        .get(&ctx.name)
        .with_context(|| format!("qemu/markers.toml has no [e2e.{}]", ctx.name))?;
    let log = runner.config().console_log();
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let forbidden: Vec<String> = ctx
        .contract
        .defaults
        .forbidden
        .iter()
        .filter(|f| !sc.allowed.contains(f))
        .chain(&sc.forbidden)
        .cloned()
        .collect();
    nx_qemu::markers::check_lines(&lines, &sc.markers, &forbidden)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "xtask: e2e: {} markers of [e2e.{}] in order in {} ({} boots)",
        sc.markers.len(),
        ctx.name,
        log.display(),
        runner.boots()
    );
    Ok(())
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

    #[test]
    fn compact_json() {
        assert_eq!(
            compact("{\n  \"active\": \"b\",\n  \"x\": { \"a\": 1 }\n}\n"),
            r#"{"active":"b","x":{"a":1}}"#
        );
    }
}
