//! `nx flash info` (INFO? → INFO_REPLY) and `nx flash verify` (the image file checked
//! locally, then compared with what the target says is installed).

use super::image_file::{ImageFile, LocalCheck};
use super::{exit, InfoArgs, VerifyArgs};
use crate::transport::{self, PortSpec};
use anyhow::{bail, Context};
use futures::StreamExt;
use proto::frame::codec::{FrameCodec, Incoming};
use proto::msg::{InfoReply, Message};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

/// How long `info`/`verify` wait for the answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Ask the target for its INFO_REPLY.
pub async fn query_info(port: &PortSpec, timeout: Duration) -> anyhow::Result<InfoReply> {
    let link = transport::connect(port).await?;
    let (rd, mut wr) = tokio::io::split(link);
    let frame = Message::Info.to_frame().context("cannot encode INFO?")?;
    wr.write_all(&frame.to_bytes())
        .await
        .with_context(|| format!("cannot send INFO? to {port}"))?;
    let mut frames = FramedRead::new(rd, FrameCodec::new());
    let answer = tokio::time::timeout(timeout, async {
        while let Some(f) = frames.next().await {
            match f {
                Ok(Incoming::Frame(f)) => match Message::from_frame(&f) {
                    Ok(Message::InfoReply(r)) => return Ok(r),
                    Ok(Message::Error(e)) => {
                        bail!("the target answered with error {}: {}", e.code, e.text)
                    }
                    Ok(_) => continue,
                    Err(e) => bail!("undecodable answer from the target: {e}"),
                },
                Ok(Incoming::Skipped { .. }) => continue,
                Err(e) => bail!("link: {e}"),
            }
        }
        bail!("the target closed the connection without answering")
    })
    .await;
    match answer {
        Ok(r) => r,
        Err(_) => bail!(
            "no answer from {port} within {} s: is flashd running on the target?",
            timeout.as_secs()
        ),
    }
}

fn info_json(r: &InfoReply) -> serde_json::Value {
    json!({
        "device": r.device,
        "info": r.info,
        "proto": r.proto,
        "max_window": r.max_window,
        "max_chunk": r.max_chunk,
        "zstd": r.compression & proto::msg::COMPRESS_ZSTD != 0,
        "installed": r.installed.as_ref().map(|i| json!({
            "version": i.version,
            "image_id": hex::encode(i.image_id),
            "image_sha256": hex::encode(i.image_sha256),
            "size": i.total_size,
        })),
        "staged": r.transfer.as_ref().map(|t| json!({
            "image_id": hex::encode(t.image_id),
            "chunk_size": t.chunk_size,
            "chunks_held": t.next_seq,
            "chunks": t.plan_chunks,
            "verified_segments_mask": t.verified,
        })),
    })
}

/// `nx flash info`.
pub async fn run_info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let r = match query_info(&a.port, QUERY_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nx: error: {e:#}");
            return Ok(ExitCode::from(exit::LINK_LOST));
        }
    };
    if a.json {
        println!("{}", info_json(&r));
        return Ok(ExitCode::SUCCESS);
    }
    println!("device:    {} ({})", r.device, r.info);
    println!(
        "limits:    window {}, chunk {} KiB, zstd {}",
        r.max_window,
        r.max_chunk / 1024,
        if r.compression & proto::msg::COMPRESS_ZSTD != 0 {
            "yes"
        } else {
            "no"
        }
    );
    match &r.installed {
        Some(i) => println!(
            "installed: version {} ({} bytes), image sha256 {}",
            i.version,
            i.total_size,
            hex::encode(i.image_sha256)
        ),
        None => println!("installed: nothing"),
    }
    match &r.transfer {
        Some(t) => println!(
            "staged:    image {} — {}/{} chunks of {} KiB held (resumable)",
            &hex::encode(t.image_id)[..16],
            t.next_seq,
            t.plan_chunks,
            t.chunk_size / 1024
        ),
        None => println!("staged:    nothing"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `nx flash verify IMG`.
pub async fn run_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let img = match ImageFile::open(&a.image) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            eprintln!("nx: error: {e}");
            return Ok(ExitCode::from(exit::IMAGE_INVALID));
        }
    };
    // 1. The file itself: every segment hash, padding and data range.
    let check = LocalCheck::start(img.clone())?;
    let mut rx = check.subscribe();
    let st = rx
        .wait_for(|s| s.done || s.error.is_some())
        .await
        .map(|s| s.clone())
        .context("image check stopped")?;
    if let Some(err) = st.error {
        eprintln!("nx: error: image {} is invalid: {err}", a.image.display());
        return Ok(ExitCode::from(exit::IMAGE_INVALID));
    }
    // 2. What the target holds.
    let r = match query_info(&a.port, QUERY_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nx: error: {e:#}");
            return Ok(ExitCode::from(exit::LINK_LOST));
        }
    };
    let m = img.manifest();
    let id = m.id();
    let matches = r
        .installed
        .as_ref()
        .is_some_and(|i| i.image_id == id && i.image_sha256 == m.image_sha256);
    let deep = "stub/placeholder: the target did not re-read its install (proto 1 has no \
                VERIFY request); flashd verified every byte against this manifest when it installed it";
    if a.json {
        println!(
            "{}",
            json!({
                "image": a.image.display().to_string(),
                "image_ok": true,
                "image_id": hex::encode(id),
                "version": m.version,
                "installed_matches": matches,
                "target": info_json(&r),
                "target_reread": deep,
            })
        );
    } else if matches {
        println!(
            "nx: {} (version {}) is intact and is what {} has installed",
            a.image.display(),
            m.version,
            r.device
        );
        println!("nx: {deep}");
    } else {
        let what = r
            .installed
            .as_ref()
            .map(|i| {
                format!(
                    "version {} (image sha256 {})",
                    i.version,
                    hex::encode(i.image_sha256)
                )
            })
            .unwrap_or_else(|| "nothing".to_string());
        eprintln!(
            "nx: {} has {what} installed, not {} (version {}, image sha256 {})",
            r.device,
            a.image.display(),
            m.version,
            hex::encode(m.image_sha256)
        );
    }
    Ok(ExitCode::from(if matches {
        exit::OK
    } else {
        exit::TARGET_REFUSED
    }))
}
