//! `cargo xtask codegen [--check]`: regenerate the checked-in Cap'n Proto code.
//!
//! The schemas live in `proto/schema/*.capnp`; the generated Rust is checked in
//! under `proto/src/rpc/` so a plain `cargo build` needs no `capnp` compiler.
//! `--check` regenerates into a temporary directory and fails when the checked-in
//! files differ (stale) — CI runs it, and `bootctld_host`'s `codegen_fresh` test
//! includes this file and runs the same check.
//!
//! This file depends only on `std`, `anyhow`, `clap` and `capnpc` (no `crate::`
//! paths) so that test can include it with `#[path]`.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The schemas, relative to the workspace root, in generation order.
pub const SCHEMAS: &[&str] = &["proto/schema/bootctl.capnp", "proto/schema/reboot.capnp"];
/// Where the generated files are checked in, relative to the workspace root.
pub const OUT_DIR: &str = "proto/src/rpc";
/// The Rust module the generated modules live in (`proto::rpc::bootctl_capnp`).
const PARENT_MODULE: &str = "rpc";

/// Arguments of `cargo xtask codegen`.
#[derive(clap::Args)]
pub struct Args {
    /// Do not write: regenerate into a temporary directory and fail when the
    /// checked-in code differs from it.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = workspace_root();
    if args.check {
        check(&root)?;
        eprintln!("codegen: {OUT_DIR} is up to date with proto/schema/");
    } else {
        let written = regenerate(&root)?;
        for f in written {
            eprintln!("codegen: wrote {}", f.display());
        }
    }
    Ok(())
}

/// The workspace root (the parent of `xtask/`).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Fail with an install hint when the `capnp` compiler is not on PATH.
pub fn require_capnp() -> anyhow::Result<()> {
    match std::process::Command::new("capnp")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "`capnp --version` failed ({}); install the Cap'n Proto compiler: \
             `apt-get install -y capnproto` (Debian) — CI installs it",
            out.status
        ),
        Err(e) => bail!(
            "the Cap'n Proto compiler `capnp` is not on PATH ({e}); install it: \
             `apt-get install -y capnproto` (Debian) — CI installs it. \
             Plain `cargo build` does not need it, only codegen and its freshness check do"
        ),
    }
}

/// Generate the Rust code for [`SCHEMAS`] into `out` (which must exist).
pub fn generate_into(root: &Path, out: &Path) -> anyhow::Result<()> {
    require_capnp()?;
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(root.join("proto/schema"))
        .output_path(out)
        .default_parent_module(vec![PARENT_MODULE.to_string()]);
    for schema in SCHEMAS {
        cmd.file(root.join(schema));
    }
    cmd.run()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("capnp compile failed for proto/schema/*.capnp")?;
    Ok(())
}

/// The generated file name of a schema path: `bootctl.capnp` → `bootctl_capnp.rs`.
fn generated_name(schema: &str) -> anyhow::Result<String> {
    let stem = Path::new(schema)
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("bad schema path {schema}"))?;
    Ok(format!("{stem}_capnp.rs"))
}

/// Regenerate the checked-in files; returns the paths written.
pub fn regenerate(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = root.join(OUT_DIR);
    std::fs::create_dir_all(&out).with_context(|| format!("could not create {}", out.display()))?;
    generate_into(root, &out)?;
    SCHEMAS
        .iter()
        .map(|s| Ok(out.join(generated_name(s)?)))
        .collect()
}

/// Regenerate into a temporary directory and compare with the checked-in files.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let tmp = std::env::temp_dir().join(format!("nx-codegen-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("could not create {}", tmp.display()))?;
    let result = compare(root, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn compare(root: &Path, tmp: &Path) -> anyhow::Result<()> {
    generate_into(root, tmp)?;
    let mut stale = Vec::new();
    for schema in SCHEMAS {
        let name = generated_name(schema)?;
        let fresh = std::fs::read(tmp.join(&name))
            .with_context(|| format!("capnp did not produce {name}"))?;
        let checked_in_path = root.join(OUT_DIR).join(&name);
        match std::fs::read(&checked_in_path) {
            Ok(old) if old == fresh => {}
            Ok(_) => stale.push(format!("{OUT_DIR}/{name} differs from {schema}")),
            Err(_) => stale.push(format!("{OUT_DIR}/{name} is missing")),
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated Cap'n Proto code is stale: {}; run `cargo xtask codegen` and commit {OUT_DIR}/",
            stale.join("; ")
        );
    }
    Ok(())
}
