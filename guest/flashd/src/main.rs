//! flashd binary: parse arguments, open the link, serve. All logic is in the library.

use anyhow::Context;
use clap::Parser;
use flashd::config::{Args, Source};
use flashd::console::{Output, StdOutput};
use flashd::link::{Acceptor, PortAcceptor, UnixAcceptor};
use flashd::server::Server;
use nx_contract::markers;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    tune_malloc();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            StdOutput.show(&markers::flashd::error(0, text.replace('\n', " ")));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let (source, cfg) = args.resolve().context("invalid arguments")?;
    StdOutput.log(&flashd::choose_crc_engine());
    let mut server = Server::new(cfg, Arc::new(StdOutput)).context("cannot start flashd")?;
    let mut acceptor: Box<dyn Acceptor> = match &source {
        Source::Listen(path) => Box::new(UnixAcceptor::bind(path)?),
        Source::Port(name) => {
            let dev = wait_for_port(name);
            Box::new(PortAcceptor::open(&dev).with_context(|| {
                format!(
                    "cannot open the virtio-serial port {name} at {}",
                    dev.display()
                )
            })?)
        }
    };
    server.announce();
    eprintln!("{}", markers::flashd::serving_on(acceptor.describe()));
    server.serve(acceptor.as_mut(), args.once)?;
    Ok(())
}

/// Find the port by name; it may show up a little after the driver loads. Never gives up
/// (flashd is the only way to flash this target), but says what it is waiting for.
fn wait_for_port(name: &str) -> std::path::PathBuf {
    let mut warned = false;
    loop {
        match nx_guest::port::wait(name, Duration::from_secs(10)) {
            Ok(p) => return p,
            Err(e) => {
                if !warned {
                    StdOutput.log(&format!("still waiting for virtio-serial port {name}: {e}"));
                    warned = true;
                }
            }
        }
    }
}

/// Fix glibc's mmap threshold at 512 KiB: the install's 1 MiB blocks then come from mmap and
/// go back to the kernel when freed, while frames (a 256 KiB chunk + header by default) stay
/// on the heap and are reused. Left dynamic, glibc raises the threshold after the first large
/// free and keeps every MiB ever used resident (peak RSS creeping up with each install).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}
