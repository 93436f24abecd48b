//! `cargo xtask guest`.

/// Arguments of `cargo xtask guest`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask guest: stub/placeholder — not implemented yet")
}
