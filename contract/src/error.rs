//! The error shape every crate uses for a failed I/O operation on a path
//! (`"{what} {path}: {source}"`), so that each crate's error enum carries it as one variant.

use std::path::{Path, PathBuf};

/// An I/O operation (`what`: "read", "create", …) on `path` failed.
#[derive(Debug)]
pub struct PathIoError {
    /// What was being done.
    pub what: &'static str,
    /// On what.
    pub path: PathBuf,
    /// Why it failed.
    pub source: std::io::Error,
}

impl PathIoError {
    /// A `map_err` adapter: `.map_err(PathIoError::on("read", path))`.
    pub fn on(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PathIoError {
        let path = path.to_path_buf();
        move |source| PathIoError { what, path, source }
    }
}

impl std::fmt::Display for PathIoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.what, self.path.display(), self.source)
    }
}

impl std::error::Error for PathIoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_source() {
        let e = PathIoError::on("read", Path::new("/x"))(std::io::Error::other("boom"));
        assert_eq!(e.to_string(), "read /x: boom");
        assert!(std::error::Error::source(&e).is_some());
    }
}
