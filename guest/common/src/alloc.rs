//! Allocator tuning shared by the long-lived programs that move large buffers (flashd, `nx`).

/// Bytes from which glibc serves an allocation with its own `mmap`.
pub const MMAP_THRESHOLD: i32 = 512 * 1024;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD`]: 1 MiB blocks (chunks read from an image,
/// install copies, patch references) then come from `mmap` and go back to the kernel when
/// freed, while small buffers stay on the heap and are reused. Left dynamic, glibc raises the
/// threshold after the first large free, and every thread's arena keeps each MiB it ever used
/// resident: `nx flash send` of a dense 256 MiB image peaked at 75 MiB (37 MiB with this), and
/// flashd's peak crept up with each install. Call it first thing in `main`, before any other
/// thread exists. A no-op on other C libraries.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
