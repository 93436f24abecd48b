//! Library half of the `nx` command: everything except argument parsing and
//! the terminal lives here so tests can drive it.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

/// The exit-code table as a string literal (for `concat!` into clap's help texts); the
/// codes themselves are [`exit::Exit`] (a test checks that they agree).
#[macro_export]
macro_rules! exit_table {
    () => {
        "Exit codes (every nx verb):\n  \
            0    ok\n  \
            1    local error (I/O, output path, bad value)\n  \
            2    usage (bad flag or --port value)\n  \
            3    verification failed (bad, truncated or corrupt image)\n  \
            4    signature/trust (unsigned, untrusted key, below the rollback floor)\n  \
            5    target unreachable (no socket/listener, wrong daemon, link lost; resumable)\n  \
            6    target refused (the target said no, or verify found another image)\n  \
            130  interrupted (Ctrl-C; resumable)"
    };
}

pub mod boot;
pub mod completions;
pub mod devices;
pub mod exit;
pub mod flash;
pub mod image;
pub mod man;
pub mod outpath;
pub mod recovery;
pub mod reset;
pub mod status;
pub mod target;
pub mod verbosity;

/// `1 segment`, `2 segments`: a count and its noun, singular when it is one.
pub fn plural(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plural_is_singular_for_one() {
        assert_eq!(super::plural(1u32, "segment"), "1 segment");
        assert_eq!(super::plural(0u32, "segment"), "0 segments");
        assert_eq!(super::plural(3u64, "member"), "3 members");
    }
}
