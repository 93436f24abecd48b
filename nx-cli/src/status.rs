//! `nx status`: one screen about a target, like `rauc status` — device, running mode (recovery
//! or normal), booted slot, both slots' health / version / tries, the next-boot mode and the
//! installed image flashd reports.
//!
//! ```text
//! nx status [--json] [--device DIR] [--timeout SECS]
//! ```
//! Sources, each asked with a short timeout: flashd `INFO` (device name, installed image; it
//! runs only in recovery, so an answer means recovery mode), bootctld `state()` (slots, last
//! boot) and rebootd `pending()` (next-boot mode). What does not answer is shown as
//! unreachable; only when nothing answers does `nx status` fail, with the target-unreachable
//! exit code and a hint to start a guest. The probes are shared with `nx devices`
//! ([`probe`]).

use crate::boot::{health_name, printable, slot_name};
use crate::target::{self, Daemon};
use anyhow::Context;
use nx_engine::rpc_client;
use nx_engine::transport::PortSpec;
use proto::rpc::bootctl_capnp::boot_ctl;
use proto::rpc::reboot_capnp::{self as rb, reboot};
use serde::Serialize;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code when no daemon of the target answers (the `nx flash` table's "cannot reach the
/// target").
pub const EXIT_UNREACHABLE: u8 = crate::exit::Exit::Unreachable.code();

/// Arguments of `nx status`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Which target: --device DIR (a guest run directory holding flash.sock, reboot.sock and \
bootctl.sock, as `nx devices` lists them), else NX_DEVICE / NX_PORT, else nx.toml at the \
project root, else build/qemu/ under the project root (docs/tools/nx.md, \"Which target\").

Exit codes: 0 at least one daemon answered; 5 nothing answered (start a guest: \
`cargo xtask recovery --no-flash`); 1 other errors.")]
pub struct StatusArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// A guest run directory (its three sockets); default: the resolved ports.
    #[arg(long, value_name = "DIR")]
    pub device: Option<std::path::PathBuf>,
    /// Seconds to wait for each daemon's answer.
    #[arg(long, default_value_t = 3, value_name = "SECS")]
    pub timeout: u64,
}

/// What one daemon said, or why it did not.
#[derive(Debug, Clone, Serialize)]
pub struct Probe<T> {
    /// The port SPEC asked.
    pub port: String,
    /// The answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<T>,
    /// Why there is no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<T> Probe<T> {
    fn from(port: &str, r: anyhow::Result<T>) -> Probe<T> {
        match r {
            Ok(a) => Probe {
                port: port.to_string(),
                answer: Some(a),
                error: None,
            },
            Err(e) => Probe {
                port: port.to_string(),
                answer: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// flashd's INFO, the parts `nx status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct FlashdInfo {
    pub device: String,
    pub proto: u8,
    pub info: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed: Option<Installed>,
    /// A partial transfer in staging: chunks held of total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_transfer: Option<String>,
}

/// The image flashd last installed (its receipt on the target).
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub version: String,
    pub image_id: String,
    pub image_sha256: String,
    pub size: u64,
}

/// One slot of bootctld's table.
#[derive(Debug, Clone, Serialize)]
pub struct Slot {
    pub health: &'static str,
    pub trial: bool,
    pub tries_left: u8,
    pub version: String,
}

/// bootctld's state.
#[derive(Debug, Clone, Serialize)]
pub struct BootInfo {
    /// The slot the next normal boot uses.
    pub active: &'static str,
    pub a: Slot,
    pub b: Slot,
    /// The last normal boot's slot, if bootctld knows one.
    pub last_boot: Option<&'static str>,
    pub last_boot_trial: bool,
    pub persistent: bool,
}

/// rebootd's pending next-boot record.
#[derive(Debug, Clone, Serialize)]
pub struct NextBootInfo {
    /// `normal`, `recovery`, or `default` (no record: the boot chain decides, normally the
    /// active slot).
    pub mode: &'static str,
    pub factory_wipe: bool,
    pub persistent: bool,
}

/// Everything `nx status` / `nx devices` learn about one target.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The device name flashd reports (`null` when flashd is not running).
    pub device: Option<String>,
    /// `recovery` (flashd answers), `normal` (only rebootd/bootctld answer) or `unreachable`.
    pub mode: &'static str,
    pub flashd: Probe<FlashdInfo>,
    pub bootctld: Probe<BootInfo>,
    pub rebootd: Probe<NextBootInfo>,
}

impl Status {
    /// Whether any daemon answered.
    pub fn reachable(&self) -> bool {
        self.flashd.answer.is_some()
            || self.bootctld.answer.is_some()
            || self.rebootd.answer.is_some()
    }

