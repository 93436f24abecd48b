//! Markers of flashd: every line flashd prints on the console as part of the test contract.
//! The QEMU scenarios match them byte for byte (or by the prefixes in [`PATTERNS`]).

use super::Marker;
use std::fmt::Display;

/// Prefixes of the markers with variable parts, as the runner matches them.
pub const PATTERNS: [&str; 9] = [
    "flashd: hello host=",
    "flashd: error ",
    "flashd: wrote seg=",
    "flashd: verify failed seg=",
    "flashd: install slot=",
    "flashd: slot=",
    "flashd: stub/placeholder no usable state dir (",
    "flashd: refused image: ",
    "flashd: image trusted ",
];

/// Prefix of flashd's informational lines (stderr). They are not markers, but share the
/// console, and the benchmark reads two of them ([`RSS_TEXT`], [`CPU_TEXT`]).
pub const LOG_PREFIX: &str = "flashd (log): ";
/// Text of the log line with flashd's peak RSS after an install (`rss peak_kib=<n>`).
pub const RSS_TEXT: &str = "rss peak_kib=";
/// Text of the log line with flashd's CPU time per thread since the HELLO.
pub const CPU_TEXT: &str = "since HELLO: ";

/// An informational line: [`LOG_PREFIX`] + `text`.
pub fn log(text: impl Display) -> Marker {
    Marker::new(format!("{LOG_PREFIX}{text}"))
}

/// Where flashd listens (`flashd (log): serving on /dev/vport0p1`).
pub fn serving_on(link: impl Display) -> Marker {
    log(format!("serving on {link}"))
}

/// `flashd: ready`: the server holds its state dir and serves the link.
pub fn ready() -> Marker {
    Marker::new("flashd: ready")
}

/// The explicit stub: no usable state dir, every request is refused.
pub fn stub(reason: impl Display) -> Marker {
    Marker::new(format!(
        "flashd: stub/placeholder no usable state dir ({reason}): refusing to flash"
    ))
}

/// `flashd: hello host=<name> proto=<n>`: a host said HELLO.
pub fn hello(host: impl Display, proto: impl Display) -> Marker {
    Marker::new(format!("flashd: hello host={host} proto={proto}"))
}

/// `flashd: error <code> <text>`: what the host is told in its ERROR (code 0: a local error
/// no host hears about, e.g. at startup or after the install).
pub fn error(code: impl Display, text: impl Display) -> Marker {
    Marker::new(format!("flashd: error {code} {text}"))
}

/// `flashd: refused image: <reason>`: the trust policy refused the image at HELLO (unsigned,
/// untrusted signature, below the anti-rollback floor); nothing was written.
pub fn refused(reason: impl Display) -> Marker {
    Marker::new(format!("flashd: refused image: {reason}"))
}

/// `flashd: image trusted key=<name> security_version=<n>[ downgrade]`: the image passed the
/// trust policy (`downgrade`: below the floor, allowed for a development key).
pub fn trusted(key: impl Display, security_version: u64, downgrade: bool) -> Marker {
    Marker::new(format!(
        "flashd: image trusted key={key} security_version={security_version}{}",
        if downgrade { " downgrade" } else { "" }
    ))
}

/// The explicit stub of an unprovisioned device: no trust key, unsigned images are accepted.
pub fn unprovisioned() -> Marker {
    Marker::new("flashd: stub/placeholder: no trust key — accepting unsigned images")
}

/// `flashd: wrote seg=<name> bytes=<size>`: every chunk of a segment is written.
pub fn wrote(segment: impl Display, bytes: u64) -> Marker {
    Marker::new(format!("flashd: wrote seg={segment} bytes={bytes}"))
}

/// `flashd: verify ok`: every segment matched its SHA-256; the install starts.
pub fn verify_ok() -> Marker {
    Marker::new("flashd: verify ok")
}

/// `flashd: verify failed seg=<name>`.
pub fn verify_failed(segment: impl Display) -> Marker {
    Marker::new(format!("flashd: verify failed seg={segment}"))
}

