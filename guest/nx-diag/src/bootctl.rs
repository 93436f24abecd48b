//! bootctld's JSON view for the bundle: `exportJson()` over the guest-local socket
//! (raw two-party Cap'n Proto, the way `bootctld::client` talks; this crate cannot depend on
//! bootctld/rebootd because rebootd serves bundles through this crate).

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::future::Either;
use proto::rpc::bootctl_capnp::boot_ctl;
use std::path::Path;
use std::time::Duration;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// Largest JSON view kept.
pub const MAX_JSON: usize = 16 * 1024;

/// bootctld's view as the bundle records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// The JSON text bootctld answered, and where it came from.
    Json { text: String, source: String },
    /// Why there is none.
    Unavailable(String),
}

/// Ask the bootctld at `sock` for its JSON view (bounded in time and size). Never fails:
/// an error becomes [`View::Unavailable`] with the reason. Runs on any tokio runtime
/// (no `LocalSet` needed).
pub async fn fetch(sock: &Path, timeout: Duration) -> View {
    match tokio::time::timeout(timeout, export_json(sock)).await {
        Err(_) => View::Unavailable(format!(
            "bootctld on {} did not answer within {} s",
            sock.display(),
            timeout.as_secs()
        )),
        Ok(Err(e)) => View::Unavailable(format!("bootctld on {}: {e}", sock.display())),
        Ok(Ok(text)) if text.len() > MAX_JSON => View::Unavailable(format!(
            "bootctld on {} sent {} bytes, more than the {MAX_JSON}-byte bound",
            sock.display(),
            text.len()
        )),
        Ok(Ok(text)) => View::Json {
            text,
            source: format!("exportJson() on {}", sock.display()),
        },
    }
}

async fn export_json(sock: &Path) -> Result<String, capnp::Error> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| capnp::Error::disconnected(format!("cannot connect ({e})")))?;
    let (r, w) = stream.into_split();
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(64 * 1024));
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r.compat()),
        w.compat_write(),
        Side::Client,
        opts,
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let client: boot_ctl::Client = rpc.bootstrap(Side::Server);
    let call = Box::pin(async move {
        let resp = client.export_json_request().send().promise.await?;
        let text = resp.get()?.get_json()?.to_string()?;
        Ok::<String, capnp::Error>(text)
    });
    match futures::future::select(call, rpc).await {
        Either::Left((r, _)) => r,
        Either::Right((r, _)) => Err(r.err().unwrap_or_else(|| {
            capnp::Error::disconnected("bootctld closed the connection".into())
        })),
    }
}
