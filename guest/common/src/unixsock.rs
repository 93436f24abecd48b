//! Waiting for a guest daemon's unix socket (the daemons start together with their callers).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The socket did not accept a connection in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} did not accept a connection within {} s", .path.display(), .wait.as_secs())]
pub struct NotAccepting {
    /// The socket.
    pub path: PathBuf,
    /// How long we waited.
    pub wait: Duration,
}

/// Try to connect to the unix socket `sock` every `poll` until it accepts a connection,
/// for at most `wait`.
pub fn wait_accepting(sock: &Path, wait: Duration, poll: Duration) -> Result<(), NotAccepting> {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return Ok(());
        }
        if start.elapsed() >= wait {
            return Err(NotAccepting {
                path: sock.to_path_buf(),
                wait,
            });
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_accepting_and_a_missing_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let e = wait_accepting(&sock, Duration::ZERO, Duration::from_millis(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} did not accept a connection within 0 s", sock.display())
        );
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        wait_accepting(&sock, Duration::from_secs(1), Duration::from_millis(1)).unwrap();
    }
}
