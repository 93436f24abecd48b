//! `cargo xtask install`: put `nx` on PATH with its man page and shell completions.
//!
//! 1. `cargo install --path nx-cli --locked` (into cargo's bin dir, `~/.cargo/bin` unless
//!    `--root` / `CARGO_INSTALL_ROOT` say otherwise);
//! 2. the installed `nx man` → `PREFIX/share/man/man1/nx.1`;
//! 3. `nx completions bash|zsh|fish` → `PREFIX/share/bash-completion/completions/nx`,
//!    `PREFIX/share/zsh/site-functions/_nx`, `PREFIX/share/fish/vendor_completions.d/nx.fish`.
//!
//! PREFIX is `--prefix`, else `~/.local` (where man and bash-completion look by default for
//! the user; zsh needs the directory in `fpath`).

use crate::util;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Arguments of `cargo xtask install`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Where the man page and completions go (default: ~/.local).
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<PathBuf>,
    /// Passed to `cargo install --root` (where `bin/nx` goes).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prefix = match args.prefix {
        Some(p) => p,
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local"))
            .context("HOME is not set: pass --prefix DIR")?,
    };
    util::stage("install nx (cargo install --path nx-cli)");
    let mut cmd = util::cargo();
    cmd.args(["install", "--locked", "--path"])
        .arg(util::root().join("nx-cli"));
    if let Some(r) = &args.root {
        cmd.arg("--root").arg(r);
    }
    util::run_cmd(&mut cmd)?;
    let nx = installed_nx(args.root.as_deref())?;
    util::stage("man page and completions");
    let files = [
        (vec!["man"], prefix.join("share/man/man1/nx.1")),
        (
            vec!["completions", "bash"],
            prefix.join("share/bash-completion/completions/nx"),
        ),
        (
            vec!["completions", "zsh"],
            prefix.join("share/zsh/site-functions/_nx"),
        ),
        (
            vec!["completions", "fish"],
            prefix.join("share/fish/vendor_completions.d/nx.fish"),
        ),
    ];
    for (verb, dest) in files {
        let out = std::process::Command::new(&nx)
            .args(&verb)
            .output()
            .with_context(|| format!("could not run {} {}", nx.display(), verb.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`nx {}` failed ({}): {}",
                verb.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        util::write_if_changed(&dest, &out.stdout)?;
        eprintln!("xtask: wrote {}", dest.display());
    }
    eprintln!(
        "xtask: installed {}; `man nx` and completions (zsh: add {} to fpath)",
        nx.display(),
        prefix.join("share/zsh/site-functions").display()
    );
    Ok(())
}

/// The `nx` that `cargo install` just wrote.
fn installed_nx(root: Option<&Path>) -> anyhow::Result<PathBuf> {
    let root = match root {
        Some(r) => r.to_path_buf(),
        None => match std::env::var_os("CARGO_INSTALL_ROOT") {
            Some(r) => PathBuf::from(r),
            None => std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .context("neither CARGO_HOME nor HOME is set")?,
        },
    };
    let nx = root.join("bin").join("nx");
    anyhow::ensure!(
        nx.is_file(),
        "cargo install finished but {} does not exist",
        nx.display()
    );
    Ok(nx)
}
