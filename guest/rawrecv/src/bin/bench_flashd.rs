//! `bench-flashd`: installed as `/bin/flashd` in the benchmark ramdisk only (the real flashd is
//! `/bin/flashd.real`). It execs the real flashd with `--install-slot auto` replaced by
//! `--install-partition system_b`: the same receive, verify and block install into the same
//! partition, without the slot activation and the reboot into the trial slot that follow every
//! install in slot mode — so one QEMU run can flash several times in a row. Like the slot mode
//! it streams straight into the partition (`--direct true`, flashd's default for
//! `--install-slot`). Every other argument is passed through unchanged.

use std::ffi::CString;

const REAL: &str = "/bin/flashd.real";

/// The argument list with the slot mode swapped for the partition the slot mode would pick on
/// fresh disks (system_b).
fn rewrite(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--install-slot" => {
                let _ = it.next();
                out.push("--install-partition".to_string());
                out.push(rawrecv::DEFAULT_PARTITION.to_string());
                out.push("--direct".to_string());
                out.push("true".to_string());
            }
            s if s.starts_with("--install-slot=") => {
                out.push("--install-partition".to_string());
                out.push(rawrecv::DEFAULT_PARTITION.to_string());
                out.push("--direct".to_string());
                out.push("true".to_string());
            }
            _ => out.push(a),
        }
    }
    out
}

fn main() {
    let args = rewrite(std::env::args().skip(1).collect());
    eprintln!(
        "bench-flashd: exec {REAL} {} (benchmark ramdisk: no slot activation)",
        args.join(" ")
    );
    let mut c_args: Vec<CString> = Vec::with_capacity(args.len() + 1);
    c_args.push(CString::new(REAL).unwrap_or_default());
    for a in &args {
        match CString::new(a.as_str()) {
            Ok(c) => c_args.push(c),
            Err(_) => {
                eprintln!("bench-flashd: argument with a NUL byte");
                std::process::exit(2);
            }
        }
    }
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call; execv
    // only returns on failure.
    unsafe {
        libc::execv(c_args[0].as_ptr(), argv.as_ptr());
    }
    eprintln!(
        "bench-flashd: cannot exec {REAL}: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(127);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_mode_becomes_the_partition() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rewrite(v(&[
                "--port-name",
                "p",
                "--install-slot",
                "auto",
                "--state",
                "/s"
            ])),
            v(&[
                "--port-name",
                "p",
                "--install-partition",
                "system_b",
                "--direct",
                "true",
                "--state",
                "/s"
            ])
        );
        assert_eq!(
            rewrite(v(&["--install-slot=auto"])),
            v(&["--install-partition", "system_b", "--direct", "true"])
        );
        assert_eq!(rewrite(v(&["--install", "/x"])), v(&["--install", "/x"]));
    }
}
