//! `nx flash plan IMG`: before anything is sent, what the target holds, what a transfer would
//! skip, patch, compress and send, the bytes on the wire and an ETA from the measured link.
//! The numbers come from the code `nx flash send` runs (`nx_engine::delta::estimate`).

use super::exit;
use anyhow::Context as _;
use nx_engine::delta::{self, Bases};
use nx_engine::image_file::ImageFile;
use nx_engine::query::{query_info, QUERY_TIMEOUT};
use nx_engine::transport::PortSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `nx flash plan`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  nx flash plan build/nexus-os-v2.img\n  nx flash plan os.img --port serial:/dev/ttyUSB0@115200 --base os-1.img --json"
)]
pub struct PlanArgs {
    /// The image that would be sent.
    pub image: PathBuf,
    /// The target (as for `nx flash send`).
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Flashd), value_name = "PORT")]
    pub port: PortSpec,
    /// An image the target may be running (repeatable; as for `nx flash send`).
    #[arg(long, value_name = "IMG")]
    pub base: Vec<PathBuf>,
    /// Do not look beside IMAGE for base images.
    #[arg(long)]
    pub no_base_search: bool,
    /// Chunk size to plan with (default: what `nx flash send` asks for, capped by the target).
    #[arg(long, value_name = "SIZE", value_parser = super::parse_chunk_arg)]
    pub chunk: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Link rates measured by earlier transfers, per port (`nx flash send` records them).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Rates {
    ports: BTreeMap<String, Rate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rate {
    /// Wire bytes per second of the last transfer.
    bytes_per_s: f64,
    /// When (seconds since the epoch).
    at: u64,
}

/// Where the rates are kept: `$NX_CACHE_DIR`, else `$XDG_CACHE_HOME/nx`, else `~/.cache/nx`.
fn rates_path() -> Option<PathBuf> {
    let dir = std::env::var_os("NX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("nx")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nx")))?;
    Some(dir.join("links.json"))
}

