//! Lines of recovery-sh, the recovery console's shell: its screen is part of the test contract
//! (the recovery-console scenario types into it). The ready marker is
//! [`super::recovery::shell_ready`].

use super::Marker;
use std::fmt::Display;

/// The prompt (no newline after it).
pub const PROMPT: &str = "recovery> ";

/// `recovery-sh: error: <msg>` (`msg` already on one line).
pub fn error(msg: impl Display) -> Marker {
    Marker::new(format!("recovery-sh: error: {msg}"))
}

/// `recovery-sh: <msg>` (`msg` already on one line).
pub fn say(msg: impl Display) -> Marker {
    Marker::new(format!("recovery-sh: {msg}"))
}

/// The hint after the ready marker.
pub fn type_help() -> Marker {
    say("type 'help' for the commands")
}

/// The first line of `help`.
pub fn builtins() -> Marker {
    say("built-ins (nothing else can run here):")
}

/// Fixed prefix of [`builtins`].
pub const BUILTINS_PREFIX: &str = "recovery-sh: built-ins";

/// The [`error`] message for an unknown command.
pub fn unknown_command_why(shown: impl Display) -> String {
    format!("unknown command '{shown}' (type 'help')")
}

/// The [`error`] message for a line over `max` bytes.
pub fn line_too_long_why(max: usize) -> String {
    format!("line longer than {max} bytes, ignored; nothing was run")
}

/// The [`say`] message of a confirmed factory reset.
pub const RESET_CONFIRMED_WHY: &str =
    "factory reset confirmed; asking rebootd to record the wipe request";

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    vec![
        error("e"),
        say("s"),
        type_help(),
        builtins(),
        error(unknown_command_why("sh")),
        error(unknown_command_why("/bin/sh")),
        error(unknown_command_why("exec")),
        error(line_too_long_why(256)),
        say(RESET_CONFIRMED_WHY),
    ]
}