    /// The version of the slot the guest runs, or flashd's installed image.
    pub fn version(&self) -> Option<String> {
        if let Some(b) = &self.bootctld.answer {
            let slot = b.last_boot.unwrap_or(b.active);
            let v = if slot == "a" {
                &b.a.version
            } else {
                &b.b.version
            };
            if !v.is_empty() {
                return Some(v.clone());
            }
        }
        self.flashd
            .answer
            .as_ref()
            .and_then(|f| f.installed.as_ref())
            .map(|i| i.version.clone())
    }
}

/// Ask flashd, bootctld and rebootd (concurrently, each bounded by `timeout`).
pub async fn probe(flash: &str, bootctl: &str, reboot_port: &str, timeout: Duration) -> Status {
    let (f, b, r) = tokio::join!(
        flashd(flash, timeout),
        bootctld(bootctl, timeout),
        rebootd(reboot_port, timeout)
    );
    let flashd = Probe::from(flash, f);
    let bootctld = Probe::from(bootctl, b);
    let rebootd = Probe::from(reboot_port, r);
    let mode = if flashd.answer.is_some() {
        "recovery"
    } else if bootctld.answer.is_some() || rebootd.answer.is_some() {
        "normal"
    } else {
        "unreachable"
    };
    Status {
        device: flashd.answer.as_ref().map(|f| f.device.clone()),
        mode,
        flashd,
        bootctld,
        rebootd,
    }
}

async fn flashd(port: &str, timeout: Duration) -> anyhow::Result<FlashdInfo> {
    let spec: PortSpec = port.parse().context("bad flashd port")?;
    if let PortSpec::Unix(p) = &spec {
        anyhow::ensure!(p.exists(), "{} does not exist", p.display());
    }
    let r = tokio::time::timeout(timeout, nx_engine::query::query_info(&spec, timeout))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} s", timeout.as_secs()))??;
    Ok(FlashdInfo {
        device: printable(&r.device),
        proto: r.proto,
        info: printable(&r.info),
        installed: r.installed.map(|i| Installed {
            version: printable(&i.version),
            image_id: hex::encode(i.image_id),
            image_sha256: hex::encode(i.image_sha256),
            size: i.total_size,
        }),
        partial_transfer: r.transfer.map(|t| hex::encode(&t.image_id[..8])),
    })
}

async fn bootctld(port: &str, timeout: Duration) -> anyhow::Result<BootInfo> {
    let info = rpc_client::with_client(
        port,
        rpc_client::Daemon::Bootctld,
        timeout,
        |c: boot_ctl::Client| async move {
            let resp = c.state_request().send().promise.await?;
            let r = resp.get()?;
            let s = r.get_state()?;
            let slot = |i: proto::rpc::bootctl_capnp::slot_info::Reader<'_>| Slot {
                health: health_name(i.get_health()),
                trial: i.get_trial(),
                tries_left: i.get_tries_left(),
                version: if i.has_version() {
                    i.get_version()
                        .ok()
                        .and_then(|t| t.to_str().ok().map(printable))
                        .unwrap_or_default()
                } else {
                    String::new()
                },
            };
            let (last_boot, last_boot_trial) = if s.has_last_boot() {
                let lb = s.get_last_boot()?;
                if lb.get_valid() {
                    (Some(slot_name(lb.get_slot())), lb.get_trial())
                } else {
                    (None, false)
                }
            } else {
                (None, false)
            };
            Ok(BootInfo {
                active: slot_name(s.get_active()),
                a: slot(s.get_slot_a()?),
                b: slot(s.get_slot_b()?),
                last_boot,
                last_boot_trial,
                persistent: r.get_persistent(),
            })
        },
    )
    .await?;
    Ok(info)
}

async fn rebootd(port: &str, timeout: Duration) -> anyhow::Result<NextBootInfo> {
    let info = rpc_client::with_client(
        port,
        rpc_client::Daemon::Rebootd,
        timeout,
        |c: reboot::Client| async move {
            let resp = c.pending_request().send().promise.await?;
            let r = resp.get()?;
            let mode = if !r.get_has_target() {
                "default"
            } else {
                match r.get_target() {
                    Ok(rb::BootTarget::Normal) => "normal",
                    Ok(rb::BootTarget::Recovery) => "recovery",
                    Err(_) => "?",
                }
            };
            Ok(NextBootInfo {
                mode,
                factory_wipe: r.get_factory_wipe(),
                persistent: r.get_persistent(),
            })
        },
    )
    .await?;
    Ok(info)
}

