//! rawrecv binary (see the library docs for the protocol).
//!
//! ```text
//! rawrecv [--port-name NAME] [--partition NAME]
//! ```
//!
//! Started as PID 1 (the benchmark boots with `rdinit=/bin/rawrecv`), it forks itself as the
//! receiver and the parent execs the real `/init`, so the ramdisk boots exactly as usual and
//! the receiver waits for its port and partition to show up.

use std::ffi::CString;

fn main() {
    let mut port = rawrecv::BENCH_PORT.to_string();
    let mut part = rawrecv::DEFAULT_PARTITION.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port-name", Some(v)) => port = v,
            ("--partition", Some(v)) => part = v,
            _ => {
                eprintln!("usage: rawrecv [--port-name NAME] [--partition NAME]");
                std::process::exit(2);
            }
        }
    }
    if std::process::id() == 1 {
        as_pid1(&port, &part);
    }
    rawrecv::serve_forever(&port, &part)
}

/// Fork the receiver, exec the real init in this process (PID 1 stays PID 1).
fn as_pid1(port: &str, part: &str) {
    // SAFETY: no other thread exists yet; the child only runs safe Rust afterwards.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        rawrecv::serve_forever(port, part);
    }
    if pid < 0 {
        eprintln!("{}", nx_contract::markers::rawrecv::fork_failed());
    }
    let init = CString::new("/init").unwrap_or_default();
    let argv = [init.as_ptr(), std::ptr::null()];
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call;
    // execv only returns on failure.
    unsafe {
        libc::execv(init.as_ptr(), argv.as_ptr());
    }
    // PID 1 must never exit (that panics the kernel): serve here instead.
    eprintln!(
        "{}",
        nx_contract::markers::rawrecv::exec_failed(std::io::Error::last_os_error())
    );
    rawrecv::serve_forever(port, part)
}
