//! Recording a path: a guest runs it with its disks attached over NBD to the recorder; the
//! log of every write and flush, the base images it started from, and marks (how many
//! operations were in the log when something was seen on the console or the host got an
//! answer).

use crate::crashsim::{Op, Recorder};
use crate::util::{self, cargo, run_cmd};
use anyhow::{bail, Context};
use nx_contract::markers::{self, init, recovery};
use nx_contract::ports;
use nx_qemu::{Config, Runner};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Disk numbers of the log.
pub const STATE: usize = 0;
pub const DISK: usize = 1;
/// The UEFI variable store (recorded for the paths whose decision lives in NVRAM).
pub const VARS: usize = 2;

/// Time for one step of a recording.
const STEP: Duration = Duration::from_secs(180);

/// What the recording of a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recovery → `nx flash send` of v2 → activation → trial boot of b → confirm.
    Install,
    /// Normal boot → `nx reset factory --yes` → recovery wipes → normal.
    ResetWipe,
    /// Normal boot → `nx flash reboot recovery` → recovery.
    BootRecord,
}

/// One recorded run.
pub struct Recording {
    pub ops: Vec<Op>,
    /// The images before the run, in disk order: state, disk[, vars].
    pub bases: Vec<PathBuf>,
    /// Whether the variable store is disk [`VARS`] (written through: NOR flash).
    pub vars: bool,
    /// Operations in the log when each mark was seen.
    pub marks: BTreeMap<&'static str, usize>,
}

impl Recording {
    pub fn mark(&self, name: &str) -> anyhow::Result<usize> {
        self.marks
            .get(name)
            .copied()
            .with_context(|| format!("the recording has no mark {name:?}"))
    }

    pub fn write_through(&self) -> Vec<bool> {
        (0..self.bases.len()).map(|d| d == VARS).collect()
    }
}

/// Marks the install recording takes: (name, console text, occurrence).
pub const MARK_VERIFY_OK: &str = "verify-ok";
pub const MARK_ACTIVATED_BOOT: &str = "next-boot-start";
/// `init: confirmed slot=b`: the update was reported confirmed.
pub const MARK_CONFIRMED: &str = "confirmed";
/// The host got the answer that the request is durable (`nx` returned).
pub const MARK_ACKED: &str = "acked";
/// The request was sent (the window of the reset and boot-record paths starts here).
pub const MARK_REQUEST: &str = "request";
/// The firmware of the boot after the request started.
pub const MARK_REBOOTED: &str = "rebooted";
pub const MARK_END: &str = "end";

/// The runner configuration for the disks `state`/`disk`, the variable store `vars` and the
/// run directory `run`.
pub fn config(
    run: &Path,
    state: &Path,
    disk: &Path,
    vars: &Path,
    echo: bool,
) -> anyhow::Result<Config> {
    let build = util::build_dir();
    let mut cfg = Config::new(&build);
    cfg.qemu = util::tool("qemu-system-x86_64")?;
    cfg.state_img = Some(state.to_path_buf());
    cfg.disk_img = Some(disk.to_path_buf());
    cfg.run_dir = run.to_path_buf();
    cfg.uefi = Some(nx_qemu::Uefi::ovmf(vars.to_path_buf()));
    for p in &mut cfg.ports {
        p.socket = run.join(p.socket.file_name().unwrap_or_default());
    }
    cfg.echo = echo;
    Ok(cfg)
}

pub fn sparse_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let st = Command::new(util::tool("cp")?)
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .context("cp")?;
    anyhow::ensure!(
        st.success(),
        "cp {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

/// The base images of every path: state.img with the reset scenarios' seed (user data and
/// the trust store), disk.img with slot a = the v1 demo image and the factory ESP, and a
/// fresh variable store.
pub fn bases(dir: &Path, demo: &Path) -> anyhow::Result<[PathBuf; 3]> {
    let (state, disk, vars) = (
        dir.join("state.base.img"),
        dir.join("disk.base.img"),
        dir.join("vars.base.fd"),
    );
    let tree = tempfile::tempdir()?;
    crate::e2e::write_seeded_state(tree.path())?;
    crate::disks::mkfs_state(&state, tree.path())?;
    crate::disks::ensure_disk(&disk, true, Some(demo))?;
    std::fs::copy(nx_qemu::OVMF_VARS, &vars)
        .with_context(|| format!("copy {} to {}", nx_qemu::OVMF_VARS, vars.display()))?;
    Ok([state, disk, vars])
}

/// Watches the console for texts (the `n`th occurrence) and notes the log length when each
/// first shows.
struct Watch<'a> {
    marks: Mutex<BTreeMap<&'static str, usize>>,
    rec: &'a Recorder,
}

impl Watch<'_> {
    fn set(&self, name: &'static str) {
        let n = self.rec.len();
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_insert(n);
    }
}

