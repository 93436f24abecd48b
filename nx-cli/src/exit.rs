//! The one exit-code table of `nx`: every verb exits with one of these, mapped from the typed
//! errors of the engine ([`Exit::of_error`]). Printed by `nx --help` and each group's help
//! ([`TABLE`]), documented in `docs/tools/nx.md`.

use nx_engine::rpc_client::RpcError;
use nx_engine::transport::TransportError;
use std::process::ExitCode;

/// Why `nx` exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done: installed (or already installed), printed, checked, the image matches.
    Ok,
    /// A local error: I/O, an unusable output path, a bad value, an unexpected answer.
    Error,
    /// Command-line usage error (bad flag or `--port` value).
    Usage,
    /// Verification failed: the image is malformed, truncated or a hash does not match.
    Invalid,
    /// Signature or trust: unsigned, signed with a key not trusted, below the rollback floor.
    Trust,
    /// Target unreachable: no such socket, not a socket, nobody listening, another daemon on
    /// the port, no answer, the link was lost. `nx flash send` is resumable: run it again.
    Unreachable,
    /// The target refused: it answered no (slot empty, install failed, bad request), or
    /// `nx flash verify` found another image installed.
    Refused,
    /// Interrupted (Ctrl-C). `nx flash send` is resumable: run it again.
    Interrupted,
}

/// The table, as printed in `--help` (one line per code): [`crate::exit_table!`].
pub const TABLE: &str = crate::exit_table!();

impl Exit {
    /// Every code, in table order.
    pub const ALL: [Exit; 8] = [
        Exit::Ok,
        Exit::Error,
        Exit::Usage,
        Exit::Invalid,
        Exit::Trust,
        Exit::Unreachable,
        Exit::Refused,
        Exit::Interrupted,
    ];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::Invalid => 3,
            Exit::Trust => 4,
            Exit::Unreachable => 5,
            Exit::Refused => 6,
            Exit::Interrupted => 130,
        }
    }

    /// The exit for an error that reached `main`: the first typed error in its chain decides,
    /// anything else is a local error.
    pub fn of_error(err: &anyhow::Error) -> Exit {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<RpcError>() {
                return Exit::of_rpc(e);
            }
            if cause.downcast_ref::<TransportError>().is_some() {
                return Exit::Unreachable;
            }
            if let Some(e) = cause.downcast_ref::<Failure>() {
                return e.exit;
            }
        }
        Exit::Error
    }

    /// The exit for a failed call to rebootd/bootctld.
    pub fn of_rpc(e: &RpcError) -> Exit {
        match e {
            RpcError::BadPort { .. } | RpcError::BadRebootTarget(_) => Exit::Usage,
            RpcError::Unreachable { .. }
            | RpcError::Timeout { .. }
            | RpcError::Disconnected { .. }
            | RpcError::Closed { .. } => Exit::Unreachable,
            RpcError::Refused { .. } => Exit::Refused,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// An error that knows its exit class (for failures that are not engine errors, e.g. an
/// unusable output path or a truncated image).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Its class.
    pub exit: Exit,
    /// What failed and what to do.
    pub message: String,
}

impl Failure {
    /// A failure of class `exit`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_code_once() {
        for e in Exit::ALL {
            let prefix = format!("\n  {:<4} ", e.code());
            assert_eq!(TABLE.matches(&prefix).count(), 1, "{e:?} in\n{TABLE}");
        }
        assert_eq!(TABLE.lines().count(), Exit::ALL.len() + 1);
    }

    #[test]
    fn typed_errors_map_to_their_class() {
        let e = anyhow::Error::new(Failure::new(Exit::Invalid, "x")).context("outer");
        assert_eq!(Exit::of_error(&e), Exit::Invalid);
        let e = anyhow::anyhow!("plain");
        assert_eq!(Exit::of_error(&e), Exit::Error);
        let e = anyhow::Error::new(RpcError::Refused {
            daemon: nx_engine::rpc_client::Daemon::Bootctld,
            text: "no".into(),
        });
        assert_eq!(Exit::of_error(&e), Exit::Refused);
    }
}
