//! Cap'n Proto RPC clients of the guest daemons: `bootctld` (`nx boot …`) and
//! `rebootd` (`nx flash reboot …`).
//!
//! The port is any `--port` SPEC of [`crate::transport`] (by default the QEMU
//! chardev sockets `build/qemu/bootctl.sock` / `build/qemu/reboot.sock`, which
//! QEMU wires to the virtio-serial ports `com.nexus.bootctl` /
//! `com.nexus.reboot`). One connection per command: connect, bootstrap the
//! capability, make the call(s), close.
//!
//! RPC bytes travel framed (`proto::rpc::link`): a virtio-serial port has no
//! reliable connection boundaries, so each connection is a session of its own
//! and stale bytes of an earlier one are dropped on both sides. The daemons
//! also accept framed connections on their unix sockets.
//!
//! Failure messages say what to do: no socket → "is the guest running? start
//! it with `just recovery`"; socket there but no answer (the daemon is not up
//! in the guest) → a timeout naming the daemon; a refused call → the daemon's
//! own reason.

use crate::transport::{self, PortSpec};
use anyhow::{anyhow, bail, Context};
use capnp::capability::FromClientHook;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::future::Either;
use proto::rpc::link;
use std::future::Future;
use std::time::Duration;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// Default `--port` of `nx boot …`.
pub const DEFAULT_BOOTCTL_PORT: &str = "unix:build/qemu/bootctl.sock";
/// Default `--port` of `nx flash reboot …`.
pub const DEFAULT_REBOOT_PORT: &str = "unix:build/qemu/reboot.sock";
/// Default time to wait for a daemon's answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for one incoming RPC message (words): 512 KiB.
const TRAVERSAL_LIMIT_WORDS: usize = 64 * 1024;

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
        match self {
            Daemon::Bootctld => "bootctld",
            Daemon::Rebootd => "rebootd",
        }
    }
}

/// The text of an RPC failure: the daemon's own reason when it refused.
pub fn rpc_error_text(e: &capnp::Error) -> String {
    match e.kind {
        capnp::ErrorKind::Failed => e
            .extra
            .strip_prefix("remote exception: ")
            .unwrap_or(&e.extra)
            .to_string(),
        _ => e.to_string(),
    }
}

/// Connect to `port`, bootstrap a `C` (the daemon's capability), run `call`
/// with it and return its result; the whole conversation is bounded by `timeout`.
pub async fn with_client<C, F, Fut, T>(
    port: &str,
    daemon: Daemon,
    timeout: Duration,
    call: F,
) -> anyhow::Result<T>
where
    C: FromClientHook,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    let name = daemon.name();
    let spec: PortSpec = port
        .parse()
        .with_context(|| format!("bad --port `{port}` for {name}"))?;
    if let PortSpec::Unix(path) = &spec {
        if !path.exists() {
            bail!(
                "{name} port {} does not exist: is the guest running? start it with `just recovery` \
                 (or pass --port)",
                path.display()
            );
        }
    }
    let link = transport::connect(&spec)
        .await
        .with_context(|| format!("cannot reach {name}: is the guest running?"))?;
    let (link_r, link_w) = tokio::io::split(link);

    // The RPC system talks to one end of an in-memory pipe; two pumps carry its
    // bytes to and from the link in frames of this connection's session.
    let session = new_session_id();
    let (rpc_end, pump_end) = tokio::io::duplex(2 * link::MAX_CHUNK);
    let (rpc_r, rpc_w) = tokio::io::split(rpc_end);
    let (pump_r, pump_w) = tokio::io::split(pump_end);
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS));
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(rpc_r.compat()),
        rpc_w.compat_write(),
        Side::Client,
        opts,
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let client: C = rpc.bootstrap(Side::Server);
    let driver = async move {
        let rpc = Box::pin(async move { rpc.await.err().map(|e| rpc_error_text(&e)) });
        let out = Box::pin(pump_out(pump_r, link_w, session));
        let inn = Box::pin(pump_in(link_r, pump_w, session));
        match futures::future::select(rpc, futures::future::select(out, inn)).await {
            Either::Left((e, _)) => e,
            Either::Right((Either::Left((r, _)), _))
            | Either::Right((Either::Right((r, _)), _)) => r.err().map(|e| e.to_string()),
        }
    };
    let call = Box::pin(call(client));
    match tokio::time::timeout(timeout, futures::future::select(call, Box::pin(driver))).await {
        Err(_) => bail!(
            "no answer from {name} on {spec} within {} s: the port is open but nobody answered — \
             is {name} running in the guest? (check the console log for `{name}: ready`)",
            timeout.as_secs()
        ),
        Ok(Either::Left((Ok(v), _))) => Ok(v),
        Ok(Either::Left((Err(e), _))) => match e.kind {
            capnp::ErrorKind::Disconnected => Err(anyhow!(
                "{name} on {spec} closed the connection ({}): is {name} running in the guest?",
                rpc_error_text(&e)
            )),
            _ => Err(anyhow!("{name}: {}", rpc_error_text(&e))),
        },
        Ok(Either::Right((why, _))) => Err(anyhow!(
            "{name} on {spec} closed the connection before answering{}: is {name} running in the guest?",
            why.map(|w| format!(" ({w})")).unwrap_or_default()
        )),
    }
}

