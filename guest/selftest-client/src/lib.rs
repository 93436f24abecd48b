//! # selftest-client — the in-guest selftest
//!
//! Started by PID 1 (recovery-init with `--mode recovery`, init with `--mode normal`) when
//! `nexus.selftest=1` is on the kernel command line. Runs the checks below in this order and
//! prints each `SELFTEST: … ok` marker **only after** the thing it names was really checked;
//! a failed check prints `SELFTEST: <name> FAILED: <why>`.
//!
//! | marker | what was checked |
//! |--------|------------------|
//! | `SELFTEST: recovery boot ok` | recovery only: PID 1 is our `/init`, the recovery ramdisk's shell is there, rebootd (`pending()`) and bootctld (`state()`) answered on their guest-local sockets |
//! | `SELFTEST: recovery diag ok` | nx-diag wrote `/state/recovery/diag-<n>.tar.zst`, and the file reads back as a valid tar.zst (zstd checksum, every expected member, the manifest) of the size it reported |
//! | `SELFTEST: reset dry-run ok` | rebootd's `resetPlan()` lists exactly apps/content/settings as wiped and trust (path by path) as preserved, equals the plan of the tree as it is, and apps/content/settings/trust are unchanged afterwards (every path's size, mode, inode, mtime, ctime and content hash) |
//! | `SELFTEST: flash receive ok` | recovery only: flashd runs and holds the flash port (`com.nexus.flash`, found by name) open, and its state dir `/state/flash` is a writable directory on the mounted state disk. Otherwise `SELFTEST: flash receive stub/placeholder` (normal boots run no flashd; without a state disk flashd refuses) |
//! | `SELFTEST: flash reboot flag ok` | via rebootd: `setNext(recovery)` and `setNext(normal)` each read back through `pending()` and as the exact bytes of `/state/boot/next_mode`; then the original record (or its absence: `clearNext()`) is restored and read back |
//! | `SELFTEST: bootctl api ok` | bootctld's `state()` returns a slot table that passes the state machine's invariants, and `exportJson()` parses and names the same active slot |
//!
//! The checks are plain functions over a [`Ctx`] so they are tested against in-process
//! daemons on a temp dir.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use nx_contract::markers::selftest as m;
use nx_contract::Marker;
use nx_diag::env::GuestEnv;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which boot this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The recovery ramdisk (recovery-init).
    Recovery,
    /// The normal initramfs (init).
    Normal,
}

/// Where everything is: the [`GuestEnv`] shared with nx-recovery (its fields read through
/// `Ctx`), plus what only the selftest needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub mode: Mode,
    /// The state dir, the daemons' sockets, the diag inputs, `/proc`, the ports, `/dev`.
    pub env: GuestEnv,
    /// `/proc/1/cmdline`.
    pub pid1_cmdline: PathBuf,
    /// A file only the recovery ramdisk has (`/bin/recovery-sh`).
    pub recovery_marker: PathBuf,
    /// How long to wait for a daemon's socket to accept connections (they start with us).
    pub wait: Duration,
}

impl std::ops::Deref for Ctx {
    type Target = GuestEnv;
    fn deref(&self) -> &GuestEnv {
        &self.env
    }
}

impl std::ops::DerefMut for Ctx {
    fn deref_mut(&mut self) -> &mut GuestEnv {
        &mut self.env
    }
}

