//! The checked-in generated Cap'n Proto code (proto/src/rpc/) must match
//! proto/schema/. Runs the same check as `cargo xtask codegen --check` (the
//! xtask module is included verbatim). Needs the `capnp` compiler: without it
//! this test fails with an install hint (CI installs `capnproto`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// `run`, `Args` and `regenerate` are the xtask entry points, unused here.
#[allow(dead_code)]
#[path = "../../../xtask/src/codegen.rs"]
mod codegen;

#[test]
fn generated_code_is_fresh() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    if let Err(e) = codegen::require_capnp() {
        panic!("{e:#}");
    }
    if let Err(e) = codegen::check(&root) {
        panic!("{e:#}");
    }
}
