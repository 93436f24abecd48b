//! Test support shared by flashd's and nx's integration tests: build images in memory, run a
//! server in-process on a unix socket, capture its markers. Not used by the daemon itself.

use crate::config::{Config, InstallSpec};
use crate::link::Conn;
use crate::server::{Output, Server};
use proto::image::{layout, sign_manifest, ImageHead};
use proto::manifest::SegmentHasher;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Build a complete image file in memory from named segments; signed when `seed` is given.
pub fn build_image(
    version: &str,
    segments: &[(&str, Vec<u8>)],
    seed: Option<[u8; 32]>,
) -> Result<Vec<u8>, proto::image::ImageError> {
    let parts: Vec<(String, proto::manifest::SegmentDigest)> = segments
        .iter()
        .map(|(n, d)| {
            let mut h = SegmentHasher::new();
            h.update(d);
            (n.to_string(), h.finish())
        })
        .collect();
    let m = layout(version, &parts)?;
    let sig = seed.map(|s| sign_manifest(&s, &m.to_canonical_bytes()));
    let head = ImageHead::build(&m, sig)?;
    let mut out = head.to_bytes();
    for (seg, (_, data)) in m.segments.iter().zip(segments) {
        out.resize(seg.offset as usize, 0);
        out.extend_from_slice(data);
        out.resize(seg.padded_end() as usize, 0);
    }
    Ok(out)
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A callback run on each marker.
pub type MarkerHook = Box<dyn Fn(&str) + Send + Sync>;

/// An [`Output`] that records every marker and log line; an optional hook runs on each marker
/// (on the server thread: blocking in it stalls the server, which tests use to cut at a
/// precise point).
#[derive(Default)]
pub struct Capture {
    markers: Mutex<Vec<String>>,
    logs: Mutex<Vec<String>>,
    hook: Mutex<Option<MarkerHook>>,
}

impl Capture {
    pub fn new() -> Arc<Capture> {
        Arc::new(Capture::default())
    }

    /// Run `f` on every marker from now on.
    pub fn set_hook(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        if let Ok(mut h) = self.hook.lock() {
            *h = Some(Box::new(f));
        }
    }

    pub fn clear_hook(&self) {
        if let Ok(mut h) = self.hook.lock() {
            *h = None;
        }
    }

    pub fn markers(&self) -> Vec<String> {
        self.markers.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Wait until a marker starting with `prefix` was seen (or `timeout` passed).
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.markers().iter().any(|m| m.starts_with(prefix)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Output for Capture {
    fn show(&self, marker: &nx_contract::Marker) {
        let line = marker.as_str();
        if let Ok(mut m) = self.markers.lock() {
            m.push(line.to_string());
        }
        if let Ok(h) = self.hook.lock() {
            if let Some(f) = h.as_ref() {
                f(line);
            }
        }
    }
    fn log(&self, line: &str) {
        if let Ok(mut m) = self.logs.lock() {
            m.push(line.to_string());
        }
    }
}

/// A server running in a thread on a unix socket, until stopped (like a killed daemon: the
/// connection is cut, the server dropped; its state dir stays).
pub struct RunningServer {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
    handle: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Start serving `cfg` on `socket` (replacing a stale socket file).
    pub fn start(
        cfg: Config,
        socket: &Path,
        out: Arc<dyn Output>,
    ) -> std::io::Result<RunningServer> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let (stop2, current2) = (stop.clone(), current.clone());
        let mut server = Server::new(cfg, out).map_err(|e| std::io::Error::other(e.to_string()))?;
        server.announce();
        let handle = std::thread::Builder::new()
            .name("test-flashd".into())
            .spawn(move || {
                let mut n = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            n += 1;
                            if let Ok(c) = s.try_clone() {
                                if let Ok(mut cur) = current2.lock() {
                                    *cur = Some(c);
                                }
                            }
                            let _ = s.set_nonblocking(false);
                            match Conn::from_unix(s, format!("test#{n}")) {
                                Ok(conn) => {
                                    server.serve_conn(conn);
                                }
                                Err(_) => continue,
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => break,
                    }
                }
                if !stop2.load(Ordering::Relaxed) {
                    server.drain();
                }
            })?;
        Ok(RunningServer {
            socket: socket.to_path_buf(),
            stop,
            current,
            handle: Some(handle),
        })
    }

    /// Start a server on `state` installing into `install` (a file).
    pub fn start_simple(
        state: &Path,
        install: &Path,
        socket: &Path,
        out: Arc<dyn Output>,
    ) -> std::io::Result<RunningServer> {
        let cfg = Config::new(state, InstallSpec::Path(install.to_path_buf()));
        RunningServer::start(cfg, socket, out)
    }

    /// Stop abruptly: cut the current connection and drop the server (the state dir keeps
    /// whatever was durable).
    pub fn kill(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut cur) = self.current.lock() {
            if let Some(s) = cur.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Cut the current connection only (the server keeps running).
    pub fn cut(&self) {
        if let Ok(mut cur) = self.current.lock() {
            if let Some(s) = cur.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut cur) = self.current.lock() {
            if let Some(s) = cur.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
