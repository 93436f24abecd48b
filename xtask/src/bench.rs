//! `cargo xtask bench`.

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask bench: stub/placeholder — not implemented yet")
}