impl Ctx {
    /// The guest's paths for `mode` (an RPC may take 15 s).
    pub fn guest(mode: Mode) -> Self {
        let mut env = GuestEnv::guest();
        env.timeout = Duration::from_secs(15);
        Ctx {
            mode,
            env,
            pid1_cmdline: PathBuf::from("/proc/1/cmdline"),
            recovery_marker: PathBuf::from("/bin/recovery-sh"),
            wait: Duration::from_secs(30),
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Checked and fine.
    Ok,
    /// Not applicable in this boot (why).
    Skipped(String),
    /// The thing cannot work here; the explicit stub marker is printed (why).
    Stub(String),
    /// Checked and wrong (why).
    Failed(String),
}

/// A check: it may print console lines (e.g. nx-diag's markers) through the callback.
pub type CheckFn = fn(&Ctx, &mut dyn FnMut(&Marker)) -> Outcome;

/// The checks, in marker order: (name in the marker, function); the names are the contract's
/// [`m::CHECKS`].
pub const CHECKS: [(&str, CheckFn); 6] = [
    (m::CHECKS[0], check_recovery_boot),
    (m::CHECKS[1], check_recovery_diag),
    (m::CHECKS[2], check_reset_dry_run),
    (m::CHECKS[3], check_flash_receive),
    (m::CHECKS[4], check_flash_reboot_flag),
    (m::CHECKS[5], check_bootctl_api),
];

/// The console lines for an outcome: the marker first, a detail line after it.
pub fn marker_lines(name: &str, outcome: &Outcome) -> Vec<Marker> {
    match outcome {
        Outcome::Ok => vec![m::ok(name)],
        Outcome::Skipped(why) => vec![m::skipped(name, why)],
        Outcome::Stub(why) => vec![m::stub(name), m::detail(name, why)],
        Outcome::Failed(why) => vec![m::failed(name, why)],
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: u32,
    pub skipped: u32,
    pub stub: u32,
    pub failed: u32,
}

/// Run every check in order, printing through `emit`.
pub fn run_all(ctx: &Ctx, emit: &mut dyn FnMut(&Marker)) -> Summary {
    let mut s = Summary::default();
    for (name, check) in CHECKS {
        let outcome = check(ctx, emit);
        for l in marker_lines(name, &outcome) {
            emit(&l);
        }
        match outcome {
            Outcome::Ok => s.ok += 1,
            Outcome::Skipped(_) => s.skipped += 1,
            Outcome::Stub(_) => s.stub += 1,
            Outcome::Failed(_) => s.failed += 1,
        }
    }
    emit(&m::done(s.ok, s.stub, s.skipped, s.failed));
    s
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(f))
        .map_err(|e| format!("no tokio runtime: {e}"))
}

/// Wait until `sock` accepts a connection (bounded by `ctx.wait`).
pub fn wait_for_socket(sock: &Path, wait: Duration) -> Result<(), String> {
    nx_guest::unixsock::wait_accepting(sock, wait, Duration::from_millis(100))
        .map_err(|e| e.to_string())
}

use nx_guest::bounded::read_prefix as read_small;

/// `SELFTEST: recovery boot ok`.
pub fn check_recovery_boot(ctx: &Ctx, _emit: &mut dyn FnMut(&Marker)) -> Outcome {
    if ctx.mode != Mode::Recovery {
        return Outcome::Skipped("normal boot".into());
    }
    let argv0 = read_small(&ctx.pid1_cmdline, 4096)
        .map(|b| b.split(|&c| c == 0).next().unwrap_or_default().to_vec())
        .unwrap_or_default();
    if argv0 != b"/init" {
        return Outcome::Failed(format!(
            "PID 1 is {:?}, not the ramdisk's /init",
            String::from_utf8_lossy(&argv0)
        ));
    }
    if !ctx.recovery_marker.exists() {
        return Outcome::Failed(format!(
            "{} is missing: this is not the recovery ramdisk",
            ctx.recovery_marker.display()
        ));
    }
    if let Err(e) = wait_for_socket(&ctx.rebootd, ctx.wait) {
        return Outcome::Failed(format!("rebootd: {e}"));
    }
    match block_on(nx_rpc::reboot::request_pending(&ctx.rebootd, ctx.timeout)) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Outcome::Failed(format!("rebootd pending(): {e}")),
        Err(e) => return Outcome::Failed(e),
    }
    if let Err(e) = wait_for_socket(&ctx.bootctld, ctx.wait) {
        return Outcome::Failed(format!("bootctld: {e}"));
    }
    match block_on(bootctld::client::state(&ctx.bootctld)) {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(e)) => Outcome::Failed(format!("bootctld state(): {e}")),
        Err(e) => Outcome::Failed(e),
    }
}

