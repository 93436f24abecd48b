//! `cargo xtask demo`: the whole story from a fresh machine, with stage headings:
//! host packages → guest build (kernel, ramdisks, disks, images) → boot recovery →
//! flash over virtio-serial into the inactive slot → flashd markers → automatic reboot, the
//! new slot boots on trial and confirms → the guest is stopped (use `cargo xtask recovery` /
//! `just recovery` to keep it up).

use crate::util;

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Recreate state.img / disk.img and refetch the kernel first.
    #[arg(long)]
    pub fresh: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    util::stage("1/4 host packages (apt: qemu-system-x86, e2fsprogs, fdisk)");
    util::ensure_tools(util::HOST_TOOLS)?;
    util::stage(
        "2/4 guest: kernel, static binaries, recovery ramdisk, normal initramfs, disks, demo image",
    );
    let out = crate::guest::build(&crate::guest::Args {
        fresh: args.fresh,
        ..Default::default()
    })?;
    // 3/4 and 4/4 print their own headings.
    let mut runner = crate::recovery::boot_recovery(false)?;
    match &out.demo_image {
        Some(img) => crate::recovery::flash(&runner, img)?,
        None => eprintln!("xtask: demo: flash stub/placeholder — nx image build did not produce build/nexus-os.img"),
    }
    let outcome = runner.stop();
    util::stage("done");
    eprintln!(
        "xtask: demo finished (guest {outcome}); console log: {}",
        runner.config().console_log().display()
    );
    eprintln!(
        "xtask: `cargo xtask recovery` (or `just recovery`) does the same and leaves the guest up"
    );
    Ok(())
}
