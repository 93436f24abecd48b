//! Asking a target what it holds: INFO? → INFO_REPLY ([`query_info`]), and checking an image
//! file against the install ([`verify_install`]: the file checked locally, then compared with
//! what the target says is installed).

use crate::image_file::{CheckError, ImageFile, ImageFileError, LocalCheck};
use crate::transport::{self, PortSpec, TransportError};
use futures::StreamExt;
use proto::frame::codec::{FrameCodec, Incoming};
use proto::msg::{ErrorCode, InfoReply, Message};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

/// How long `info`/`verify` wait for the answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a target did not answer INFO?.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("cannot encode INFO?: {0}")]
    Encode(String),
    #[error("cannot send INFO? to {port}")]
    Send {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the target answered with error {code}: {text}")]
    Remote { code: ErrorCode, text: String },
    #[error("undecodable answer from the target: {0}")]
    Undecodable(String),
    #[error("link: {0}")]
    Link(String),
    #[error("the target closed the connection without answering")]
    Closed,
    #[error("no answer from {port} within {secs} s: is flashd running on the target?")]
    Timeout { port: String, secs: u64 },
}

/// Ask the target for its INFO_REPLY.
pub async fn query_info(port: &PortSpec, timeout: Duration) -> Result<InfoReply, QueryError> {
    let link = transport::connect_to(port, transport::Daemon::Flashd).await?;
    let (rd, mut wr) = tokio::io::split(link);
    let frame = Message::Info
        .to_frame()
        .map_err(|e| QueryError::Encode(e.to_string()))?;
    wr.write_all(&frame.to_bytes())
        .await
        .map_err(|source| QueryError::Send {
            port: port.to_string(),
            source,
        })?;
    let mut frames = FramedRead::new(rd, FrameCodec::new());
    let answer = tokio::time::timeout(timeout, async {
        while let Some(f) = frames.next().await {
            match f {
                Ok(Incoming::Frame(f)) => match Message::from_frame(&f) {
                    Ok(Message::InfoReply(r)) => return Ok(r),
                    Ok(Message::Error(e)) => {
                        return Err(QueryError::Remote {
                            code: e.code,
                            text: e.text,
                        })
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(QueryError::Undecodable(e.to_string())),
                },
                Ok(Incoming::Skipped { .. }) => continue,
                Err(e) => return Err(QueryError::Link(e.to_string())),
            }
        }
        Err(QueryError::Closed)
    })
    .await;
    match answer {
        Ok(r) => r,
        Err(_) => Err(QueryError::Timeout {
            port: port.to_string(),
            secs: timeout.as_secs(),
        }),
    }
}

/// What [`verify_install`] found: the image is intact, and whether the target has exactly it
/// installed.
#[derive(Debug)]
pub struct Verified {
    pub image: Arc<ImageFile>,
    pub reply: InfoReply,
    /// The install is this image (same image id and image sha256).
    pub matches: bool,
}

/// Why [`verify_install`] could not say whether the install matches.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The image file cannot be opened or its head is bad.
    #[error(transparent)]
    Open(#[from] ImageFileError),
    /// The local check could not run.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The local check stopped without an answer.
    #[error("image check stopped")]
    CheckStopped(#[source] tokio::sync::watch::error::RecvError),
    /// The file's content does not match its manifest.
    #[error("image {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// The target did not answer.
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Check the image file at `path` (every segment hash, padding and data range), then ask the
/// target behind `port` what it has installed and compare.
pub async fn verify_install(
    path: &Path,
    port: &PortSpec,
    timeout: Duration,
) -> Result<Verified, VerifyError> {
    let img = Arc::new(ImageFile::open(path)?);
    // 1. The file itself.
    let check = LocalCheck::start(img.clone())?;
    let mut rx = check.subscribe();
    let st = rx
        .wait_for(|s| s.done || s.error.is_some())
        .await
        .map(|s| s.clone())
        .map_err(VerifyError::CheckStopped)?;
    if let Some(reason) = st.error {
        return Err(VerifyError::Invalid {
            path: path.to_path_buf(),
            reason,
        });
    }
    // 2. What the target holds.
    let reply = query_info(port, timeout).await?;
    let m = img.manifest();
    let id = m.id();
    let matches = reply
        .installed
        .as_ref()
        .is_some_and(|i| i.image_id == id && i.image_sha256 == m.image_sha256);
    Ok(Verified {
        image: img,
        reply,
        matches,
    })
}
