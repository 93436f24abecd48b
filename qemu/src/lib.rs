//! QEMU runner (see docs/runner).
