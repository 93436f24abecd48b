//! The real backend: rebootd and bootctld over their guest-local unix sockets
//! (`/run/rebootd.sock`, `/run/bootctld.sock`), nx-diag on `/state`, and a look at flashd
//! through `/proc`. Every function is synchronous (it runs its own current-thread tokio
//! runtime), so recovery-sh's built-ins can call them directly.

use crate::{render_slots, Backend, Target};
use nx_contract::reset_plan::Plan;
use std::path::PathBuf;
use std::time::Duration;

/// Where things are (shared with the selftest client).
pub use nx_diag::env::GuestEnv as GuestConfig;

/// The flash-mode answer when flashd is not running.
const FLASHD_NOT_RUNNING: &str =
    "flashd: NOT running — flashing is not possible right now (see the console log)\n"; // hygiene: not a marker (menu text)

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(f))
        .map_err(|e| format!("could not start a tokio runtime: {e}"))
}

/// Write a diag bundle (nx-diag): the console lines it printed (the
/// `recovery: diag written (bytes=<n>)` marker last) and the outcome.
pub fn diag(cfg: &GuestConfig) -> (Vec<String>, Result<nx_diag::Outcome, String>) {
    let view = block_on(nx_rpc::bootctl::fetch_view(
        &cfg.bootctld,
        Duration::from_secs(3),
    ))
    .unwrap_or_else(nx_rpc::bootctl::View::Unavailable);
    let dcfg = nx_diag::Config {
        state_root: cfg.state_root.clone(),
        require_mountpoint: cfg.require_mountpoint,
        kmsg_sources: cfg.kmsg_sources.clone(),
        console_log: cfg.console_log.clone(),
    };
    let mut lines = Vec::new();
    let r =
        nx_diag::run(&dcfg, &view, &mut |l| lines.push(l.to_string())).map_err(|e| e.to_string());
    if let Err(e) = &r {
        lines.push(nx_contract::markers::diag::error(e).into_string());
    }
    (lines, r)
}

/// The slot table from bootctld (`state()`), rendered.
pub fn slot_status(cfg: &GuestConfig) -> Result<String, String> {
    let (st, persistent) = block_on(bootctld::client::state(&cfg.bootctld))?.map_err(|e| {
        format!(
            "bootctld on {} did not answer ({e}); is bootctld running?",
            cfg.bootctld.display()
        )
    })?;
    Ok(render_slots(&st, persistent))
}

/// The factory-reset plan and device name from rebootd (`resetPlan()`), checked.
pub fn reset_plan(cfg: &GuestConfig) -> Result<(Plan, String), String> {
    let (json, device) = block_on(nx_rpc::reboot::request_reset_plan(
        &cfg.rebootd,
        cfg.timeout,
    ))?
    .map_err(|e| format!("rebootd on {}: {e}", cfg.rebootd.display()))?;
    let plan = Plan::from_json(&json)
        .map_err(|e| format!("rebootd sent a plan that does not parse: {e}"))?;
    if !plan.is_sane() {
        return Err(
            "rebootd's plan does not wipe exactly apps, content and settings; refusing".into(),
        );
    }
    if !nx_reset::is_device_name(&device) {
        return Err("rebootd reports a device name that is not a plain name; refusing".into());
    }
    Ok((plan, device))
}

/// rebootd `factoryWipe()` (records the request, next boot recovery, reboots).
pub fn factory_wipe(cfg: &GuestConfig) -> Result<bool, String> {
    block_on(nx_rpc::reboot::request_factory_wipe(
        &cfg.rebootd,
        cfg.timeout,
    ))?
    .map_err(|e| format!("rebootd on {}: {e}", cfg.rebootd.display()))
}

/// rebootd `mode(target)` (persist the next-boot record and reboot).
pub fn reboot(cfg: &GuestConfig, target: Target) -> Result<bool, String> {
    block_on(nx_rpc::reboot::request_mode(
        &cfg.rebootd,
        target,
        cfg.timeout,
    ))?
    .map_err(|e| format!("rebootd on {}: {e}", cfg.rebootd.display()))
}

/// What `/proc` says about flashd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashdProbe {
    /// flashd's pid, when it runs.
    pub pid: Option<u32>,
    /// The flash port's device (found by name in sysfs).
    pub port: Option<PathBuf>,
    /// Whether flashd holds the flash port open (it serves it).
    pub serving: bool,
}

use nx_guest::bounded::read_prefix as read_small;

/// Find flashd (`/proc/<pid>/comm` = `flashd`) and whether it holds the flash port
/// (`com.nexus.flash`) open among its descriptors.
pub fn probe_flashd(cfg: &GuestConfig) -> FlashdProbe {
    let port = nx_guest::port::find(
        &cfg.ports_root,
        &cfg.dev_root,
        nx_contract::ports::FLASH.name,
    )
    .ok()
    .flatten();
    let mut pids: Vec<u32> = std::fs::read_dir(&cfg.proc_root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    for pid in pids {
        let dir = cfg.proc_root.join(pid.to_string());
        let Some(comm) = read_small(&dir.join("comm"), 64) else {
            continue;
        };
        if comm.strip_suffix(b"\n").unwrap_or(&comm) != b"flashd" {
            continue;
        }
        let serving = port.as_ref().is_some_and(|p| {
            std::fs::read_dir(dir.join("fd"))
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .take(4096)
                        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| &t == p))
                })
                .unwrap_or(false)
        });
        return FlashdProbe {
            pid: Some(pid),
            port,
            serving,
        };
    }
    FlashdProbe {
        pid: None,
        port,
        serving: false,
    }
}

/// Flash mode: how to flash from the host, whether flashd serves the port, and flashd's
/// records (transfer to resume, last install).
pub fn flash_status(cfg: &GuestConfig) -> String {
    let p = probe_flashd(cfg);
    let mut s = String::from(
        "flash mode: flashd receives images on the virtio-serial port com.nexus.flash.\n\
         On the host run:  nx flash send IMAGE   (port unix:build/qemu/flash.sock)\n",
    );
    match (&p.pid, &p.port, p.serving) {
        (Some(pid), Some(port), true) => s.push_str(&format!(
            "flashd: running (pid {pid}), serving {} — waiting for the host\n", // hygiene: not a marker (menu text)
            port.display()
        )),
        (Some(pid), _, _) => s.push_str(&format!(
            "flashd: running (pid {pid}) but not holding the flash port open (no port, or it is waiting for one)\n" // hygiene: not a marker (menu text)
        )),
        // hygiene: not a marker (menu text)
        (None, _, _) => s.push_str(FLASHD_NOT_RUNNING),
    }
    s.push_str(&nx_diag::collect::flash_summary(&cfg.state_root));
    s
}

/// [`Backend`] over [`GuestConfig`].
#[derive(Debug, Clone)]
pub struct GuestBackend {
    /// Where things are.
    pub cfg: GuestConfig,
}

impl Backend for GuestBackend {
    fn flash_status(&mut self) -> String {
        flash_status(&self.cfg)
    }

    fn diag(&mut self) -> Result<String, String> {
        let (lines, r) = diag(&self.cfg);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        r.map(|_| text)
    }

    fn slot_status(&mut self) -> Result<String, String> {
        slot_status(&self.cfg)
    }

    fn reset_plan(&mut self) -> Result<(Plan, String), String> {
        reset_plan(&self.cfg)
    }

    fn factory_wipe(&mut self) -> Result<bool, String> {
        factory_wipe(&self.cfg)
    }

    fn reboot(&mut self, target: Target) -> Result<bool, String> {
        reboot(&self.cfg, target)
    }
}
