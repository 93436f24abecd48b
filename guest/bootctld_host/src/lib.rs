//! Test harness for the host-side proof of `bootctld` and `rebootd`
//! (`cargo test -p bootctld_host -- --nocapture`).
//!
//! [`TestServer`] runs a real daemon in-process (its own thread, a tokio
//! current-thread runtime and a `LocalSet`, exactly like the binaries) on a unix
//! socket in a temp dir, collects its console markers, and stops on drop.
//! [`call`] drives one Cap'n Proto client call against a socket.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use anyhow::{bail, Context};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Markers collected from a daemon.
pub type MarkerLog = Arc<Mutex<Vec<String>>>;

/// Which daemon a [`TestServer`] runs.
pub enum Daemon {
    /// bootctld with this config (endpoints/markers are filled in by `start`).
    Bootctld(bootctld::Config),
    /// rebootd with this config (endpoints are filled in by `start`).
    Rebootd(rebootd::Config),
    /// bootctld behind a simulated virtio-serial port: like QEMU's chardev
    /// socket, every host connection is spliced into one persistent byte
    /// stream, and the daemon never sees an EOF between connections (nor loses
    /// what an earlier connection left in flight). Served with the framed link
    /// of `proto::rpc::link`, exactly like the guest's port.
    BootctldBehindVport(bootctld::Config),
}

/// A daemon serving on a unix socket in this process.
pub struct TestServer {
    /// The socket it serves on.
    pub socket: PathBuf,
    /// Markers it printed so far (bootctld only; rebootd prints to stdout).
    pub markers: MarkerLog,
    shutdown: Option<futures::channel::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A bootctld config for tests: `state` dir (or RAM-only), no ports, the given
/// boot id and reboot method.
pub fn bootctld_config(
    state: Option<&Path>,
    boot_id: &str,
    reboot: bootctld::service::RebootVia,
) -> bootctld::Config {
    bootctld::Config {
        state: state.map(Path::to_path_buf),
        require_mountpoint: false,
        endpoints: Vec::new(),
        reboot,
        boot_id: Some(boot_id.to_string()),
        markers: bootctld::service::Markers::stdout(),
        esp: None,
        loader: None,
    }
}

impl TestServer {
    /// Start `daemon` on `socket` and wait until it accepts connections.
    pub fn start(daemon: Daemon, socket: &Path) -> anyhow::Result<TestServer> {
        let markers: MarkerLog = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        let endpoint = nx_rpc::Endpoint::Unix(socket.to_path_buf());
        let sink = markers.clone();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("test server: no runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            let stop = async move {
                let _ = rx.await;
            };
            let result = match daemon {
                Daemon::Bootctld(mut cfg) => {
                    cfg.endpoints = vec![endpoint];
                    cfg.markers = bootctld::service::Markers::new(move |line: &str| {
                        println!("{line}");
                        if let Ok(mut v) = sink.lock() {
                            v.push(line.to_string());
                        }
                    });
                    local.block_on(&rt, bootctld::run_until(cfg, stop))
                }
                Daemon::BootctldBehindVport(mut cfg) => {
                    cfg.markers = bootctld::service::Markers::new(move |line: &str| {
                        println!("{line}");
                        if let Ok(mut v) = sink.lock() {
                            v.push(line.to_string());
                        }
                    });
                    let socket = match &endpoint {
                        nx_rpc::Endpoint::Unix(p) => p.clone(),
                        nx_rpc::Endpoint::Port(_) => return,
                    };
                    local.block_on(&rt, async move {
                        let run = std::pin::pin!(vport_sim(cfg, socket));
                        let stop = std::pin::pin!(stop);
                        match futures::future::select(run, stop).await {
                            futures::future::Either::Left((r, _)) => r,
                            futures::future::Either::Right(((), _)) => Ok(()),
                        }
                    })
                }
                Daemon::Rebootd(mut cfg) => {
                    cfg.endpoints = vec![endpoint];
                    local.block_on(&rt, async move {
                        let run = std::pin::pin!(rebootd::run(cfg));
                        let stop = std::pin::pin!(stop);
                        match futures::future::select(run, stop).await {
                            futures::future::Either::Left((r, _)) => r,
                            futures::future::Either::Right(((), _)) => Ok(()),
                        }
                    })
                }
            };
            if let Err(e) = result {
                eprintln!("test server failed: {e}");
            }
        });
        let server = TestServer {
            socket: socket.to_path_buf(),
            markers,
            shutdown: Some(tx),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if Instant::now() > deadline {
                bail!("daemon did not listen on {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    /// The markers printed so far.
    pub fn markers(&self) -> Vec<String> {
        self.markers.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Stop the daemon and wait for its thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// bootctld served framed over one persistent pipe that every connection to
/// `socket` is spliced into, one connection at a time (see
/// [`Daemon::BootctldBehindVport`]).
async fn vport_sim(cfg: bootctld::Config, socket: PathBuf) -> Result<(), nx_rpc::TransportError> {
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    let (daemon, notes) = bootctld::open_daemon(&cfg);
    for n in &notes {
        cfg.markers.emit(n);
    }
    let listener =
        tokio::net::UnixListener::bind(&socket).map_err(|source| nx_rpc::TransportError::Bind {
            path: socket.clone(),
            source,
        })?;
    let (guest_end, host_end) = tokio::io::duplex(256 * 1024);
    let (g_r, g_w) = tokio::io::split(guest_end);
    tokio::task::spawn_local(nx_rpc::serve_framed(
        g_r.compat(),
        g_w.compat_write(),
        Vec::new(),
        bootctld::bootstrap(daemon),
        "bootctld",
        "vport-sim",
    ));
    cfg.markers.emit(&nx_contract::markers::bootctld::ready());
    let (mut h_r, mut h_w) = tokio::io::split(host_end);
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let (mut c_r, mut c_w) = conn.into_split();
        // Until the host closes its side: host → port, and port → host.
        tokio::select! {
            _ = tokio::io::copy(&mut c_r, &mut h_w) => {}
            _ = tokio::io::copy(&mut h_r, &mut c_w) => {}
        }
    }
}

/// Run `f` (a client conversation) to completion on a fresh current-thread runtime.
pub fn block_on<F: Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("no tokio runtime")?;
    Ok(rt.block_on(f))
}

/// Bootstrap a `C` client on `socket` and run `call` with it.
pub fn call<C, F, Fut, T>(socket: &Path, call: F) -> anyhow::Result<T>
where
    C: capnp::capability::FromClientHook,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    let r = block_on(nx_rpc::call_unix(socket, Duration::from_secs(10), call))?;
    Ok(r?)
}

/// Re-exported so dependents (the nx-cli tests) configure daemons without
/// depending on the guest crates directly.
pub use bootctld;
pub use rebootd;
