//! `nx image inspect`: show what an image holds, from its head only (no data pass).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use proto::image::{Header, ImageError, ImageHead, HEADER_LEN};

use super::{exit, human_bytes, percent, read_full};

/// Arguments of `nx image inspect`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Show what an image holds: version, size, signed or not, and each segment's \
        offset, size, sha256, data_sha256 (the SHA-256 of its data ranges only, which a target \
        checks without hashing the zero runs) and data ratio (the share of non-zero 4 KiB \
        blocks; zero runs are never sent when flashing). Reads and strictly checks only the head (header + manifest); \
        use `nx image verify` to check the data.\n\n\
        --json prints one JSON object: {\"path\", \"format\", \"version\", \
        \"security_version\", \"total_size\", \
        \"file_size\", \"data_offset\", \"signed\", \"manifest_id\", \"image_sha256\", \
        \"data_bytes\", \"segments\": [{\"name\", \"offset\", \"size\", \"sha256\", \
        \"data_sha256\", \"chunk_sha256\", \"data_bytes\", \"data_ranges\"}], \"verity\": [{\"data\", \
        \"hash\", \"salt\", \"root_hash\"}]} where data_ranges is the number of ranges and \
        chunk_sha256 the list of per-piece hashes (one per 1 MiB piece holding data, which a \
        target checks before writing the piece).\n\n\
        Exit codes: 0 ok; 1 I/O error; 2 usage; 3 the head is malformed.",
    after_help = "Examples:\n  \
        nx image inspect build/nexus-os.img\n  \
        nx image inspect build/nexus-os.img --json | jq '.segments[].sha256'"
)]
pub struct InspectArgs {
    /// Image file to inspect.
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Read and strictly parse the head of the image at `path`. Returns the head and the file
/// length; `Ok(Err(_))` when the file is readable but its head is invalid.
pub fn read_head(path: &Path) -> anyhow::Result<(Result<ImageHead, ImageError>, u64)> {
    let mut f =
        File::open(path).with_context(|| format!("cannot open image {}", path.display()))?;
    let file_len = f
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let io_ctx = || format!("cannot read image {}", path.display());
    let mut buf = vec![0u8; HEADER_LEN];
    let n = read_full(&mut f, &mut buf).with_context(io_ctx)?;
    let header = match Header::parse(&buf[..n]) {
        Ok(h) => h,
        Err(e) => return Ok((Err(e), file_len)),
    };
    if file_len < header.data_offset {
        return Ok((
            Err(ImageError::HeadTruncated {
                len: file_len,
                data_offset: header.data_offset,
            }),
            file_len,
        ));
    }
    buf.resize(header.data_offset as usize, 0);
    f.read_exact(&mut buf[HEADER_LEN..]).with_context(io_ctx)?;
    Ok((ImageHead::parse(&buf), file_len))
}

/// Run `nx image inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let (head, file_len) = read_head(&args.path)?;
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            eprintln!("nx: inspect failed: {e}");
            return Ok(ExitCode::from(exit::VERIFY_FAILED));
        }
    };
    let m = &head.manifest;
    if args.json {
        let segments: Vec<serde_json::Value> = m
            .segments
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "offset": s.offset,
                    "size": s.size,
                    "sha256": hex::encode(s.sha256),
                    "data_sha256": hex::encode(s.data_sha256),
                    "chunk_sha256": s.chunk_sha256.iter().map(hex::encode).collect::<Vec<_>>(),
                    "data_bytes": s.data_bytes(),
                    "data_ranges": s.data_ranges.len(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "path": args.path.display().to_string(),
            "format": m.format,
            "version": m.version,
            "security_version": m.security_version,
            "total_size": m.total_size,
            "file_size": file_len,
            "data_offset": head.header.data_offset,
            "signed": head.is_signed(),
            "manifest_id": hex::encode(m.id()),
            "image_sha256": hex::encode(m.image_sha256),
            "data_bytes": m.data_bytes(),
            "segments": segments,
            "verity": m.verity.iter().map(|v| serde_json::json!({
                "data": v.data,
                "hash": v.hash,
                "salt": hex::encode(&v.salt),
                "root_hash": hex::encode(v.root_hash),
            })).collect::<Vec<_>>(),
        });
        say!("{v}");
        return Ok(size_verdict(file_len, m.total_size));
    }
    say!("image        {}", args.path.display());
    say!("format       {}", m.format);
    say!("version      {}", m.version);
    say!(
        "security     version {} (anti-rollback)",
        m.security_version
    );
    say!(
        "size         {} bytes ({})",
        m.total_size,
        human_bytes(m.total_size)
    );
    if file_len != m.total_size {
        say!("WARNING      the file is {file_len} bytes, the manifest says {}: truncated or extended", m.total_size);
    }
    say!(
        "signed       {}",
        if head.is_signed() {
            "yes (check with: nx image verify PATH --pub KEY.pub)"
        } else {
            "no"
        }
    );
    say!("manifest id  {}", hex::encode(m.id()));
    say!("image sha256 {}", hex::encode(m.image_sha256));
    for v in &m.verity {
        say!(
            "dm-verity    {} protected by {} (root hash {}, salt {} bytes)",
            v.data,
            v.hash,
            hex::encode(v.root_hash),
            v.salt.len()
        );
    }
    let content: u64 = m.segments.iter().map(|s| s.size).sum();
    say!(
        "data         {} of {} segment bytes non-zero ({:.1}%)",
        m.data_bytes(),
        content,
        percent(m.data_bytes(), content)
    );
    say!("segments     {}", m.segments.len());
    say!(
        "  {:<12} {:>12} {:>12} {:>6} {:>7}  sha256",
        "name",
        "offset",
        "size",
        "data%",
        "ranges"
    );
    for s in &m.segments {
        say!(
            "  {:<12} {:>12} {:>12} {:>6.1} {:>7}  {}",
            s.name,
            s.offset,
            s.size,
            percent(s.data_bytes(), s.size),
            s.data_ranges.len(),
            hex::encode(s.sha256)
        );
    }
    say!("data sha256  (SHA-256 of the data ranges only, zero runs skipped)");
    for s in &m.segments {
        say!("  {:<12} {}", s.name, hex::encode(s.data_sha256));
    }
    say!("chunk sha256 (one SHA-256 per 1 MiB piece holding data, checked piece by piece)");
    for s in &m.segments {
        say!("  {:<12} {} pieces", s.name, s.chunk_sha256.len());
    }
    Ok(size_verdict(file_len, m.total_size))
}

/// Exit 0, or 3 (verification failed) with an error line when the file is not as long as its
/// manifest says: a truncated image is a bad image, whatever else it shows.
fn size_verdict(file_len: u64, total_size: u64) -> ExitCode {
    if file_len == total_size {
        return ExitCode::from(exit::OK);
    }
    eprintln!(
        "nx: error: the file is {file_len} bytes, the manifest says {total_size}: truncated or \
         extended (a bad image; rebuild or copy it again)"
    );
    ExitCode::from(exit::VERIFY_FAILED)
}
