//! Limits of extended attributes, as Linux has them; the master enforces
//! them and the FUSE mount answers with the matching errno before asking.

/// Longest attribute name, in bytes (Linux `XATTR_NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Largest attribute value, in bytes (Linux `XATTR_SIZE_MAX`).
pub const VALUE_MAX: usize = 64 * 1024;
/// Most bytes of names and values one inode may carry.
pub const TOTAL_MAX: usize = 64 * 1024;
