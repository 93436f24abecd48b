//! Staging file, journal and atomic install.
