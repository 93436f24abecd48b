//! The serving flags both daemons take (`--state`, `--allow-unmounted-state`, `--port-name`,
//! `--listen`), one definition flattened into each daemon's clap arguments.

use crate::Endpoint;
use std::path::PathBuf;

/// `bootctld` / `rebootd`: where the state lives and where to serve.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// State dir (the guest's /state). Missing: RAM-only stub (nothing persisted).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Persist into a state dir even when it is not a mount point (host runs).
    /// By default an unmounted state dir counts as missing: in the guest it is
    /// a directory of the initramfs (RAM), and persisting there would be a lie.
    #[arg(long)]
    pub allow_unmounted_state: bool,
    /// Serve on the virtio-serial port with this name (e.g. com.nexus.bootctl).
    #[arg(long)]
    pub port_name: Option<String>,
    /// Serve on this unix socket (repeatable; the guest uses /run/<daemon>.sock).
    #[arg(long)]
    pub listen: Vec<PathBuf>,
}

/// Nothing to serve: neither a port nor a socket was given.
#[derive(Debug, thiserror::Error)]
#[error("nothing to serve: give --port-name {port} and/or --listen {socket}")]
pub struct NothingToServe {
    pub port: &'static str,
    pub socket: &'static str,
}

impl ServeArgs {
    /// The unix sockets, then the port.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self.listen.iter().cloned().map(Endpoint::Unix).collect();
        if let Some(name) = &self.port_name {
            out.push(Endpoint::Port(name.clone()));
        }
        out
    }

    /// [`ServeArgs::endpoints`], refused when empty (`port` / `socket`: the daemon's
    /// defaults, named in the error).
    pub fn endpoints_required(
        &self,
        port: &'static str,
        socket: &'static str,
    ) -> Result<Vec<Endpoint>, NothingToServe> {
        let e = self.endpoints();
        if e.is_empty() {
            return Err(NothingToServe { port, socket });
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_and_endpoints() {
        let c = Cli::parse_from(["x", "--listen", "/run/a.sock", "--port-name", "com.x"]);
        let e = c.serve.endpoints();
        assert_eq!(
            e,
            [
                Endpoint::Unix("/run/a.sock".into()),
                Endpoint::Port("com.x".into())
            ]
        );
        let c = Cli::parse_from(["x"]);
        let err = c
            .serve
            .endpoints_required("com.x", "/run/x.sock")
            .unwrap_err();
        assert!(err.to_string().contains("--port-name com.x"));
    }
}
