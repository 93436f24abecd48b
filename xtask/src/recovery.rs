//! `cargo xtask recovery` (`just recovery`): boot the recovery ramdisk (`RECOVERY=1`), wait for
//! `recovery: ready`, flash `build/nexus-os.img` with `nx flash send` over the virtio-serial
//! port, print flashd's markers, follow the automatic reboot into the freshly installed slot
//! (flashd installs into the inactive slot, activates it on trial and reboots; the normal init
//! boots it) and leave the guest up (the console is attached to this terminal when there is
//! one: Ctrl-A x quits QEMU; `poweroff` in recovery-sh powers off).

use crate::util;
use anyhow::{bail, Context};
use nx_contract::markers;
use nx_qemu::{Config, Runner};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `cargo xtask recovery`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Do not run `cargo xtask guest` first.
    #[arg(long)]
    pub no_build: bool,
    /// Image to flash (default: build/nexus-os.img).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Only boot recovery; do not flash.
    #[arg(long)]
    pub no_flash: bool,
    /// Stop the guest after flashing instead of leaving it up.
    #[arg(long)]
    pub exit: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let demo_image = if args.no_build {
        let p = util::build_dir().join("nexus-os.img");
        p.exists().then_some(p)
    } else {
        crate::guest::build(&crate::guest::Args::default())?.demo_image
    };
    let image = args.image.clone().or(demo_image);
    let interactive = !args.exit && stdin_is_tty();
    let mut runner = boot_recovery(interactive)?;
    if !args.no_flash {
        match &image {
            Some(img) => flash(&runner, img)?,
            None => eprintln!("xtask: flash: stub/placeholder — no image to flash (nx image build did not produce build/nexus-os.img)"),
        }
    }
    if args.exit {
        runner.stop();
        return Ok(());
    }
    util::stage("guest is up");
    eprintln!(
        "xtask: recovery guest left running; console log: {}",
        runner.config().console_log().display()
    );
    if interactive {
        eprintln!("xtask: the console is this terminal: type `help` in recovery-sh; `poweroff` or Ctrl-A x ends the run");
    } else {
        eprintln!(
            "xtask: no terminal: the guest runs until it powers off or this process is stopped"
        );
    }
    let outcome = loop {
        if let Some(o) = runner.wait_finished(Duration::from_secs(3600)) {
            break o;
        }
    };
    eprintln!("xtask: guest run ended: {outcome}");
    Ok(())
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty has no preconditions.
    unsafe { libc::isatty(0) == 1 }
}

/// Boot the recovery ramdisk and wait for `recovery: ready`.
pub fn boot_recovery(interactive: bool) -> anyhow::Result<Runner> {
    util::stage("3/4 boot recovery (RECOVERY=1)");
    let mut cfg = Config::new(&util::build_dir()).apply_env();
    cfg.qemu = util::tool("qemu-system-x86_64")?;
    cfg.recovery = true;
    cfg.echo = true;
    cfg.interactive = interactive;
    let runner = Runner::start(cfg).context("could not start QEMU")?;
    let hit = runner
        .wait_for(markers::recovery::READY_PREFIX, Duration::from_secs(120))
        .context("the recovery guest did not become ready (see build/qemu/console.log)")?;
    eprintln!(
        "xtask: `{}` after {:.2} s",
        hit.line.trim(),
        hit.since_boot.as_secs_f64()
    );
    Ok(runner)
}

/// `nx flash send IMAGE` over the flash port, then print flashd's console markers.
pub fn flash(runner: &Runner, image: &std::path::Path) -> anyhow::Result<()> {
    util::stage(&format!("4/4 flash {} (nx flash send)", image.display()));
    let sock = runner
        .config()
        .port_socket(nx_contract::ports::FLASH.name)
        .context("the runner has no flash port")?
        .to_path_buf();
    let mut cmd = util::cargo();
    cmd.args([
        "run", "-q", "-p", "nx-cli", "--bin", "nx", "--", "flash", "send",
    ])
    .arg(image)
    .arg("--port")
    .arg(format!("unix:{}", sock.display()));
    let result = util::run_cmd(&mut cmd);
    // After the receipt flashd activates the new slot (`flashd: slot=b active on trial …`).
    let activated = runner.wait_for("flashd: slot=", Duration::from_secs(15));
    util::stage("flashd markers (guest console)");
    for l in runner.grep("flashd:") {
        println!("  {l}");
    }
    if let Ok(hit) = activated {
        if hit.line.contains("rebooting into it") {
            follow_reboot(runner);
        }
    }
    if let Err(e) = result {
        if !nx_has_flash_send()? {
            eprintln!("xtask: flash: stub/placeholder — `nx flash send` is not available yet");
            return Ok(());
        }
        bail!("flashing failed: {e:#}");
    }
    Ok(())
}

/// The automatic reboot after an install: the normal init boots the new slot on trial.
fn follow_reboot(runner: &Runner) {
    util::stage("automatic reboot into the new slot (trial boot)");
    match runner.wait_for(markers::init::BOOTED_PREFIX, Duration::from_secs(120)) {
        Ok(hit) => {
            let _ = runner.wait_for(markers::init::ready().as_str(), Duration::from_secs(30));
            for l in runner
                .grep("bootctl: ")
                .into_iter()
                .chain(runner.grep(markers::init::BOOTED_PREFIX))
                .chain(runner.grep(markers::init::CONFIRMED_PREFIX))
            {
                println!("  {l}");
            }
            eprintln!(
                "xtask: the guest rebooted into the new slot: `{}`",
                hit.line.trim()
            );
        }
        Err(e) => eprintln!(
            "xtask: the new slot did not report `init: booted` ({e}); see {} (a slot whose rootfs does not mount rolls back after its trial tries)",
            runner.config().console_log().display()
        ),
    }
}

fn nx_has_flash_send() -> anyhow::Result<bool> {
    let out = util::cargo()
        .args([
            "run", "-q", "-p", "nx-cli", "--bin", "nx", "--", "flash", "send", "--help",
        ])
        .current_dir(util::root())
        .output()?;
    Ok(out.status.success())
}
