//! # bootctld — the single authority for A/B slot state
//!
//! * [`machine`]: the deterministic slot-state machine (pure);
//! * [`snapshot`]: its canonical Cap'n Proto snapshot (`STATE/bootctl/state.nxs`);
//! * [`json`]: the JSON debug/export view;
//! * [`store`]: atomic persistence, or RAM-only (explicit stub) without /state;
//! * [`client`]: bootctld's types over the typed client [`nx_rpc::bootctl`] (init, flashd,
//!   selftest);
//! * [`update`]: the slot side of an update for flashd (install target, then
//!   slotImaged + setActive(trial) + the automatic reboot);
//! * [`service`]: the daemon core with the console markers and the `BootCtl`
//!   capability of `proto/schema/bootctl.capnp`.
//!
//! Served over Cap'n Proto RPC on the virtio-serial port `com.nexus.bootctl`
//! and on unix sockets (`/run/bootctld.sock` in the guest), with the one transport
//! of [`nx_rpc`]. See docs/updates/bootctl.md.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod client;
pub mod json;
pub mod machine;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod update;

pub use nx_rpc::{Endpoint, TransportError};
use std::future::Future;
use std::path::{Path, PathBuf};

/// Default guest-local socket.
pub const DEFAULT_SOCKET: &str = nx_rpc::bootctl::SOCKET;
/// rebootd's guest-local socket (bootctld's `reboot()` and the update's automatic reboot).
pub const REBOOTD_SOCKET: &str = nx_rpc::reboot::SOCKET;
/// The virtio-serial port name.
pub const PORT_NAME: &str = nx_rpc::bootctl::PORT;
/// Where the boot id comes from.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Daemon configuration (the CLI flags of `bootctld`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir (`/state`); `None`: RAM-only.
    pub state: Option<PathBuf>,
    /// Only persist when the state dir is a mount point.
    pub require_mountpoint: bool,
    /// Where to serve.
    pub endpoints: Vec<Endpoint>,
    /// How `reboot()` reboots.
    pub reboot: service::RebootVia,
    /// This boot's id; `None`: read [`BOOT_ID_PATH`].
    pub boot_id: Option<String>,
    /// Where console markers go (stdout by default).
    pub markers: service::Markers,
    /// The mounted ESP whose boot entries bootctld keeps in step with the slot state;
    /// `None`: no projection (a stub/placeholder line says so).
    pub esp: Option<PathBuf>,
    /// What the bootloader did for this boot; `None`: bootctld decides `bootAttempt` itself
    /// (no bootloader: host runs and direct kernel boots).
    pub loader: Option<service::LoaderBoot>,
}

/// What the bootloader did for this boot: `nexus.slot=` of the kernel command line (the
/// entry's options) and the Boot Loader Interface variables in `efivars`. `None` when the
/// boot did not come through our bootloader.
pub fn read_loader_boot(efivars: &Path) -> Option<service::LoaderBoot> {
    let vars = nx_guest::efivar::LoaderVars::new(efivars);
    if !vars.available() {
        return None;
    }
    let cmdline = nx_guest::cmdline::Cmdline::system().ok()?;
    let selected = vars
        .read_string(nx_contract::loader::LOADER_ENTRY_SELECTED)
        .ok()
        .flatten();
    let count = vars
        .read_string(nx_contract::loader::LOADER_BOOT_COUNT_PATH)
        .ok()
        .flatten();
    service::LoaderBoot::from_parts(
        cmdline.get(nx_contract::loader::SLOT_OPTION),
        selected,
        count.as_deref(),
    )
}

/// This boot's id from [`BOOT_ID_PATH`] (bounded, printable), "" when unreadable.
pub fn read_boot_id() -> String {
    rebootd::fsutil::read_bounded(Path::new(BOOT_ID_PATH), 128)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|s| {
            s.len() <= machine::MAX_BOOT_ID_LEN && s.bytes().all(|c| (0x21..0x7f).contains(&c))
        })
        .unwrap_or_default()
}

/// Open the store and build the daemon; also returns the startup notes (the
/// console lines to print before `bootctld: ready`).
pub fn open_daemon(config: &Config) -> (service::Daemon, Vec<nx_contract::Marker>) {
    let opened = store::Store::open(config.state.as_deref(), config.require_mountpoint);
    let boot_id = config.boot_id.clone().unwrap_or_else(read_boot_id);
    let mut notes = opened.notes;
    let esp = match &config.esp {
        None => {
            notes.push(nx_contract::markers::bootctld::no_esp(
                "started without --esp",
            ));
            None
        }
        Some(dir) => {
            let esp = nx_guest::esp::Esp::open(dir);
            if esp.is_none() {
                notes.push(nx_contract::markers::bootctld::no_esp(format_args!(
                    "{} has no {}",
                    dir.display(),
                    nx_contract::loader::ENTRIES_DIR
                )));
            }
            esp
        }
    };
    let daemon = service::Daemon::new(
        opened.state,
        opened.store,
        boot_id,
        config.reboot.clone(),
        config.markers.clone(),
    )
    .with_esp(esp)
    .with_loader(config.loader.clone());
    (daemon, notes)
}

/// The `BootCtl` capability over `daemon`, as the bootstrap of a connection.
pub fn bootstrap(daemon: service::Daemon) -> capnp::capability::Client {
    let client: proto::rpc::bootctl_capnp::boot_ctl::Client =
        capnp_rpc::new_client(service::BootCtlService::new(daemon));
    client.client
}

/// Serve until `shutdown` completes (tests) — see [`run`].
pub async fn run_until(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    let (daemon, notes) = open_daemon(&config);
    let markers = config.markers.clone();
    for note in &notes {
        markers.emit(note);
    }
    if let service::RebootVia::Stub(why) = daemon.reboot_via() {
        markers.emit(&nx_contract::markers::bootctld::reboot_is_stub(why));
    }
    let listeners = nx_rpc::bind(&config.endpoints)?;
    let client = bootstrap(daemon);
    markers.emit(&nx_contract::markers::bootctld::ready());
    let serve = std::pin::pin!(listeners.serve(client, "bootctld"));
    let shutdown = std::pin::pin!(shutdown);
    futures::future::select(serve, shutdown).await;
    Ok(())
}

/// Open the store, print the startup markers (`bootctld: ready` last), bind and
/// serve forever. Must run inside a tokio `LocalSet`.
pub async fn run(config: Config) -> Result<(), TransportError> {
    run_until(config, futures::future::pending()).await
}
