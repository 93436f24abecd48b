//! The diag bundle's format, as both sides check it: a tar whose members are
//! `diag/<name>` with a plain name (written by nx-diag in the guest, read by `nx recovery diag`).

/// The directory every member of a bundle is in.
pub const MEMBER_DIR: &str = "diag/";

/// A plain member name: `[A-Za-z0-9._-]{1,64}`, not `.` / `..` (no path, nothing hidden in it).
pub fn is_member_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        for ok in ["console.log", "bootctl.json", "a-b_c.1"] {
            assert!(is_member_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "ä", &"x".repeat(65)] {
            assert!(!is_member_name(bad), "{bad}");
        }
    }
}
