//! Console markers: every line a guest program prints on the console as part of the test
//! contract (`qemu/markers.toml`) is built by a constructor in this module, one submodule per
//! program. Code never formats a marker by hand; xtask and the runner match against the same
//! constructors (or the `PATTERNS` each submodule lists for markers with variable parts).

pub mod bootctld;
pub mod flashd;
pub mod init;
pub mod pid1;
pub mod rebootd;
pub mod recovery;
pub mod reset;
pub mod selftest;

/// One console line (without the newline).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Marker(String);

impl Marker {
    /// Only constructors in this module build markers.
    pub(crate) fn new(line: impl Into<String>) -> Marker {
        Marker(line.into())
    }

    /// The line's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The line's text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Marker {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
