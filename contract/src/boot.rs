//! The next-boot grammar: the one-shot record `/state/boot/next_mode`, rebootd's `mode(…)`
//! argument and what the boot chain acts on.

/// What the next boot should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NextBoot {
    /// The normal initramfs, booting the active slot.
    Normal,
    /// The recovery ramdisk.
    Recovery,
}

impl NextBoot {
    /// Every value, in a stable order.
    pub const ALL: [NextBoot; 2] = [NextBoot::Normal, NextBoot::Recovery];

    /// `"normal"` / `"recovery"`: the record's and the wire's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NextBoot::Normal => "normal",
            NextBoot::Recovery => "recovery",
        }
    }

    /// Strict parse of a name (no whitespace allowed).
    pub fn parse(name: &str) -> Option<Self> {
        NextBoot::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Parse a record file's content (surrounding whitespace ignored).
    pub fn parse_record(text: &str) -> Option<Self> {
        Self::parse(text.trim())
    }

    /// The exact bytes of the record file.
    pub fn record_bytes(self) -> &'static [u8] {
        match self {
            NextBoot::Normal => b"normal\n",
            NextBoot::Recovery => b"recovery\n",
        }
    }
}

impl std::fmt::Display for NextBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for m in NextBoot::ALL {
            assert_eq!(NextBoot::parse(m.as_str()), Some(m));
            let rec = std::str::from_utf8(m.record_bytes()).unwrap();
            assert_eq!(NextBoot::parse_record(rec), Some(m));
        }
        assert_eq!(NextBoot::parse(" normal"), None);
        assert_eq!(NextBoot::parse("Recovery"), None);
    }
}
