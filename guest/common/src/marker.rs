//! Console markers: one line each, written with a single `write(2)` so lines from several
//! processes sharing the console do not interleave mid-line. The exact strings are the test
//! contract (`qemu/markers.toml`).

use std::io::Write;

/// Print one marker line to stdout (the console for PID 1 and its children).
///
/// Guest code prints markers with [`show`]; this stays public only while flashd (migrated on
/// another branch of issue #12) still calls it — make it private then.
pub fn emit(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut out = std::io::stdout().lock();
    // A console write error cannot be reported anywhere else; ignore it.
    let _ = out.write_all(&buf);
    let _ = out.flush();
}

/// Print a contract marker (`nx_contract::markers::…`): the one way guest code prints a
/// console marker.
pub fn show(marker: &nx_contract::Marker) {
    emit(marker.as_str());
}

/// The end of a daemon's `main`: success, or the daemon's error marker (`error` of its marker
/// module, given the whole cause chain `{err:#}`) on stderr and a failure exit code.
pub fn exit_code<E: std::fmt::Display>(
    result: Result<(), E>,
    error: impl FnOnce(String) -> nx_contract::Marker,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", error(format!("{err:#}")).as_str());
            std::process::ExitCode::FAILURE
        }
    }
}