fn load_rates() -> Rates {
    rates_path()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| b.len() < 1 << 20)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Remember the wire rate of a finished transfer to `port` (best effort: a host without a
/// writable cache directory just plans without it).
pub fn record_rate(port: &str, wire_bytes: u64, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    if wire_bytes < 64 * 1024 || secs <= 0.0 {
        return; // too little to say anything about the link
    }
    let Some(path) = rates_path() else { return };
    let mut r = load_rates();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    r.ports.insert(
        port.to_string(),
        Rate {
            bytes_per_s: wire_bytes as f64 / secs,
            at,
        },
    );
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let Ok(json) = serde_json::to_vec_pretty(&r) else {
        return;
    };
    if let Ok(mut t) = tempfile::NamedTempFile::new_in(dir) {
        use std::io::Write as _;
        if t.write_all(&json).is_ok() {
            let _ = t.persist(&path);
        }
    }
}

/// The link rate to plan with, and where it came from.
fn link_rate(port: &PortSpec) -> (Option<f64>, String) {
    if let PortSpec::Serial { baud, .. } = port {
        // 8N1: ten bits on the line per byte.
        return (Some(f64::from(*baud) / 10.0), format!("{baud} baud (8N1)"));
    }
    match load_rates().ports.get(&port.to_string()) {
        Some(r) => (
            Some(r.bytes_per_s),
            "measured by the last transfer to this port".to_string(),
        ),
        None => (
            None,
            "not measured yet: one `nx flash send` to this port measures it".to_string(),
        ),
    }
}

/// `nx flash plan`; returns the exit code.
pub fn run(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let img = match ImageFile::open(&a.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("nx: error: {e}");
            return Ok(ExitCode::from(exit::IMAGE_INVALID));
        }
    };
    let bases = match Bases::discover(&img, &a.base, !a.no_base_search) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nx: error: {e}");
            return Ok(ExitCode::from(exit::IMAGE_INVALID));
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let t = Instant::now();
    let info = match rt.block_on(query_info(&a.port, QUERY_TIMEOUT)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nx: error: {:#}", anyhow::Error::from(e));
            return Ok(ExitCode::from(exit::LINK_LOST));
        }
    };
    let rtt = t.elapsed();
    let m = img.manifest();
    let id = m.id();
    let unchanged = info
        .installed
        .as_ref()
        .is_some_and(|i| i.image_id == id && i.image_sha256 == m.image_sha256);
    let resumable = info.transfer.as_ref().filter(|t| t.image_id == id);
    let base_file = info.base.and_then(|b| bases.get(&b.image_id));
    let chunk = a
        .chunk
        .unwrap_or(nx_contract::defaults::CHUNK)
        .min(info.max_chunk);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let (rate, rate_src) = link_rate(&a.port);
    let level = match rate {
        Some(r) => delta::level_for(
            proto::session::CompressMode::Auto,
            (r * 10.0) as u64,
            Duration::from_secs(10),
        ),
        None => delta::QUICK_LEVEL,
    };
    let segs = if unchanged {
        Vec::new()
    } else {
        let derive = info.compression & proto::msg::COMPRESS_DERIVE != 0;
        delta::estimate(&img, base_file.as_deref(), chunk, level, derive, threads)
            .map_err(|e| anyhow::anyhow!("cannot plan {}: {e}", a.image.display()))?
    };
    let data: u64 = m.segments.iter().map(|s| s.data_bytes()).sum();
    let content: u64 = m.segments.iter().map(|s| s.size).sum();
    let wire: u64 = segs.iter().map(|s| s.wire_bytes).sum::<u64>()
        + if unchanged {
            0
        } else {
            m.total_size.saturating_sub(content).min(2 << 20)
        };
    let eta = rate.map(|r| wire as f64 / r.max(1.0) + rtt.as_secs_f64());
    let sum = |f: fn(&delta::SegmentEstimate) -> u64| segs.iter().map(f).sum::<u64>();
    if a.json {
        let v = serde_json::json!({
            "image": a.image.display().to_string(),
            "image_id": hex::encode(id),
            "version": m.version,
            "device": info.device,
            "installed": info.installed.as_ref().map(|i| serde_json::json!({
                "image_id": hex::encode(i.image_id), "version": i.version })),
            "unchanged": unchanged,
            "resumable_chunks": resumable.map(|t| t.next_seq),
            "base": info.base.map(|b| serde_json::json!({
                "image_id": hex::encode(b.image_id),
                "held": base_file.is_some(),
            })),
            "chunk_size": chunk,
            "zstd_level": level,
            "data_bytes": data,
            "zero_bytes": content.saturating_sub(data),
            "patched_bytes": sum(|s| s.patched_bytes),
            "compressed_bytes": sum(|s| s.compressed_bytes),
            "raw_bytes": sum(|s| s.raw_bytes),
            "derived_bytes": sum(|s| s.derived_bytes),
            "wire_bytes": wire,
            "segments": segs.iter().map(|s| serde_json::json!({
                "name": s.name, "data_bytes": s.data_bytes, "patched_bytes": s.patched_bytes,
                "compressed_bytes": s.compressed_bytes, "raw_bytes": s.raw_bytes,
                "derived_bytes": s.derived_bytes,
                "wire_bytes": s.wire_bytes })).collect::<Vec<_>>(),
            "rtt_ms": rtt.as_millis() as u64,
            "link_bytes_per_s": rate,
            "link_rate_from": rate_src,
            "eta_s": eta,
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let mb = |b: u64| {
        if b < 1_000_000 {
            format!("{:.1} kB", b as f64 / 1e3)
        } else {
            format!("{:.1} MB", b as f64 / 1e6)
        }
    };
    println!(
        "image:     {} (version {}, {})",
        a.image.display(),
        m.version,
        mb(m.total_size)
    );
    println!(
        "target:    {} on {} (round trip {} ms)",
        info.device,
        a.port,
        rtt.as_millis()
    );
    match &info.installed {
        Some(i) => println!(
            "installed: version {} (image {}…)",
            i.version,
            &hex::encode(i.image_id)[..16]
        ),
        None => println!("installed: nothing"),
    }
    if unchanged {
        println!("plan:      already installed — a send costs one round trip (state: unchanged)");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(t) = resumable {
        println!(
            "staged:    {}/{} chunks of this image held: a send resumes there",
            t.next_seq, t.plan_chunks
        );
    }
    match (info.base, &base_file) {
        (Some(b), Some(_)) => println!("base:      image {}… (the target's running image; held here): only the changes are sent", &hex::encode(b.image_id)[..16]),
        (Some(b), None) => println!("base:      image {}… (the target's running image) — not held here: pass it with --base IMG to send only the changes", &hex::encode(b.image_id)[..16]),
        (None, _) => println!("base:      none offered (nothing to patch from)"),
    }
    println!("chunks:    {} KiB, zstd level {level}", chunk / 1024);
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "segment", "data", "patched", "compressed", "derived", "raw", "on wire"
    );
    for s in &segs {
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            s.name,
            mb(s.data_bytes),
            mb(s.patched_bytes),
            mb(s.compressed_bytes),
            mb(s.derived_bytes),
            mb(s.raw_bytes),
            mb(s.wire_bytes)
        );
    }
    println!(
        "total:     {} of data ({} of zeros never sent), {} on the wire ({:.1}% of the data)",
        mb(data),
        mb(content.saturating_sub(data)),
        mb(wire),
        wire as f64 * 100.0 / data.max(1) as f64
    );
    match eta {
        Some(e) => println!(
            "eta:       {e:.1} s at {}/s ({rate_src})",
            mb(rate.unwrap_or(0.0) as u64)
        ),
        None => println!("eta:       unknown — link rate {rate_src}"),
    }
    Ok(ExitCode::SUCCESS)
}
