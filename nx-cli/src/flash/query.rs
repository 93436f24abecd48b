//! `nx flash info` (INFO? → INFO_REPLY) and `nx flash verify` (the image file checked
//! locally, then compared with what the target says is installed): the queries are
//! [`nx_engine::query`]; this module prints their answers and picks the exit code.

use super::{exit, InfoArgs, VerifyArgs};
use nx_engine::query::{query_info, verify_install, Verified, VerifyError, QUERY_TIMEOUT};
use proto::msg::InfoReply;
use serde_json::json;
use std::process::ExitCode;

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
            eprintln!("nx: error: {:#}", anyhow::Error::from(e));
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
    let Verified {
        image: img,
        reply: r,
        matches,
    } = match verify_install(&a.image, &a.port, QUERY_TIMEOUT).await {
        Ok(v) => v,
        Err(VerifyError::Open(e)) => {
            eprintln!("nx: error: {e}");
            return Ok(ExitCode::from(exit::IMAGE_INVALID));
        }
        Err(e @ VerifyError::Invalid { .. }) => {
            eprintln!("nx: error: {e}");
            return Ok(ExitCode::from(exit::IMAGE_INVALID));
        }
        Err(VerifyError::Query(e)) => {
            eprintln!("nx: error: {:#}", anyhow::Error::from(e));
            return Ok(ExitCode::from(exit::LINK_LOST));
        }
        Err(e @ (VerifyError::Check(_) | VerifyError::CheckStopped(_))) => return Err(e.into()),
    };
    let m = img.manifest();
    let id = m.id();
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