/// `SELFTEST: recovery diag ok`.
pub fn check_recovery_diag(ctx: &Ctx, emit: &mut dyn FnMut(&Marker)) -> Outcome {
    // bootctld's view makes the bundle complete; not having it is not a diag failure.
    let view = match wait_for_socket(&ctx.bootctld, ctx.wait) {
        Ok(()) => block_on(nx_rpc::bootctl::fetch_view(
            &ctx.bootctld,
            Duration::from_secs(3),
        ))
        .unwrap_or_else(nx_rpc::bootctl::View::Unavailable),
        Err(e) => nx_rpc::bootctl::View::Unavailable(e),
    };
    let cfg = nx_diag::Config {
        state_root: ctx.state_root.clone(),
        require_mountpoint: ctx.require_mountpoint,
        kmsg_sources: ctx.kmsg_sources.clone(),
        console_log: ctx.console_log.clone(),
    };
    let written = match nx_diag::run(&cfg, &view, emit) {
        Ok(nx_diag::Outcome::Written(w)) => w,
        Ok(nx_diag::Outcome::NotAvailable(why)) => {
            return Outcome::Failed(format!("no bundle written: {why}"))
        }
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let bytes = match std::fs::read(&written.path) {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Failed(format!("cannot read {} back: {e}", written.path.display()))
        }
    };
    if bytes.len() as u64 != written.bytes {
        return Outcome::Failed(format!(
            "{} holds {} bytes, nx-diag reported {}",
            written.path.display(),
            bytes.len(),
            written.bytes
        ));
    }
    let members = match nx_diag::bundle::decode(&bytes) {
        Ok(m) => m,
        Err(e) => {
            return Outcome::Failed(format!(
                "{} does not read back: {e}",
                written.path.display()
            ))
        }
    };
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    if names != nx_diag::collect::MEMBERS {
        return Outcome::Failed(format!("unexpected members {names:?}"));
    }
    let manifest_ok = members
        .iter()
        .find(|m| m.name == "MANIFEST.txt")
        .is_some_and(|m| m.data.starts_with(b"nx-diag bundle format 1\n"));
    if !manifest_ok {
        return Outcome::Failed("MANIFEST.txt is not an nx-diag manifest".into());
    }
    Outcome::Ok
}

/// Every path below the trees a reset concerns (`apps content settings trust`), never
/// following symlinks: size, mode, inode, mtime, ctime, and a hash of the content of regular
/// files up to 1 MiB each (64 MiB in all; bigger files count by metadata only).
pub fn fingerprint(state_root: &Path) -> Result<BTreeMap<PathBuf, [i64; 8]>, String> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = ["apps", "content", "settings", "trust"]
        .iter()
        .map(|t| state_root.join(t))
        .collect();
    let mut budget = 1_000_000usize;
    let mut hash_budget: u64 = 64 << 20;
    while let Some(p) = stack.pop() {
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("stat {}: {e}", p.display())),
        };
        budget = budget.checked_sub(1).ok_or("more than 1000000 paths")?;
        let as_i64 = |v: u64| i64::from_ne_bytes(v.to_ne_bytes());
        let mut content = 0i64;
        if m.is_file() && m.size() <= 1 << 20 && hash_budget >= m.size() {
            hash_budget -= m.size();
            let mut buf = Vec::new();
            std::fs::File::open(&p)
                .and_then(|f| f.take(1 << 20).read_to_end(&mut buf))
                .map_err(|e| format!("read {}: {e}", p.display()))?;
            let mut h = std::hash::DefaultHasher::new();
            h.write(&buf);
            content = as_i64(h.finish());
        }
        out.insert(
            p.clone(),
            [
                as_i64(m.size()),
                i64::from(m.mode()),
                as_i64(m.ino()),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                content,
            ],
        );
        if m.is_dir() {
            let rd = std::fs::read_dir(&p).map_err(|e| format!("list {}: {e}", p.display()))?;
            for e in rd {
                stack.push(e.map_err(|e| format!("list {}: {e}", p.display()))?.path());
            }
        }
    }
    Ok(out)
}

