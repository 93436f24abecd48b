//! Kernel command line (`/proc/cmdline`): bounded, parsed into `key[=value]` words.

use crate::{bounded, Result};
use std::path::Path;

/// Largest command line we read (the x86 kernel limit is 2048 bytes).
pub const MAX_CMDLINE: usize = 4096;

/// A parsed kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    words: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Parse whitespace-separated words (no quoting: our runner never passes quoted values).
    pub fn parse(text: &str) -> Self {
        let words = text
            .split_ascii_whitespace()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (w.to_string(), None),
            })
            .collect();
        Cmdline { words }
    }

    /// Read and parse `/proc/cmdline` (or another file, for tests).
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self::parse(&bounded::read_string(path, MAX_CMDLINE)?))
    }

    /// The value of the last `key=value` word for `key` (the kernel's "last wins" rule).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.words
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// True for `key`, `key=1`, `key=y`, `key=yes`, `key=true`, `key=on`.
    pub fn flag(&self, key: &str) -> bool {
        match self.words.iter().rev().find(|(k, _)| k == key) {
            Some((_, None)) => true,
            Some((_, Some(v))) => matches!(v.as_str(), "1" | "y" | "yes" | "true" | "on"),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words() {
        let c = Cmdline::parse(
            "console=ttyS0 quiet recovery=1 nexus.target=normal nexus.target=recovery\n",
        );
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get("nexus.target"), Some("recovery"));
        assert!(c.flag("recovery"));
        assert!(c.flag("quiet"));
        assert!(!c.flag("nexus.selftest"));
        assert!(!Cmdline::parse("recovery=0").flag("recovery"));
    }
}
