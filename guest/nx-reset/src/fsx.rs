//! Small-file helpers: the shared hardened ones of [`nx_guest::fsx`] (atomic replace through a
//! directory fd with an `O_NOFOLLOW | O_EXCL` temp file, durable removal, bounded reads).

pub(crate) use nx_guest::fsx::{
    read_bounded_nofollow as read_bounded, remove_durable, sync_dir, write_atomic,
};