/// `SELFTEST: reset dry-run ok`.
pub fn check_reset_dry_run(ctx: &Ctx, _emit: &mut dyn FnMut(&Marker)) -> Outcome {
    let before = match fingerprint(&ctx.state_root) {
        Ok(f) => f,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = wait_for_socket(&ctx.rebootd, ctx.wait) {
        return Outcome::Failed(format!("rebootd: {e}"));
    }
    let (json, device) = match block_on(nx_rpc::reboot::request_reset_plan(
        &ctx.rebootd,
        ctx.timeout,
    )) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Outcome::Failed(format!("rebootd resetPlan(): {e}")),
        Err(e) => return Outcome::Failed(e),
    };
    let plan = match nx_contract::reset_plan::Plan::from_json(&json) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("the plan does not parse: {e}")),
    };
    let wiped: Vec<&str> = plan.wiped.iter().map(|t| t.path.as_str()).collect();
    if wiped != ["/state/apps", "/state/content", "/state/settings"] || !plan.is_sane() {
        return Outcome::Failed(format!(
            "the plan wipes {wiped:?}, not exactly apps/content/settings"
        ));
    }
    let trust_listed = plan
        .preserved
        .iter()
        .any(|t| t.path == "/state/trust" && t.listed && !t.truncated);
    if !trust_listed {
        return Outcome::Failed(
            "the plan does not list /state/trust path by path as preserved".into(),
        );
    }
    if !nx_reset::is_device_name(&device) {
        return Outcome::Failed(format!(
            "rebootd's device name {device:?} is not a plain name"
        ));
    }
    match nx_reset::plan(&ctx.state_root) {
        Ok(local) if local.to_json() == json => {}
        Ok(_) => {
            return Outcome::Failed(
                "rebootd's plan differs from the plan of the tree as it is".into(),
            )
        }
        Err(e) => {
            return Outcome::Failed(format!(
                "cannot plan {} here: {e}",
                ctx.state_root.display()
            ))
        }
    }
    match fingerprint(&ctx.state_root) {
        Ok(after) if after == before => Outcome::Ok,
        Ok(after) => {
            let changed = before
                .keys()
                .chain(after.keys())
                .find(|k| before.get(*k) != after.get(*k))
                .map(|k| k.display().to_string())
                .unwrap_or_default();
            Outcome::Failed(format!("the dry run changed {changed}"))
        }
        Err(e) => Outcome::Failed(e),
    }
}