/// A random session id for one connection (see `proto::rpc::link`).
fn new_session_id() -> u32 {
    getrandom::u32().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        t ^ std::process::id().rotate_left(16)
    })
}

/// RPC bytes → framed chunks on the link.
async fn pump_out<R, W>(mut from_rpc: R, mut link_w: W, session: u32) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; link::MAX_CHUNK];
    let mut seq = 0u32;
    loop {
        let n = from_rpc.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(n + 32);
        link::encode(session, seq, &buf[..n], &mut frame)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        seq = seq.wrapping_add(1);
        link_w.write_all(&frame).await?;
        link_w.flush().await?;
    }
}

/// Framed chunks of our session on the link → RPC bytes; everything else
/// (stale replies of an earlier connection, noise) is dropped.
async fn pump_in<R, W>(mut link_r: R, mut to_rpc: W, session: u32) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut dec = link::LinkDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = link_r.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the port closed",
            ));
        }
        dec.push(&buf[..n]);
        while let Some(event) = dec.next_event() {
            if let link::Event::Chunk(c) = event {
                if c.session == session {
                    to_rpc.write_all(&c.data).await?;
                }
            }
        }
    }
}

/// `nx flash reboot normal|recovery`: ask rebootd on `port` to persist the
/// next-boot mode and reboot the guest. Returns `true` when the guest really
/// reboots, `false` when rebootd could only do a stub reboot (not managed by
/// the guest's PID 1). Fails (and nothing is changed) when `target` is not
/// `normal` or `recovery`, when rebootd is not reachable, or when it cannot
/// persist the record (no /state in the guest).
pub async fn reboot(port: &str, target: &str) -> anyhow::Result<bool> {
    reboot_with_timeout(port, target, DEFAULT_TIMEOUT).await
}

/// [`reboot`] with an explicit timeout.
pub async fn reboot_with_timeout(
    port: &str,
    target: &str,
    timeout: Duration,
) -> anyhow::Result<bool> {
    if !matches!(target, "normal" | "recovery") {
        bail!("unknown reboot target `{target}`: use `normal` or `recovery`");
    }
    let target = target.to_string();
    with_client(
        port,
        Daemon::Rebootd,
        timeout,
        |c: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = c.mode_request();
            req.get().set_target(target.as_str());
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
        let msg = format!("{err:#}");
        assert!(msg.contains("is the guest running?"), "{msg}");
        assert!(msg.contains("just recovery"), "{msg}");
    }

    #[tokio::test]
    async fn bad_target_is_refused_before_connecting() {
        let err = reboot("unix:/nonexistent/reboot.sock", "sideways")
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("use `normal` or `recovery`"));
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
        let msg = format!("{err:#}");
        assert!(msg.contains("no answer from rebootd"), "{msg}");
        hold.abort();
    }
}
