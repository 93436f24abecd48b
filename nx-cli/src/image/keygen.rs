//! `nx image keygen`: make an Ed25519 key pair for signing images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use nx_guest::fsx::AtomicWrite;
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

/// Write `text` to `path` atomically with `mode` (the shared hardened writer: a temp file
/// beside it created `O_EXCL | O_NOFOLLOW` with that mode, fsync, rename — without `force`
/// a rename that never replaces an existing file).
fn write_atomic(path: &Path, text: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let how = AtomicWrite::new()
        .mode(mode)
        .replace(force)
        .follow_dir_symlink();
    nx_guest::fsx::write_atomic_path(path, how, text.as_bytes()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists && !force {
            anyhow::anyhow!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            )
        } else {
            // The OS's reason only: the error of the hardened writer names its temp file.
            anyhow::anyhow!(
                "cannot write {}: {}",
                path.display(),
                crate::outpath::os_reason(&e)
            )
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
    for p in [&args.out, &pub_path] {
        crate::outpath::check(p, "the key")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_written_with_their_mode_never_through_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let key = d.path().join("k");
        std::os::unix::fs::symlink(&victim, d.path().join(".k.tmp")).unwrap();
        write_atomic(&key, "secret\n", 0o600, false).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Without force an existing key stays; with force it is replaced.
        let e = write_atomic(&key, "other\n", 0o600, false).unwrap_err();
        assert!(e.to_string().contains("pass --force"), "{e}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret\n");
        write_atomic(&key, "other\n", 0o644, true).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "other\n");
    }

    #[test]
    fn a_failed_write_names_the_key_not_the_temp_file() {
        // A parent that is a file: fails for root too.
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("notdir");
        std::fs::write(&file, b"x").unwrap();
        let key = file.join("k");
        let msg = format!(
            "{:#}",
            write_atomic(&key, "secret\n", 0o600, false).unwrap_err()
        );
        // Exactly the key and the OS's reason: no temp-file name.
        assert_eq!(
            msg,
            format!(
                "cannot write {}: Not a directory (os error 20)",
                key.display()
            )
        );
    }
}