/// `SELFTEST: flash receive ok` (recovery) / `SELFTEST: flash receive stub/placeholder`.
pub fn check_flash_receive(ctx: &Ctx, _emit: &mut dyn FnMut(&Marker)) -> Outcome {
    if ctx.mode != Mode::Recovery {
        return Outcome::Stub("flashd runs only in recovery; this is a normal boot".into());
    }
    if let Err(why) = nx_diag::store::usable(&ctx.state_root, ctx.require_mountpoint) {
        return Outcome::Stub(format!(
            "flashd cannot receive: {why} (flashd runs as its own stub)"
        ));
    }
    let flash = ctx.state_root.join("flash");
    if !flash.is_dir() || rustix::fs::access(&flash, rustix::fs::Access::WRITE_OK).is_err() {
        return Outcome::Failed(format!("{} is not a writable directory", flash.display()));
    }
    let gcfg = nx_recovery::guest::GuestConfig {
        proc_root: ctx.proc_root.clone(),
        ports_root: ctx.ports_root.clone(),
        dev_root: ctx.dev_root.clone(),
        ..nx_recovery::guest::GuestConfig::guest()
    };
    // flashd starts with us; give it the same time as the daemons' sockets.
    let start = Instant::now();
    loop {
        let p = nx_recovery::guest::probe_flashd(&gcfg);
        match (p.pid, p.port, p.serving) {
            (Some(_), Some(_), true) => return Outcome::Ok,
            (pid, port, _) if start.elapsed() >= ctx.wait => {
                return Outcome::Failed(match (pid, port) {
                    (None, _) => "flashd is not running".into(),
                    (Some(_), None) => "no virtio-serial port named com.nexus.flash".into(),
                    (Some(pid), Some(port)) => {
                        format!("flashd (pid {pid}) does not hold {} open", port.display())
                    }
                })
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `SELFTEST: flash reboot flag ok`.
pub fn check_flash_reboot_flag(ctx: &Ctx, _emit: &mut dyn FnMut(&Marker)) -> Outcome {
    use nx_contract::NextBoot as Target;
    if let Err(e) = wait_for_socket(&ctx.rebootd, ctx.wait) {
        return Outcome::Failed(format!("rebootd: {e}"));
    }
    let sock = &ctx.rebootd;
    let t = ctx.timeout;
    let pending = || -> Result<(Option<Target>, bool, bool), String> {
        block_on(nx_rpc::reboot::request_pending(sock, t))?
            .map_err(|e| format!("rebootd pending(): {e}"))
    };
    let record = ctx.state_root.join("boot/next_mode");
    let run = || -> Result<(), String> {
        let (orig, _, persistent) = pending()?;
        if !persistent {
            return Err(
                "rebootd is RAM-only (no /state): the flag would not survive a reboot".into(),
            );
        }
        let mut result = Ok(());
        for target in [Target::Recovery, Target::Normal] {
            block_on(nx_rpc::reboot::request_set_next(sock, target, t))?
                .map_err(|e| format!("rebootd setNext({target}): {e}"))?;
            let (now, _, _) = pending()?;
            let bytes = read_small(&record, 64);
            if now != Some(target) || bytes.as_deref() != Some(target.record_bytes()) {
                result = Err(format!(
                    "after setNext({target}) pending() says {now:?} and {} holds {:?}",
                    record.display(),
                    bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
                ));
                break;
            }
        }
        // Restore what was there, even after a mismatch.
        match orig {
            Some(target) => block_on(nx_rpc::reboot::request_set_next(sock, target, t))?
                .map_err(|e| format!("restoring the record ({target}): {e}"))?,
            None => block_on(nx_rpc::reboot::request_clear_next(sock, t))?
                .map_err(|e| format!("restoring \"no record\": {e}"))?,
        }
        let (back, _, _) = pending()?;
        if back != orig {
            return Err(format!("restored record reads {back:?}, was {orig:?}"));
        }
        if orig.is_none() && record.exists() {
            return Err(format!(
                "{} still exists after clearNext()",
                record.display()
            ));
        }
        result
    };
    match run() {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Failed(e),
    }
}

/// `SELFTEST: bootctl api ok`.
pub fn check_bootctl_api(ctx: &Ctx, emit: &mut dyn FnMut(&Marker)) -> Outcome {
    if let Err(e) = wait_for_socket(&ctx.bootctld, ctx.wait) {
        return Outcome::Failed(format!("bootctld: {e}"));
    }
    let (st, persistent) = match block_on(bootctld::client::state(&ctx.bootctld)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Outcome::Failed(format!("bootctld state(): {e}")),
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = st.validate() {
        return Outcome::Failed(format!("the slot table breaks an invariant: {e}"));
    }
    let json = match block_on(nx_rpc::bootctl::export_json(&ctx.bootctld)) {
        Ok(Ok(j)) => j,
        Ok(Err(e)) => return Outcome::Failed(format!("bootctld exportJson(): {e}")),
        Err(e) => return Outcome::Failed(e),
    };
    let v: serde_json::Value = match serde_json::from_str(&json) {
        Ok(v) => v,
        Err(e) => return Outcome::Failed(format!("exportJson() does not parse: {e}")),
    };
    if v["active"].as_str() != Some(st.active.as_str()) {
        return Outcome::Failed(format!(
            "state() says active={} but exportJson() says {}",
            st.active, v["active"]
        ));
    }
    emit(&m::bootctl_view(
        st.active,
        st.a.health.as_str(),
        st.b.health.as_str(),
        persistent,
    ));
    Outcome::Ok
}

/// The health check of a normal boot: after every check passed, `confirm()` the slot this
/// boot uses (bootctld refuses when `bootAttempt` did not run in this boot).
pub fn confirm_slot(ctx: &Ctx) -> Result<(), String> {
    block_on(nx_rpc::bootctl::confirm(&ctx.bootctld))?
        .map_err(|e| format!("bootctld confirm(): {e}"))
}
