//! Cap'n Proto RPC clients of the guest daemons: `bootctld` (`nx boot …`) and
//! `rebootd` (`nx flash reboot …`).
//!
//! The port is any `--port` SPEC of [`crate::transport`] (nx-cli's `target` module resolves
//! the default: the QEMU chardev sockets `bootctl.sock` / `reboot.sock`, which
//! QEMU wires to the virtio-serial ports `com.nexus.bootctl` /
//! `com.nexus.reboot`). One connection per command: connect, bootstrap the
//! capability, make the call(s), close.
//!
//! RPC bytes travel framed (`proto::rpc::link`): a virtio-serial port has no
//! reliable connection boundaries, so each connection is a session of its own
//! and stale bytes of an earlier one are dropped on both sides. The daemons
//! also accept framed connections on their unix sockets.
//!
//! Every connection starts with the identification probe ([`transport::connect_to`]): the
//! wrong daemon on the port fails at once ("this port is flashd, not rebootd: use …").
//! Failure messages say what to do: no socket → "is QEMU running? start
//! it with `just recovery`"; socket there but no answer (the daemon is not up
//! in the guest) → a timeout naming the daemon; a refused call → the daemon's
//! own reason ([`RpcError`]).

use crate::transport::{self, PortSpec, PortSpecError, TransportError};
use capnp::capability::FromClientHook;
use nx_rpc::{rpc_error_text, FramedError};
use std::future::Future;
use std::time::Duration;

/// Default time to wait for a daemon's answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a call to a guest daemon failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("bad --port `{port}` for {daemon}")]
    BadPort {
        port: String,
        daemon: Daemon,
        #[source]
        source: PortSpecError,
    },
    #[error("cannot reach {daemon}")]
    Unreachable {
        daemon: Daemon,
        #[source]
        source: TransportError,
    },
    #[error(
        "no answer from {daemon} on {spec} within {secs} s: the port is open but nobody answered — \
         is {daemon} running in the guest? (check the console log for `{daemon}: ready`)"
    )]
    Timeout {
        daemon: Daemon,
        spec: String,
        secs: u64,
    },
    #[error(
        "{daemon} on {spec} closed the connection ({text}): is {daemon} running in the guest?"
    )]
    Disconnected {
        daemon: Daemon,
        spec: String,
        text: String,
    },
    #[error("{daemon}: {text}")]
    Refused { daemon: Daemon, text: String },
    #[error(
        "{daemon} on {spec} closed the connection before answering{why}: is {daemon} running in the guest?"
    )]
    Closed {
        daemon: Daemon,
        spec: String,
        /// ` (the reason)` or empty.
        why: String,
    },
    #[error("unknown reboot target `{0}`: use `normal` or `recovery`")]
    BadRebootTarget(String),
}

/// Which daemon a call goes to (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// bootctld, the slot-state authority.
    Bootctld,
    /// rebootd, the next-boot authority.
    Rebootd,
}

impl Daemon {
    fn name(self) -> &'static str {
        self.ident().name()
    }

    /// The daemon as the identification probe names it ([`proto::ident`]).
    pub fn ident(self) -> transport::Daemon {
        match self {
            Daemon::Bootctld => transport::Daemon::Bootctld,
            Daemon::Rebootd => transport::Daemon::Rebootd,
        }
    }
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Connect to `port`, bootstrap a `C` (the daemon's capability), run `call`
/// with it and return its result; the whole conversation is bounded by `timeout`.
pub async fn with_client<C, F, Fut, T>(
    port: &str,
    daemon: Daemon,
    timeout: Duration,
    call: F,
) -> Result<T, RpcError>
where
    C: FromClientHook,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    let spec: PortSpec = port.parse().map_err(|source| RpcError::BadPort {
        port: port.to_string(),
        daemon,
        source,
    })?;
    let link = transport::connect_to(&spec, daemon.ident())
        .await
        .map_err(|source| RpcError::Unreachable { daemon, source })?;
    let spec = spec.to_string();
    match nx_rpc::call_framed(link, timeout, call).await {
        Err(FramedError::Timeout { secs }) => Err(RpcError::Timeout { daemon, spec, secs }),
        Ok(v) => Ok(v),
        Err(FramedError::Call(e)) => match e.kind {
            capnp::ErrorKind::Disconnected => Err(RpcError::Disconnected {
                daemon,
                spec,
                text: rpc_error_text(&e),
            }),
            _ => Err(RpcError::Refused {
                daemon,
                text: rpc_error_text(&e),
            }),
        },
        Err(FramedError::Closed(why)) => Err(RpcError::Closed {
            daemon,
            spec,
            why: why.map(|w| format!(" ({w})")).unwrap_or_default(),
        }),
    }
}

/// `nx flash reboot normal|recovery`: ask rebootd on `port` to persist the
/// next-boot mode and reboot the guest. Returns `true` when the guest really
/// reboots, `false` when rebootd could only do a stub reboot (not managed by
/// the guest's PID 1). Fails (and nothing is changed) when `target` is not
/// `normal` or `recovery`, when rebootd is not reachable, or when it cannot
/// persist the record (no /state in the guest).
pub async fn reboot(port: &str, target: &str) -> Result<bool, RpcError> {
    reboot_with_timeout(port, target, DEFAULT_TIMEOUT).await
}

/// [`reboot`] with an explicit timeout.
pub async fn reboot_with_timeout(
    port: &str,
    target: &str,
    timeout: Duration,
) -> Result<bool, RpcError> {
    let Some(target) = nx_contract::NextBoot::parse(target) else {
        return Err(RpcError::BadRebootTarget(target.to_string()));
    };
    with_client(
        port,
        Daemon::Rebootd,
        timeout,
        |c: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = c.mode_request();
            req.get().set_target(target.into());
            let resp = req.send().promise.await?;
            Ok(resp.get()?.get_rebooting())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_says_start_the_guest() {
        let err = reboot("unix:/nonexistent/reboot.sock", "normal")
            .await
            .unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(msg.contains("cannot reach rebootd"), "{msg}");
        assert!(msg.contains("no such file"), "{msg}");
        assert!(msg.contains("just recovery"), "{msg}");
    }

    #[tokio::test]
    async fn bad_target_is_refused_before_connecting() {
        let err = reboot("unix:/nonexistent/reboot.sock", "sideways")
            .await
            .unwrap_err();
        assert!(crate::error_chain(&err).contains("use `normal` or `recovery`"));
    }

    #[tokio::test]
    async fn silent_port_times_out_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let hold = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let port = format!("unix:{}", sock.display());
        let err = reboot_with_timeout(&port, "normal", Duration::from_millis(300))
            .await
            .unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(msg.contains("no answer from rebootd"), "{msg}");
        hold.abort();
    }
}
