//! A host-run flashd for the benches (`--listen SOCK --state DIR --install FILE`): started,
//! waited for until it prints `flashd: ready`, its output drained, killed when dropped.

use anyhow::{bail, Context};
use nx_contract::markers;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long flashd may take to print `flashd: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A host flashd; killed when dropped.
pub(crate) struct HostFlashd(Child);

impl HostFlashd {
    /// Start flashd and wait for its `flashd: ready` line (other lines may come first); its
    /// stdout is drained for as long as it runs.
    pub(crate) fn start(
        bin: &Path,
        sock: &Path,
        state: &Path,
        out: &Path,
    ) -> anyhow::Result<HostFlashd> {
        std::fs::create_dir_all(state)?;
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg(sock)
            .arg("--state")
            .arg(state)
            .arg("--install")
            .arg(out)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start flashd")?;
        let stdout = child.stdout.take().context("flashd stdout")?;
        let ready = markers::flashd::ready().as_str().to_string();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if l == ready {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let fd = HostFlashd(child);
        if rx.recv_timeout(READY_TIMEOUT).is_err() {
            bail!(
                "flashd did not print `flashd: ready` within {} s (listening on {})",
                READY_TIMEOUT.as_secs(),
                sock.display()
            );
        }
        Ok(fd)
    }
}

impl Drop for HostFlashd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
