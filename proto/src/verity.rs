//! dm-verity hash trees, laid out exactly as the kernel's dm-verity target and
//! `veritysetup format --no-superblock` lay them out (format 1, SHA-256, 4 KiB data and hash
//! blocks).
//!
//! Every data block `i` hashes to `SHA-256(salt || block)`; 128 such digests fill one hash
//! block (zero-padded); the hash blocks of a level are hashed the same way into the level
//! above, until one block remains: the root hash is `SHA-256(salt || that block)`. The hash
//! area stores the levels top-down (the single top block first, the data-block digests last),
//! each level a whole number of blocks. A data segment whose size is not a multiple of 4 KiB is
//! hashed as if padded with zeros to the next block (the image format pads segments with zeros
//! anyway).
//!
//! The image builder streams a segment through [`TreeBuilder`]; the manifest records the salt,
//! the root hash and which segment holds the tree ([`crate::manifest::Verity`]); the guest maps
//! the data segment through dm-verity with that root hash, so every block read after boot is
//! checked and nothing has to be hashed in advance.

use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
/// Longest salt (what `veritysetup` accepts).
pub const MAX_SALT: usize = 256;
/// SHA-256 digests per hash block.
const HASHES_PER_BLOCK: u64 = BLOCK / 32;

/// Data blocks of a `size`-byte data segment (its last block zero-padded).
pub fn data_blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Blocks of each hash level, bottom (digests of the data blocks) first. Empty for 0 or 1 data
/// blocks (the kernel then uses the data block's digest itself as the root).
pub fn level_blocks(data_blocks: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(HASHES_PER_BLOCK);
        levels.push(n);
    }
    levels
}

/// Bytes of the hash area for `data_blocks` data blocks.
pub fn tree_size(data_blocks: u64) -> u64 {
    level_blocks(data_blocks)
        .iter()
        .fold(0u64, |acc, b| acc.saturating_add(b.saturating_mul(BLOCK)))
}

/// The hash tree of one data segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// The root hash (what the manifest signs and the kernel checks against).
    pub root_hash: [u8; 32],
    /// The hash area: the levels top-down, each a whole number of blocks.
    pub bytes: Vec<u8>,
}

/// Streams a data segment and builds its [`Tree`]. Memory: the digests of the data blocks
/// (32 bytes per 4 KiB, under 1% of the segment) plus one block.
#[derive(Clone, Debug)]
pub struct TreeBuilder {
    salt: Vec<u8>,
    block: Vec<u8>,
    /// Digests of the data blocks, in order (level 0 before padding).
    leaves: Vec<u8>,
}

impl TreeBuilder {
    /// A builder with this salt (at most [`MAX_SALT`] bytes; longer salts are cut).
    pub fn new(salt: &[u8]) -> TreeBuilder {
        TreeBuilder {
            salt: salt[..salt.len().min(MAX_SALT)].to_vec(),
            block: Vec::with_capacity(BLOCK as usize),
            leaves: Vec::new(),
        }
    }

    fn digest(&self, block: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(block);
        h.finalize().into()
    }

    /// Feed the next bytes of the data segment.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let want = BLOCK as usize - self.block.len();
            let take = want.min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK as usize {
                let d = self.digest(&self.block);
                self.leaves.extend_from_slice(&d);
                self.block.clear();
            }
        }
    }

    /// The tree of everything fed (a final partial block is zero-padded).
    pub fn finish(mut self) -> Tree {
        if !self.block.is_empty() {
            self.block.resize(BLOCK as usize, 0);
            let d = self.digest(&self.block);
            self.leaves.extend_from_slice(&d);
            self.block.clear();
        }
        let blocks = self.leaves.len() as u64 / 32;
        if blocks <= 1 {
            let mut root = [0u8; 32];
            if let Some(d) = self.leaves.get(..32) {
                root.copy_from_slice(d);
            }
            return Tree {
                root_hash: root,
                bytes: Vec::new(),
            };
        }
        // Bottom-up: each level padded to whole blocks, then hashed block by block.
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut cur = std::mem::take(&mut self.leaves);
        loop {
            let padded = (cur.len() as u64).div_ceil(BLOCK) * BLOCK;
            cur.resize(padded as usize, 0);
            let next: Vec<u8> = cur
                .chunks(BLOCK as usize)
                .flat_map(|b| self.digest(b))
                .collect();
            let top = cur.len() as u64 == BLOCK;
            levels.push(cur);
            if top {
                let mut root = [0u8; 32];
                root.copy_from_slice(&next[..32]);
                let bytes = levels.into_iter().rev().flatten().collect();
                return Tree {
                    root_hash: root,
                    bytes,
                };
            }
            cur = next;
        }
    }
}

/// The tree of `data` in one call.
pub fn tree(salt: &[u8], data: &[u8]) -> Tree {
    let mut b = TreeBuilder::new(salt);
    b.update(data);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_sizes_follow_the_kernel() {
        assert_eq!(level_blocks(1), Vec::<u64>::new());
        assert_eq!(level_blocks(2), vec![1]);
        assert_eq!(level_blocks(128), vec![1]);
        assert_eq!(level_blocks(129), vec![2, 1]);
        assert_eq!(level_blocks(128 * 128 + 1), vec![129, 2, 1]);
        assert_eq!(tree_size(129), 3 * BLOCK);
        assert_eq!(data_blocks(4097), 2);
    }

    #[test]
    fn tree_is_top_down_and_rooted_in_the_top_block() {
        let data: Vec<u8> = (0..(130 * BLOCK as usize))
            .map(|i| (i % 251) as u8)
            .collect();
        let t = tree(b"salt", &data);
        assert_eq!(t.bytes.len() as u64, tree_size(130));
        // Top block first; the root hashes it.
        let mut h = Sha256::new();
        h.update(b"salt");
        h.update(&t.bytes[..BLOCK as usize]);
        assert_eq!(<[u8; 32]>::from(h.finalize()), t.root_hash);
        // The last level holds the data block digests.
        let mut h = Sha256::new();
        h.update(b"salt");
        h.update(&data[..BLOCK as usize]);
        let first: [u8; 32] = h.finalize().into();
        assert_eq!(&t.bytes[BLOCK as usize..BLOCK as usize + 32], &first);
        // Streaming in odd pieces gives the same tree.
        let mut b = TreeBuilder::new(b"salt");
        for c in data.chunks(1000) {
            b.update(c);
        }
        assert_eq!(b.finish(), t);
    }

    #[test]
    fn a_changed_byte_changes_the_root() {
        let mut data = vec![7u8; 10 * BLOCK as usize];
        let a = tree(&[1, 2, 3], &data).root_hash;
        data[5 * BLOCK as usize + 9] ^= 1;
        assert_ne!(a, tree(&[1, 2, 3], &data).root_hash);
        assert_ne!(
            a,
            tree(&[1, 2, 4], &vec![7u8; 10 * BLOCK as usize]).root_hash
        );
    }
}
