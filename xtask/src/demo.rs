//! `cargo xtask demo`.

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask demo: stub/placeholder — not implemented yet")
}
