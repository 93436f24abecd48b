//! Kernel modules: the load list baked into the initramfs by `cargo xtask guest`
//! (`/lib/modules/load.list`, one `name.ko` per line, dependency order computed at build time
//! from each module's `.modinfo depends=`), loaded with `finit_module(2)`.

use crate::{bounded, Error, Result};
use std::path::Path;

/// Directory of the modules and the list in the initramfs.
pub const MODULE_DIR: &str = "/lib/modules";
/// The ordered load list.
pub const LOAD_LIST: &str = "/lib/modules/load.list";
/// Largest load list we read.
const MAX_LIST: usize = 64 * 1024;
/// Most modules we load.
const MAX_MODULES: usize = 256;

/// Parse a load list: blank lines and `#` comments ignored; every entry must be a plain safe
/// file name ending in `.ko`.
pub fn parse_list(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !bounded::is_safe_name(line) || !line.ends_with(".ko") {
            return Err(Error::Invalid {
                what: "module load list entry",
                value: line.to_string(),
            });
        }
        if out.len() == MAX_MODULES {
            return Err(Error::Invalid {
                what: "module load list",
                value: format!("more than {MAX_MODULES} entries"),
            });
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Load one module file; an already loaded (or built-in) module is fine, and so is one whose
/// hardware or firmware is absent (`ENODEV`: efivarfs on a boot without UEFI) — nothing
/// depends on such a module's symbols.
pub fn load(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    match rustix::system::finit_module(&f, c"", 0) {
        Ok(()) | Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NODEV) => Ok(()),
        Err(e) => Err(Error::Sys {
            what: format!("finit_module {}", path.display()),
            source: e.into(),
        }),
    }
}

/// Load every module of `dir/load.list` in order. Returns the number loaded; stops at the
/// first failure (a later module would fail with "Unknown symbol" anyway).
pub fn load_all(dir: &Path) -> Result<usize> {
    let list = dir.join("load.list");
    let Some(text) = bounded::read_string_opt(&list, MAX_LIST)? else {
        return Ok(0);
    };
    let names = parse_list(&text)?;
    for n in &names {
        load(&dir.join(n))?;
    }
    Ok(names.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parsing() {
        let l = parse_list("# order\nvirtio_ring.ko\n\nvirtio.ko\n").unwrap();
        assert_eq!(l, vec!["virtio_ring.ko", "virtio.ko"]);
        assert!(parse_list("../x.ko\n").is_err());
        assert!(parse_list("virtio\n").is_err());
    }
}
