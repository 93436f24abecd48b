//! `cargo xtask demo`: the whole story from a fresh machine, with stage headings:
//! host packages → guest build (kernel, ramdisks, disks, images) → boot recovery on fresh
//! disks of its own (`build/demo/`: slot a holds the v1 demo image) →
//! `nx flash send` of the version-2 image over virtio-serial into the inactive slot → flashd
//! markers → automatic reboot, the new slot boots on trial and confirms → the guest is
//! stopped → the install receipt (nx's last JSON line, also kept in `build/demo/receipt.json`)
//! and one benchmark line measured on this very flash (use `cargo xtask recovery` /
//! `just recovery` to keep a guest up).

use crate::util::{self, cargo, run_cmd};
use anyhow::Context;
use nx_contract::markers;
use nx_qemu::Runner;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Recreate state.img / disk.img and refetch the kernel first.
    #[arg(long)]
    pub fresh: bool,
}

/// What the flash stage measured.
struct Flashed {
    receipt: PathBuf,
    elapsed: Duration,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    util::stage(&format!(
        "1/4 host packages (apt: {})",
        crate::host_tools::packages().join(", ")
    ));
    util::ensure_host_tools()?;
    util::stage(
        "2/4 guest: kernel, static binaries, recovery ramdisk, normal initramfs, disks, demo image",
    );
    let out = crate::guest::build(&crate::guest::Args {
        fresh: args.fresh,
        ..Default::default()
    })?;
    let mut runner = boot_recovery(&out)?;
    let flashed = match out.v2_image.as_ref().or(out.demo_image.as_ref()) {
        Some(img) => Some(flash(&runner, img)?),
        None => {
            eprintln!("xtask: demo: flash stub/placeholder — nx image build did not produce build/nexus-os-v2.img");
            None
        }
    };
    let outcome = runner.stop();
    util::stage("done");
    eprintln!(
        "xtask: demo finished (guest {outcome}); console log: {}",
        runner.config().console_log().display()
    );
    if let Some(f) = flashed {
        receipt_and_bench(&f)?;
    }
    eprintln!(
        "xtask: `cargo xtask recovery` (or `just recovery`) does the same and leaves the guest up"
    );
    Ok(())
}

/// Fresh disks of its own under `build/demo/` (system_a seeded with the v1 demo image, so
/// the v2 flash goes to slot b), so the demo never changes `build/disk.img` / `build/state.img`
/// (which the marker profiles of `cargo xtask ci` boot), then the recovery boot.
fn boot_recovery(out: &crate::guest::Outputs) -> anyhow::Result<Runner> {
    util::stage("3/4 boot recovery (RECOVERY=1) on fresh disks in build/demo/");
    let dir = util::build_dir().join("demo");
    let mut cfg = crate::disks::fresh_device(&dir, out.demo_image.as_deref())?.apply_env();
    cfg.recovery = true;
    cfg.echo = true;
    let runner = Runner::start(cfg).context("could not start QEMU")?;
    let hit = runner
        .wait_for(markers::recovery::READY_PREFIX, Duration::from_secs(120))
        .with_context(|| {
            format!(
                "the recovery guest did not become ready (see {})",
                runner.config().console_log().display()
            )
        })?;
    eprintln!(
        "xtask: `{}` after {:.2} s",
        hit.line.trim(),
        hit.since_boot.as_secs_f64()
    );
    Ok(runner)
}

/// `nx flash send IMAGE --receipt build/demo/receipt.json` over the flash port, flashd's
/// markers, then the automatic reboot into the new slot (trial boot, confirm).
fn flash(runner: &Runner, image: &Path) -> anyhow::Result<Flashed> {
    util::stage(&format!("4/4 flash {} (nx flash send)", image.display()));
    let sock = runner
        .config()
        .port_socket(nx_contract::ports::FLASH.name)
        .context("the runner has no flash port")?
        .to_path_buf();
    run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
    let receipt = util::build_dir().join("demo/receipt.json");
    if let Some(dir) = receipt.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&receipt);
    let t = Instant::now();
    run_cmd(
        Command::new(util::host_bin("nx"))
            .args(["flash", "send"])
            .arg(image)
            .arg("--port")
            .arg(format!("unix:{}", sock.display()))
            .arg("--receipt")
            .arg(&receipt),
    )
    .context("flashing failed")?;
    let elapsed = t.elapsed();
    // After the receipt flashd activates the new slot (`flashd: slot=b active on trial …`).
    let activated = runner.wait_for(" active on trial (tries=", Duration::from_secs(30));
    util::stage("flashd markers (guest console)");
    for l in runner.grep("flashd:") {
        println!("  {l}");
    }
    if activated.is_ok_and(|hit| hit.line.contains("rebooting into it")) {
        util::stage("automatic reboot into the new slot (trial boot, confirm)");
        match runner.wait_for(markers::init::CONFIRMED_PREFIX, Duration::from_secs(120)) {
            Ok(hit) => {
                let _ = runner.wait_for(markers::init::ready().as_str(), Duration::from_secs(30));
                for l in runner
                    .grep("rebootd: ")
                    .into_iter()
                    .chain(runner.grep("[nx-qemu] boot "))
                    .chain(runner.grep("bootctl: "))
                    .chain(runner.grep(markers::init::BOOTED_PREFIX))
                    .chain(runner.grep(markers::init::CONFIRMED_PREFIX))
                {
                    println!("  {l}");
                }
                util::stage("what the user sees after the update");
                for l in runner.grep(markers::init::MOTD_PREFIX) {
                    println!("  {l}");
                }
                eprintln!(
                    "xtask: the reboot was the guest's own (rebootd, then the firmware and systemd-boot picked slot b's new entry); the runner only watched"
                );
                eprintln!(
                    "xtask: the guest rebooted into the new slot and confirmed it: `{}`",
                    hit.line.trim()
                );
            }
            Err(e) => eprintln!(
                "xtask: the new slot did not confirm ({e}); see {} (a slot whose rootfs does not mount rolls back after its trial tries)",
                runner.config().console_log().display()
            ),
        }
    }
    Ok(Flashed { receipt, elapsed })
}

/// The install receipt under its heading, and the benchmark line of this flash.
fn receipt_and_bench(f: &Flashed) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&f.receipt)
        .with_context(|| format!("read {}", f.receipt.display()))?;
    let r: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", f.receipt.display()))?;
    util::stage("install receipt (nx's last JSON line; flashd keeps the same record in /state/flash/last-install.json)");
    // The line exactly as nx wrote it (one object: a single --port).
    let line = text.trim();
    if line.contains('\n') {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{line}");
    }
    eprintln!("xtask: also in {}", f.receipt.display());

    util::stage("benchmark (measured on this flash)");
    let size = r["image_size"].as_u64().unwrap_or(0);
    let sum = |k: &str| -> u64 {
        r["segments"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x[k].as_u64()).sum())
            .unwrap_or(0)
    };
    let secs = f.elapsed.as_secs_f64().max(1e-6);
    println!(
        "flash: {} image ({} data sent, {} on the wire) in {:.2} s = {:.2} MB/s effective (nx wall clock, connect and verify included; state {})",
        human(size),
        human(sum("sent_bytes")),
        human(r["wire_bytes"].as_u64().unwrap_or(0)),
        secs,
        size as f64 / 1e6 / secs,
        r["state"].as_str().unwrap_or("?")
    );
    println!(
        "link speed (raw copy vs nx flash send, 256 MiB, in QEMU): run `cargo xtask bench` (writes docs/benchmarks.md); several guests: `cargo xtask bench fanout`"
    );
    Ok(())
}

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}