/// `flashd: installed`: the image is in the install target and read back.
pub fn installed() -> Marker {
    Marker::new("flashd: installed")
}

/// `flashd: install slot=b (system_b on /dev/vdb2)`: the slot an install goes to.
pub fn install_slot(slot: impl Display, partition: impl Display, device: impl Display) -> Marker {
    Marker::new(format!(
        "flashd: install slot={slot} ({partition} on {device})"
    ))
}

/// `flashd: slot=<s> active on trial (tries=<n>); …`: the installed slot was activated;
/// `rebooting`: rebootd reboots into it (else its stub cannot reboot).
pub fn slot_activated(slot: impl Display, tries: impl Display, rebooting: bool) -> Marker {
    if rebooting {
        Marker::new(format!(
            "flashd: slot={slot} active on trial (tries={tries}); rebooting into it"
        ))
    } else {
        Marker::new(format!(
            "flashd: slot={slot} active on trial (tries={tries}); reboot (stub) — rebootd cannot reboot here"
        ))
    }
}

/// `flashd: slot=<s> boot files <paths>`: the slot's kernel and initramfs are on the ESP.
pub fn boot_files(slot: impl Display, files: impl Display) -> Marker {
    Marker::new(format!("flashd: slot={slot} boot files {files}"))
}

/// The slot's boot files were not put on the ESP, and why (stub/placeholder).
pub fn boot_files_skipped(slot: impl Display, why: impl Display) -> Marker {
    Marker::new(format!(
        "flashd: stub/placeholder: slot={slot} boot files not installed ({why})"
    ))
}

/// Every constructor with representative arguments (the marker catalogue).
pub fn samples() -> Vec<Marker> {
    vec![
        serving_on("/dev/vport0p1"),
        log("x"),
        ready(),
        stub("e"),
        hello("vm", 1),
        error(0, "e"),
        wrote("rootfs", 4096),
        verify_ok(),
        verify_failed("rootfs"),
        installed(),
        install_slot("b", "system_b", "/dev/vdb2"),
        slot_activated("b", 3, true),
        slot_activated("b", 3, false),
        boot_files("b", "nexus/b/vmlinuz nexus/b/initrd.cpio"),
        boot_files_skipped("b", "no ESP at /boot/efi"),
        // The trust policy's refusals (texts of `proto::trust::Refusal`).
        refused("image is not signed and this device trusts only signed images"),
        refused("image signature does not verify with any key this device trusts"),
        refused("image security version 1 is below this device's anti-rollback floor 2"),
        error(4, "refused image: image is not signed"),
        error(
            16,
            "refused image: image security version 1 is below the floor",
        ),
        trusted("nexus-dev", 2, false),
        trusted("nexus-dev", 1, true),
        unprovisioned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_lines() {
        assert_eq!(ready().as_str(), "flashd: ready");
        assert_eq!(hello("vm", 1).as_str(), "flashd: hello host=vm proto=1");
        assert_eq!(
            wrote("rootfs", 4096).as_str(),
            "flashd: wrote seg=rootfs bytes=4096"
        );
        assert_eq!(verify_ok().as_str(), "flashd: verify ok");
        assert_eq!(
            install_slot("b", "system_b", "/dev/vdb2").as_str(),
            "flashd: install slot=b (system_b on /dev/vdb2)"
        );
        assert_eq!(installed().as_str(), "flashd: installed");
        assert_eq!(error(7, "x y").as_str(), "flashd: error 7 x y");
        assert_eq!(
            verify_failed("kernel").as_str(),
            "flashd: verify failed seg=kernel"
        );
        assert!(stub("r").as_str().starts_with(PATTERNS[6]));
        assert!(slot_activated("b", 3, false)
            .as_str()
            .contains("reboot (stub)"));
        for m in [
            hello("h", 1),
            error(1, "e"),
            wrote("s", 1),
            slot_activated("a", 3, true),
        ] {
            assert!(PATTERNS.iter().any(|p| m.as_str().starts_with(p)), "{m}");
        }
    }
}
