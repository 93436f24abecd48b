//! `nx image keygen`: make an Ed25519 key pair for signing images.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use proto::image::{encode_public_key, encode_secret_key, public_key_of};

use super::exit;

/// Arguments of `nx image keygen`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Make an Ed25519 key pair for signing images. Writes the secret key to KEY \
        (mode 0600) and the public key to KEY.pub (mode 0644). Both are one line of text:\n  \
        nexus-ed25519-secret-v1 <64 hex digits: the 32-byte seed>\n  \
        nexus-ed25519-public-v1 <64 hex digits: the 32-byte public key>\n\
        The seed comes from the operating system's random number generator. Existing files are \
        never overwritten unless --force is given.",
    after_help = "Examples:\n  \
        nx image keygen --out keys/release\n  \
        nx image build --rootfs rootfs/ --version 1 --out os.img --sign keys/release\n  \
        nx image verify os.img --pub keys/release.pub"
)]
pub struct KeygenArgs {
    /// Secret key path; the public key goes to the same path plus `.pub`.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,
    /// Overwrite KEY and KEY.pub if they exist.
    #[arg(long)]
    force: bool,
}

/// The public key path for a secret key path (`KEY` → `KEY.pub`).
pub fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// Write `text` to `path` atomically (temp file beside it + rename) with `mode`.
fn write_atomic(path: &Path, text: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // NamedTempFile is created with mode 0600, so the secret is never readable by others.
    let mut tmp = tempfile::Builder::new()
        .prefix(".nx-key.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    let persisted = if force {
        tmp.persist(path).map(|_| ())
    } else {
        tmp.persist_noclobber(path).map(|_| ())
    };
    persisted.map_err(|e| e.error).with_context(|| {
        if path.exists() && !force {
            format!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            )
        } else {
            format!("cannot write {}", path.display())
        }
    })
}

/// Run `nx image keygen`.
pub fn run(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let pub_path = public_path(&args.out);
    if !args.force {
        for p in [&args.out, &pub_path] {
            if p.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists; pass --force to overwrite it",
                    p.display()
                );
            }
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("cannot get random bytes from the OS: {e}"))?;
    let public = public_key_of(&seed);
    write_atomic(&args.out, &encode_secret_key(&seed), 0o600, args.force)?;
    write_atomic(&pub_path, &encode_public_key(&public), 0o644, args.force)?;
    seed.fill(0);
    say!(
        "wrote secret key {} (mode 0600, keep it private)",
        args.out.display()
    );
    say!("wrote public key {}", pub_path.display());
    say!("public key {}", hex::encode(public));
    Ok(ExitCode::from(exit::OK))
}
