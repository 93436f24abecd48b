//! Generated Cap'n Proto code (see proto/schema/ and `cargo xtask codegen`).
