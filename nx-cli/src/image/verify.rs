//! `nx image verify`: parse the head strictly, check the signature, recompute every segment
//! hash (sha256 and data_sha256), data ranges and padding while streaming the file once.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use proto::image::{decode_public_key, Header, ImageError, ImageHead, ImageVerifier, HEADER_LEN};
use proto::manifest::Segment;

use super::{exit, human_bytes, read_full, read_small_text, CHUNK};

/// Arguments of `nx image verify`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Verify an image file: strict header and manifest checks, every segment's \
        SHA-256, its data ranges (no non-zero byte outside them), its data_sha256 (the SHA-256 \
        of the data ranges only, what a target checks) and zero padding, the whole-image hash, the file size, and the Ed25519 signature when --pub is given.\n\n\
        On a mismatch the message names the segment, e.g.\n  \
        nx: verify failed: segment \"rootfs\": sha256 mismatch (expected …, got …)\n\n\
        Exit codes: 0 ok; 1 I/O error or unreadable key; 2 usage; 3 verification failed \
        (malformed, truncated, sha256/data_sha256/padding/data-range mismatch, or an image of \
        an older format: rebuild it with `nx image build`); 4 signature check failed \
        (--pub given and the image is unsigned, signed by another key, or altered).",
    after_help = "Examples:\n  \
        nx image verify build/nexus-os.img\n  \
        nx image verify build/nexus-os.img --pub keys/release.pub"
)]
pub struct VerifyArgs {
    /// Image file to verify.
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Require a valid signature by this public key (KEY.pub from `nx image keygen`).
    #[arg(long = "pub", value_name = "KEY.pub")]
    public_key: Option<PathBuf>,
}

/// State of the signature after a successful verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No signature in the image (and none required).
    Unsigned,
    /// Signed, but no public key was given.
    NotChecked,
    /// Signed and verified with the given key.
    Verified,
}

/// Result of a verification that could read the file.
#[derive(Debug)]
pub enum Verdict {
    /// Every check passed.
    Ok {
        /// The parsed head.
        head: Box<ImageHead>,
        /// Signature state.
        signature: SignatureStatus,
    },
    /// The image is malformed or its content does not match (exit 3).
    Invalid(ImageError),
    /// The signature check required by a public key failed (exit 4).
    Signature(ImageError),
}

/// Verify the image at `path`. `on_segment` is called after each segment's content checks out.
/// `Err` means the file could not be read (I/O); verification failures are in the [`Verdict`].
pub fn verify_file(
    path: &Path,
    public_key: Option<&[u8; 32]>,
    mut on_segment: impl FnMut(&Segment),
) -> anyhow::Result<Verdict> {
    let mut f =
        File::open(path).with_context(|| format!("cannot open image {}", path.display()))?;
    let file_len = f
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let io_ctx = || format!("cannot read image {}", path.display());

    let mut hbuf = vec![0u8; HEADER_LEN];
    let n = read_full(&mut f, &mut hbuf).with_context(io_ctx)?;
    let header = match Header::parse(&hbuf[..n]) {
        Ok(h) => h,
        Err(e) => return Ok(Verdict::Invalid(e)),
    };
    if file_len < header.data_offset {
        return Ok(Verdict::Invalid(ImageError::HeadTruncated {
            len: file_len,
            data_offset: header.data_offset,
        }));
    }
    // data_offset <= MAX_HEAD_LEN was checked by Header::parse.
    let mut head_bytes = hbuf;
    head_bytes.resize(header.data_offset as usize, 0);
    f.read_exact(&mut head_bytes[HEADER_LEN..])
        .with_context(io_ctx)?;
    let head = match ImageHead::parse(&head_bytes) {
        Ok(h) => h,
        Err(e) => return Ok(Verdict::Invalid(e)),
    };
    drop(head_bytes);

    let signature = match (public_key, head.is_signed()) {
        (Some(key), _) => match head.verify_signature(key) {
            Ok(()) => SignatureStatus::Verified,
            Err(e) => return Ok(Verdict::Signature(e)),
        },
        (None, true) => SignatureStatus::NotChecked,
        (None, false) => SignatureStatus::Unsigned,
    };

    let m = &head.manifest;
    if file_len < m.total_size {
        let seg = m
            .segments
            .iter()
            .find(|s| s.padded_end() > file_len)
            .map_or_else(String::new, |s| s.name.clone());
        return Ok(Verdict::Invalid(ImageError::Truncated {
            segment: seg,
            at: file_len,
            total_size: m.total_size,
        }));
    }
    if file_len > m.total_size {
        return Ok(Verdict::Invalid(ImageError::TrailingData {
            total_size: m.total_size,
        }));
    }

    f.seek(SeekFrom::Start(header.data_offset))
        .with_context(io_ctx)?;
    let mut v = ImageVerifier::new(m);
    let mut buf = vec![0u8; CHUNK];
    let mut reported = 0;
    loop {
        let n = read_full(&mut f, &mut buf).with_context(io_ctx)?;
        if n == 0 {
            break;
        }
        if let Err(e) = v.update(&buf[..n]) {
            return Ok(Verdict::Invalid(e));
        }
        while reported < v.verified_segments() {
            if let Some(s) = m.segments.get(reported) {
                on_segment(s);
            }
            reported += 1;
        }
    }
    if let Err(e) = v.finish() {
        return Ok(Verdict::Invalid(e));
    }
    Ok(Verdict::Ok {
        head: Box::new(head),
        signature,
    })
}

/// Run `nx image verify`.
pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = match &args.public_key {
        Some(p) => {
            let text = read_small_text(p, 4096, "public key")?;
            Some(decode_public_key(&text).with_context(|| format!("public key {}", p.display()))?)
        }
        None => None,
    };
    let verdict = verify_file(&args.path, key.as_ref(), |s| {
        say!(
            "segment {:<12} ok  {:>12} bytes  sha256 {}",
            s.name,
            s.size,
            hex::encode(s.sha256)
        );
    })?;
    match verdict {
        Verdict::Ok { head, signature } => {
            let m = &head.manifest;
            let sig = match signature {
                SignatureStatus::Unsigned => "unsigned".to_string(),
                SignatureStatus::NotChecked => {
                    "signed, signature not checked (pass --pub)".to_string()
                }
                SignatureStatus::Verified => format!(
                    "signature ok ({})",
                    args.public_key
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            };
            say!("image sha256 {}", hex::encode(m.image_sha256));
            say!("{sig}");
            say!(
                "verify ok: {} (version {}, {}, {})",
                args.path.display(),
                m.version,
                crate::plural(m.segments.len() as u64, "segment"),
                human_bytes(m.total_size)
            );
            Ok(ExitCode::from(exit::OK))
        }
        Verdict::Invalid(e) => {
            eprintln!("nx: verify failed: {e}");
            Ok(ExitCode::from(exit::VERIFY_FAILED))
        }
        Verdict::Signature(e) => {
            let hint = match e {
                ImageError::Unsigned => {
                    " (--pub was given, so a signature is required; rebuild with --sign KEY)"
                }
                _ => "",
            };
            eprintln!("nx: signature check failed: {e}{hint}");
            Ok(ExitCode::from(exit::SIGNATURE_FAILED))
        }
    }
}
