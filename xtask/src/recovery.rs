//! `cargo xtask recovery`.

/// Arguments of `cargo xtask recovery`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask recovery: stub/placeholder — not implemented yet")
}
