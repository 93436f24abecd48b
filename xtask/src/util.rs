//! Small helpers shared by the recipes: running commands, host tools (apt), paths.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The host target dir of this build: `$CARGO_TARGET_DIR` when set, else `target/` of the
/// workspace.
fn host_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_relative() { root().join(t) } else { t })
        .unwrap_or_else(|| root().join("target"))
}

/// A host binary of this workspace built by `cargo build -p …` (debug profile): under
/// `$CARGO_TARGET_DIR` when set, else `target/` of the workspace.
pub fn host_bin(name: &str) -> PathBuf {
    host_target_dir().join("debug").join(name)
}

/// Where `cargo build --release -p …` puts host binaries: `$CARGO_TARGET_DIR/release` when
/// set, else `target/release`.
pub fn host_release_dir() -> PathBuf {
    host_target_dir().join("release")
}

/// `build/` under the workspace root (ignored by git).
pub fn build_dir() -> PathBuf {
    root().join("build")
}

/// Run a command in the workspace root (unless the command has its own directory), echoing
/// it; fail with its exit status.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {}", describe(cmd));
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Run a command quietly and return its stdout; on failure the error carries its stderr.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` as invoked by this xtask (respects `$CARGO`).
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub use crate::host_tools::{Tool, HOST_FILES, HOST_TOOLS};

/// Find an executable in `$PATH` plus the sbin directories (a non-root `$PATH` often lacks them).
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter()
        .map(|d| d.join(bin))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// [`which`] or a clear error naming the package.
pub fn tool(bin: &str) -> anyhow::Result<PathBuf> {
    which(bin).with_context(|| {
        let pkg = crate::host_tools::package_of(bin).unwrap_or(bin);
        format!("`{bin}` not found; install it with `apt-get install -y {pkg}` (every `cargo xtask` recipe does this when run as root)")
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update`, at most once per xtask run.
pub fn apt_update() -> anyhow::Result<()> {
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    if !is_root() {
        bail!("the apt package lists need refreshing; run `sudo apt-get update` and retry");
    }
    eprintln!("xtask: refreshing apt package lists (apt-get update)");
    run_cmd(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Install the Debian packages of every missing tool in `tools` (root only; otherwise say
/// exactly what to run).
pub fn ensure_tools(tools: &[Tool]) -> anyhow::Result<()> {
    let absent: Vec<&Tool> = tools.iter().filter(|t| !present(t)).collect();
    let mut missing: Vec<&str> = absent.iter().map(|t| t.package).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let bins = absent
        .iter()
        .map(|t| format!("{}: {}", t.bin, t.used_by))
        .collect::<Vec<_>>()
        .join("; ");
    if !is_root() {
        bail!("missing host programs ({bins}); install their packages with `sudo apt-get install -y --no-install-recommends {list}`");
    }
    eprintln!("xtask: installing missing host packages: {list} (for {bins})");
    let install = || {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        apt_update()?;
        install().with_context(|| format!("apt-get install {list} failed"))?;
    }
    let still: Vec<&str> = absent
        .iter()
        .filter(|t| !present(t))
        .map(|t| t.bin)
        .collect();
    if !still.is_empty() {
        bail!(
            "installed {list} but still cannot find {}; check the host-tools table (xtask/src/host_tools.rs)",
            still.join(", ")
        );
    }
    eprintln!("xtask: installed host packages: {list}");
    Ok(())
}

/// A program on `$PATH` (or the sbin directories), or a file given by its absolute path.
fn present(t: &Tool) -> bool {
    if t.bin.starts_with('/') {
        Path::new(t.bin).is_file()
    } else {
        which(t.bin).is_some()
    }
}

/// Every host program and file the recipes need ([`HOST_TOOLS`] and [`HOST_FILES`]).
pub fn ensure_host_tools() -> anyhow::Result<()> {
    let all: Vec<Tool> = HOST_TOOLS.iter().chain(HOST_FILES).copied().collect();
    ensure_tools(&all)
}

/// Write `bytes` to `path` only when the content differs (keeps mtimes stable for caching).
/// Returns true when the file was (re)written.
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
    if std::fs::read(path).map(|old| old == bytes).unwrap_or(false) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(true)
}

/// A stage heading for long recipes (demo, ci).
pub fn stage(title: &str) {
    eprintln!("\n==== {title} ====");
}

/// `apt-get download <package>` into the empty directory `dl` and unpack it with `dpkg -x` into
/// `root` (replaced); nothing is installed system-wide and no maintainer scripts run. Stale
/// package lists (the mirror dropped that version) are refreshed once. Returns the .deb path.
pub fn download_deb(package: &str, dl: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    tool("dpkg-deb")?;
    for dir in [dl, root] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dl).with_context(|| format!("create {}", dl.display()))?;
    eprintln!("xtask: apt-get download {package}");
    let download = || {
        run_cmd(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(dl),
        )
    };
    if let Err(e) = download() {
        eprintln!("xtask: {package} could not be downloaded ({e:#}); refreshing the lists once");
        apt_update()?;
        download().with_context(|| format!("apt-get download {package}"))?;
    }
    let deb = std::fs::read_dir(dl)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                dl.display()
            )
        })?;
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(root))?;
    Ok(deb)
}
