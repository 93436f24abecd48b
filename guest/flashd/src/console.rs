//! Where flashd's console lines go: the injected [`Output`] (markers are the console
//! contract, built only by `nx_contract::markers::flashd`), and the mapping of the
//! receiver's typed [`ReceiverReport`]s to markers and log lines.

use nx_contract::markers::flashd as m;
use nx_contract::Marker;
use proto::session::ReceiverReport;

/// Where markers and log lines go. The markers are the console contract.
pub trait Output: Send + Sync {
    /// One exact marker line (`flashd: …`).
    fn marker(&self, line: &str);
    /// An informational line (not part of the contract).
    fn log(&self, line: &str);
    /// A contract marker (`nx_contract::markers::flashd`): the way flashd prints one.
    fn show(&self, marker: &Marker) {
        self.marker(marker.as_str());
    }
}

/// Markers on stdout (one `write(2)` per line, flushed), logs on stderr.
pub struct StdOutput;

impl Output for StdOutput {
    fn marker(&self, line: &str) {
        nx_guest::marker::emit(line);
    }
    fn show(&self, marker: &Marker) {
        nx_guest::marker::show(marker);
    }
    fn log(&self, line: &str) {
        // Logs share the console with the markers: keep them visibly apart.
        let rest = line.strip_prefix("flashd: ").unwrap_or(line);
        eprintln!("flashd (log): {rest}");
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
        ReceiverReport::StagingLost
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
            out.log("flashd: staging file lost: restarting the transfer from scratch")
        }
        ReceiverReport::HostAborted { code, reason } => {
            out.log(&format!("flashd: host aborted ({code}): {reason}"))
        }
        ReceiverReport::SkipIndexDropped => {
            out.log("flashd: skip index dropped (a copied chunk did not verify)")
        }
        ReceiverReport::EncodeFailed { message, error } => out.log(&format!(
            "flashd: internal: cannot encode {message}: {error}"
        )),
        _ => {}
    }
}
