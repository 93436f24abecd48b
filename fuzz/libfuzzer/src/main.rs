//! One libFuzzer binary for every target of `nx-fuzz`; `NX_FUZZ_TARGET` names the target
//! (`cargo xtask fuzz TARGET` sets it).
#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<String> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let name = TARGET.get_or_init(|| std::env::var("NX_FUZZ_TARGET").unwrap_or_default());
    nx_fuzz::run(name, data);
});
