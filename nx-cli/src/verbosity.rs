//! The global `-q` / `-v` flags: how much every verb says on stderr besides errors and results.

use std::sync::atomic::{AtomicU8, Ordering};

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// `-q`: errors and results only.
    Quiet,
    /// Progress and notes.
    Normal,
    /// `-v`: also which daemon answered, connection attempts, error details.
    Verbose,
}

static LEVEL: AtomicU8 = AtomicU8::new(1);

/// Set the level (once, from the command line).
pub fn set(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The level.
pub fn get() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Level::Quiet,
        2 => Level::Verbose,
        _ => Level::Normal,
    }
}

/// Whether notes (not errors, not results) are shown.
pub fn notes() -> bool {
    get() >= Level::Normal
}

/// Whether `-v` details are shown.
pub fn verbose() -> bool {
    get() == Level::Verbose
}

/// `eprintln!` for a note: silent under `-q`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if $crate::verbosity::notes() {
            eprintln!($($arg)*);
        }
    };
}