/// The three port SPECs of a run directory.
pub fn ports_in(dir: &std::path::Path) -> [String; 3] {
    [Daemon::Flashd, Daemon::Bootctld, Daemon::Rebootd]
        .map(|d| format!("unix:{}", dir.join(d.port().socket).display()))
}

/// `nx status`.
pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let [flash, bootctl, reboot_port] = match &args.device {
        Some(dir) => ports_in(&target::inputs().at_root(&dir.to_string_lossy())),
        None => [
            target::default_port(Daemon::Flashd).to_string(),
            target::default_port(Daemon::Bootctld).to_string(),
            target::default_port(Daemon::Rebootd).to_string(),
        ],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let st = rt.block_on(probe(&flash, &bootctl, &reboot_port, timeout));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st));
    }
    if !st.reachable() {
        eprintln!(
            "nx: error: no daemon answers on {flash}, {bootctl} or {reboot_port}: is a guest \
             running? start one with `cargo xtask recovery --no-flash` (in a second terminal), \
             or pick another with --device / NX_DEVICE (`nx devices` lists them)"
        );
        return Ok(ExitCode::from(EXIT_UNREACHABLE));
    }
    Ok(ExitCode::SUCCESS)
}

fn unreachable_line<T>(p: &Probe<T>) -> String {
    format!(
        "unreachable ({}: {})",
        p.port,
        p.error.as_deref().unwrap_or("no answer")
    )
}

/// The human screen of `nx status`.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "device:     {}",
        st.device
            .as_deref()
            .unwrap_or("(unknown: flashd runs only in recovery)")
    );
    let booted = match (&st.bootctld.answer, st.mode) {
        (_, "recovery") => "recovery ramdisk".to_string(),
        (Some(b), _) => match b.last_boot {
            Some(s) => format!(
                "slot {s}{}",
                if b.last_boot_trial { " (trial)" } else { "" }
            ),
            None => "unknown".into(),
        },
        (None, _) => "unknown".into(),
    };
    let _ = writeln!(out, "mode:       {}", st.mode);
    let _ = writeln!(out, "booted:     {booted}");
    match &st.rebootd.answer {
        Some(n) => {
            let _ = writeln!(
                out,
                "next boot:  {}{}",
                match n.mode {
                    "default" => "default (the active slot)",
                    m => m,
                },
                if n.factory_wipe {
                    ", factory wipe requested"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(out, "next boot:  {}", unreachable_line(&st.rebootd));
        }
    }
    match &st.bootctld.answer {
        Some(b) => {
            let _ = writeln!(out, "slots:      (bootctld, active = {})", b.active);
            for (name, s) in [("a", &b.a), ("b", &b.b)] {
                let _ = writeln!(
                    out,
                    "  {name}{} health={:<7} version={:<6} trial={} tries={}",
                    if name == b.active { "*" } else { " " },
                    s.health,
                    if s.version.is_empty() {
                        "-"
                    } else {
                        &s.version
                    },
                    if s.trial { "yes" } else { "no" },
                    s.tries_left
                );
            }
            if !b.persistent {
                let _ = writeln!(
                    out,
                    "  (RAM-only stub/placeholder: the guest has no /state)"
                );
            }
        }
        None => {
            let _ = writeln!(out, "slots:      {}", unreachable_line(&st.bootctld));
        }
    }
    match &st.flashd.answer {
        Some(f) => match &f.installed {
            Some(i) => {
                let _ = writeln!(
                    out,
                    "installed:  version {} ({} bytes, image {}…, sha256 {}…)",
                    i.version,
                    i.size,
                    &i.image_id[..16.min(i.image_id.len())],
                    &i.image_sha256[..16.min(i.image_sha256.len())]
                );
            }
            None => {
                let _ = writeln!(out, "installed:  nothing (flashd has no install receipt)");
            }
        },
        None if st.mode == "normal" => {
            let _ = writeln!(out, "installed:  not known (flashd runs only in recovery)");
        }
        None => {
            let _ = writeln!(out, "installed:  {}", unreachable_line(&st.flashd));
        }
    }
    if let Some(p) = st
        .flashd
        .answer
        .as_ref()
        .and_then(|f| f.partial_transfer.as_ref())
    {
        let _ = writeln!(
            out,
            "transfer:   a partial transfer of image {p}… is staged (resumable)"
        );
    }
    out
}
