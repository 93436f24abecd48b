//! Where flashd's console lines go: the injected [`Output`] (markers are the console
//! contract, built only by `nx_contract::markers::flashd`), and the mapping of the
//! receiver's typed [`ReceiverReport`]s to markers and log lines.

use nx_contract::markers::flashd as m;
use nx_contract::Marker;
use proto::session::ReceiverReport;

/// Where markers and log lines go. The markers are the console contract: only typed
/// [`Marker`]s from `nx_contract::markers::flashd` can be printed as one.
pub trait Output: Send + Sync {
    /// A contract marker: the one way flashd prints a marker line.
    fn show(&self, marker: &Marker);
    /// An informational line (not part of the contract; printed with the log prefix).
    fn log(&self, line: &str);
}

/// Markers on stdout (one `write(2)` per line, flushed), logs on stderr.
pub struct StdOutput;

impl Output for StdOutput {
    fn show(&self, marker: &Marker) {
        nx_guest::marker::show(marker);
    }
    fn log(&self, line: &str) {
        // Logs share the console with the markers: keep them visibly apart (on stderr).
        eprintln!("{}", m::log(line));
    }
}

/// The marker of a receiver report, or `None` for the reports that are log lines.
pub fn marker_of(r: &ReceiverReport) -> Option<Marker> {
    Some(match r {
        ReceiverReport::Hello { host, proto } => m::hello(host, proto),
        ReceiverReport::Error { code, text } => m::error(code.code(), text),
        ReceiverReport::SegmentWritten { segment, bytes } => m::wrote(segment, *bytes),
        ReceiverReport::VerifyOk => m::verify_ok(),
        ReceiverReport::VerifyFailed { segment } => m::verify_failed(segment),
        ReceiverReport::Installed => m::installed(),
        ReceiverReport::Refused { reason } => m::refused(reason),
        ReceiverReport::Trusted {
            key: Some(key),
            security_version,
            downgrade,
        } => m::trusted(key, *security_version, *downgrade),
        ReceiverReport::Trusted { key: None, .. }
        | ReceiverReport::StagingLost
        | ReceiverReport::HostAborted { .. }
        | ReceiverReport::SkipIndexDropped
        | ReceiverReport::EncodeFailed { .. } => return None,
    })
}

/// Print a receiver report: its marker, or its log line.
pub fn report(out: &dyn Output, r: &ReceiverReport) {
    if let Some(marker) = marker_of(r) {
        out.show(&marker);
        return;
    }
    match r {
        ReceiverReport::StagingLost => {
            out.log("staging file lost: restarting the transfer from scratch")
        }
        ReceiverReport::HostAborted { code, reason } => {
            out.log(&format!("host aborted ({code}): {reason}"))
        }
        ReceiverReport::Trusted {
            key: None,
            security_version,
            ..
        } => out.log(&format!(
            "image accepted without a signature check (no trust key provisioned; security \
             version {security_version})"
        )),
        ReceiverReport::SkipIndexDropped => {
            out.log("skip index dropped (a copied chunk did not verify)")
        }
        ReceiverReport::EncodeFailed { message, error } => {
            out.log(&format!("internal: cannot encode {message}: {error}"))
        }
        _ => {}
    }
}
