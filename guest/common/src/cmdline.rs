//! Kernel command line (`/proc/cmdline`): bounded, parsed into `key[=value]` words.
//!
//! [`Cmdline::system`] adds the words of the QEMU firmware config file
//! [`nx_contract::loader::FW_CFG_CMDLINE`] when the machine has one: the boot entry owns the
//! kernel command line, so a test harness passes its options (`nexus.selftest=1`) this way;
//! they come after the kernel's words (the last word of a key wins).

use crate::{bounded, Result};
use std::path::Path;

/// Largest command line we read (the x86 kernel limit is 2048 bytes).
pub const MAX_CMDLINE: usize = 4096;

/// Where the kernel's `qemu_fw_cfg` driver shows the harness's options.
pub fn fw_cfg_path() -> std::path::PathBuf {
    Path::new("/sys/firmware/qemu_fw_cfg/by_name")
        .join(nx_contract::loader::FW_CFG_CMDLINE)
        .join("raw")
}

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

    /// `proc_cmdline` followed by the words of the firmware config file `fw_cfg` (when it
    /// exists; bounded like the command line).
    pub fn read_with(proc_cmdline: &Path, fw_cfg: &Path) -> Result<Self> {
        let mut c = Self::read(proc_cmdline)?;
        if let Some(extra) = bounded::read_string_opt(fw_cfg, MAX_CMDLINE)? {
            c.words.extend(Self::parse(&extra).words);
        }
        Ok(c)
    }

    /// This boot's command line: `/proc/cmdline` and the harness's firmware config words.
    pub fn system() -> Result<Self> {
        Self::read_with(Path::new("/proc/cmdline"), &fw_cfg_path())
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
    fn firmware_config_words_come_last() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cmdline");
        let f = d.path().join("raw");
        std::fs::write(&p, "console=ttyS0 nexus.confirm=auto\n").unwrap();
        let c = Cmdline::read_with(&p, &f).unwrap();
        assert!(!c.flag("nexus.selftest"));
        std::fs::write(&f, "nexus.selftest=1 nexus.confirm=manual").unwrap();
        let c = Cmdline::read_with(&p, &f).unwrap();
        assert!(c.flag("nexus.selftest"));
        assert_eq!(c.get("nexus.confirm"), Some("manual"));
        std::fs::write(&f, vec![b'x'; MAX_CMDLINE + 1]).unwrap();
        assert!(Cmdline::read_with(&p, &f).is_err());
    }

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