/// Record `kind` from the bases in `dir`.
pub fn record(
    kind: Kind,
    dir: &Path,
    bases: &[PathBuf; 3],
    v2: &Path,
    echo: bool,
) -> anyhow::Result<Recording> {
    let vars = kind != Kind::Install;
    let n = if vars { 3 } else { 2 };
    let works: Vec<PathBuf> = ["state.rec.img", "disk.rec.img", "vars.rec.fd"]
        .iter()
        .take(n)
        .map(|f| dir.join(f))
        .collect();
    for (b, w) in bases.iter().zip(&works) {
        sparse_copy(b, w)?;
    }
    let run_dir = dir.join("qemu");
    std::fs::create_dir_all(&run_dir)?;
    let socks: Vec<PathBuf> = ["state.nbd", "disk.nbd", "vars.nbd"]
        .iter()
        .take(n)
        .map(|f| run_dir.join(f))
        .collect();
    let pairs: Vec<(&Path, &Path)> = works
        .iter()
        .zip(&socks)
        .map(|(w, s)| (w.as_path(), s.as_path()))
        .collect();
    let rec = Recorder::start(&pairs)?;
    // Install: the variable store is a fresh file (not recorded; the runner sets the one-shot
    // to recovery in it). The others: the recorded working copy.
    let plain_vars = run_dir.join("ovmf-vars.fd");
    let _ = std::fs::remove_file(&plain_vars);
    let vars_file = if vars {
        works[VARS].clone()
    } else {
        plain_vars
    };
    let mut cfg = config(&run_dir, &works[STATE], &works[DISK], &vars_file, echo)?;
    cfg.nbd = ["state", "disk", "vars"]
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, d)| {
            let s = rec.socket(i).context("recorder socket")?;
            Ok((d.to_string(), s.to_path_buf()))
        })
        .collect::<anyhow::Result<_>>()?;
    cfg.recovery = kind == Kind::Install;
    run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
    let mut runner = Runner::start(cfg)?;
    let watch = Watch {
        marks: Mutex::new(BTreeMap::new()),
        rec: &rec,
    };
    let done = AtomicBool::new(false);
    // (mark, console text, occurrence)
    let watched: Vec<(&'static str, String, usize)> = match kind {
        Kind::Install => vec![
            (MARK_VERIFY_OK, markers::flashd::verify_ok().to_string(), 1),
            (
                MARK_ACTIVATED_BOOT,
                nx_qemu::FIRMWARE_BOOT_LINE.to_string(),
                2,
            ),
            (MARK_CONFIRMED, init::confirmed('b').to_string(), 1),
        ],
        Kind::ResetWipe | Kind::BootRecord => {
            vec![(MARK_REBOOTED, nx_qemu::FIRMWARE_BOOT_LINE.to_string(), 2)]
        }
    };
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                for (name, text, nth) in &watched {
                    if runner.grep(text).len() >= *nth {
                        watch.set(name);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = drive(kind, &runner, &watch, v2);
        done.store(true, Ordering::Relaxed);
        r
    });
    watch.set(MARK_END);
    runner.stop();
    let console = runner.config().console_log();
    let _ = std::fs::copy(&console, dir.join("record.console.txt"));
    result?;
    if let Some(e) = rec.error() {
        bail!("the NBD recorder failed: {e}");
    }
    let marks = watch.marks.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(Recording {
        ops: rec.ops(),
        bases: bases.iter().take(n).cloned().collect(),
        vars,
        marks,
    })
}

fn step(runner: &Runner, m: &str) -> anyhow::Result<()> {
    runner.wait_for(m, STEP).map(|_| ()).map_err(|e| {
        anyhow::anyhow!(
            "{m:?} not seen while recording: {e}\nconsole tail:\n{}",
            runner.tail(40).join("\n")
        )
    })
}

fn port(runner: &Runner, name: &str) -> anyhow::Result<String> {
    let s = runner
        .config()
        .port_socket(name)
        .with_context(|| format!("no port {name}"))?;
    Ok(format!("unix:{}", s.display()))
}

fn nx(runner: &Runner, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(util::host_bin("nx"))
        .args(args)
        .output()
        .context("could not run nx")?;
    if !out.status.success() {
        bail!(
            "nx {} failed ({}): {}\nconsole tail:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            runner.tail(40).join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn drive(kind: Kind, runner: &Runner, watch: &Watch<'_>, v2: &Path) -> anyhow::Result<()> {
    match kind {
        Kind::Install => {
            step(runner, recovery::ready("/dev/vport0p1").as_str())?;
            let flash = port(runner, ports::FLASH.name)?;
            let v2 = v2.to_string_lossy();
            nx(runner, &["flash", "send", "--json", "--port", &flash, &v2])?;
            watch.set(MARK_ACKED);
            step(runner, "bootctl: setActive slot=b trial=true tries=3")?;
            step(runner, init::confirmed('b').as_str())?;
            step(runner, init::ready().as_str())?;
        }
        Kind::ResetWipe => {
            step(runner, init::booted('a', 1, false).as_str())?;
            step(runner, init::ready().as_str())?;
            let reboot = port(runner, ports::REBOOT.name)?;
            watch.set(MARK_REQUEST);
            let out = nx(
                runner,
                &["reset", "factory", "--yes", "--json", "--port", &reboot],
            )?;
            watch.set(MARK_ACKED);
            anyhow::ensure!(
                out.contains("\"requested\": true") || out.contains("\"requested\":true"),
                "nx reset factory --yes did not record the request: {out}"
            );
            step(runner, markers::reset::wipe_start().as_str())?;
            step(runner, markers::reset::wipe_done().as_str())?;
            step(runner, init::booted('a', 1, false).as_str())?;
            step(runner, init::ready().as_str())?;
        }
        Kind::BootRecord => {
            step(runner, init::booted('a', 1, false).as_str())?;
            step(runner, init::ready().as_str())?;
            let reboot = port(runner, ports::REBOOT.name)?;
            watch.set(MARK_REQUEST);
            nx(runner, &["flash", "reboot", "recovery", "--port", &reboot])?;
            watch.set(MARK_ACKED);
            step(runner, recovery::ready("/dev/vport0p1").as_str())?;
        }
    }
    Ok(())
}
