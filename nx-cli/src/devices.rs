//! `nx devices`: the guests this checkout runs.
//!
//! ```text
//! nx devices [--json] [--all] [--timeout SECS]
//! ```
//! A guest is a QEMU run directory holding at least one of the standard sockets
//! (`flash.sock`, `reboot.sock`, `bootctl.sock`, nx_contract::ports): `build/qemu/` (the
//! `cargo xtask recovery` / `demo` guest), the per-scenario `build/e2e/<name>/…/qemu/`, and the
//! directory NX_DEVICE / nx.toml names — all under the project root ([`crate::target`]).
//! Each is probed like `nx status` (short timeout, concurrently): what answers, device name,
//! running mode, active slot, version. Directories where nothing answers (a stale socket of a
//! QEMU that is gone) are listed only with `--all`.

use crate::status::{self, Status};
use crate::target::{self, Daemon};
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How deep under `build/` run directories are looked for.
const MAX_DEPTH: usize = 4;
/// At most this many run directories are probed.
const MAX_DIRS: usize = 64;

/// Arguments of `nx devices`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Use one: `nx status --device DIR`, `NX_DEVICE=DIR nx …`, or `device = \"DIR\"` in nx.toml.

Exit codes: 0 (also when no guest runs: the list is empty); 1 error.")]
pub struct DevicesArgs {
    /// Print a JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also list run directories where nothing answers (stale sockets).
    #[arg(long)]
    pub all: bool,
    /// Seconds to wait for each daemon's answer.
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    pub timeout: u64,
}

/// One guest.
#[derive(Debug, Serialize)]
pub struct Device {
    /// Its run directory.
    pub dir: PathBuf,
    /// Whether it is the target verbs use without `--port`.
    pub default: bool,
    /// Which daemons answered.
    pub answering: Vec<&'static str>,
    /// Version of the slot it runs (or flashd's installed image).
    pub version: Option<String>,
    /// Everything probed.
    pub status: Status,
}

/// Run directories under `root` (see the module doc), sorted, plus `extra` if it has sockets.
pub fn run_dirs(root: &Path, extra: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&root.join("build"), 0, &mut out);
    if let Some(e) = extra {
        if has_socket(e) && !out.iter().any(|d| d == e) {
            out.push(e.to_path_buf());
        }
    }
    out.sort();
    out.truncate(MAX_DIRS);
    out
}

fn has_socket(dir: &Path) -> bool {
    [Daemon::Flashd, Daemon::Rebootd, Daemon::Bootctld]
        .iter()
        .any(|d| is_socket(&dir.join(d.port().socket)))
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_DEPTH || out.len() >= MAX_DIRS {
        return;
    }
    if has_socket(dir) {
        out.push(dir.to_path_buf());
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        // Directories only, never through symlinks.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&e.path(), depth + 1, out);
        }
    }
}

/// The run directory the default flashd / rebootd port lives in.
fn default_dir() -> Option<PathBuf> {
    [Daemon::Flashd, Daemon::Rebootd]
        .iter()
        .find_map(|d| target::default_port(*d).strip_prefix("unix:"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// Probe every run directory.
pub async fn list(dirs: &[PathBuf], timeout: Duration) -> Vec<Device> {
    let default = default_dir();
    // One directory after the other (each one's three daemons concurrently): a stale socket
    // fails at once, so only a hung daemon costs its timeout.
    let mut found = Vec::new();
    for dir in dirs {
        let [f, b, r] = status::ports_in(dir);
        found.push((dir, status::probe(&f, &b, &r, timeout).await));
    }
    found
        .into_iter()
        .map(|(dir, st)| {
            let mut answering = Vec::new();
            if st.flashd.answer.is_some() {
                answering.push("flashd");
            }
            if st.rebootd.answer.is_some() {
                answering.push("rebootd");
            }
            if st.bootctld.answer.is_some() {
                answering.push("bootctld");
            }
            Device {
                default: default.as_deref() == Some(dir.as_path()),
                dir: dir.clone(),
                answering,
                version: st.version(),
                status: st,
            }
        })
        .collect()
}

/// `nx devices`.
pub fn run(args: DevicesArgs) -> anyhow::Result<ExitCode> {
    let inputs = target::inputs();
    let root = match &inputs.root {
        Some(r) => r.clone(),
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let dirs = run_dirs(&root, default_dir().as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut devices = rt.block_on(list(&dirs, timeout));
    if !args.all {
        devices.retain(|d| !d.answering.is_empty());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
    } else {
        print!("{}", render(&devices, &root));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human table of `nx devices`.
pub fn render(devices: &[Device], root: &Path) -> String {
    let mut out = String::new();
    if devices.is_empty() {
        let _ = writeln!(
            out,
            "no guest answers under {}: start one with `cargo xtask recovery --no-flash`",
            root.join("build").display()
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<2}{:<28} {:<10} {:<8} {:<7} {:<8} answering",
        "", "run dir", "device", "mode", "active", "version"
    );
    for d in devices {
        let dir = d
            .dir
            .strip_prefix(root)
            .unwrap_or(&d.dir)
            .display()
            .to_string();
        let _ = writeln!(
            out,
            "{:<2}{:<28} {:<10} {:<8} {:<7} {:<8} {}",
            if d.default { "*" } else { "" },
            dir,
            d.status.device.as_deref().unwrap_or("-"),
            d.status.mode,
            d.status.bootctld.answer.as_ref().map_or("-", |b| b.active),
            d.version.as_deref().unwrap_or("-"),
            if d.answering.is_empty() {
                "nothing (stale sockets)".to_string()
            } else {
                d.answering.join(",")
            }
        );
    }
    let _ = writeln!(out, "(* = the target verbs use without --port)");
    out
}
