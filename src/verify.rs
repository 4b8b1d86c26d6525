//! The hash a re-image checks a stored image against.
//!
//! Glance's md5 and sha512 are published, but far too slow to recompute on every re-image.
//! The upload therefore also records an xxh3-128, and the refill checks the bytes it reads
//! against it. Two layouts of that hash exist:
//!
//! - **Block hash** (`block_hash`, every upload since it was introduced): the xxh3-128 of
//!   each 4 KiB block of the image that is not all zeros, each preceded by its offset, and
//!   finally the image's length. Zero blocks add nothing, so a refill skips the holes of a
//!   sparse image instead of hashing gigabytes of zeros, yet still notices any changed byte:
//!   a block that turned zero or non-zero changes the list of offsets hashed.
//! - **Stream hash** (`verify_hash`, uploads of older versions): the xxh3-128 of every byte.
//!   Holes must then be hashed as the zeros they read as.
//!
//! Blocks are aligned to multiples of [`BLOCK`] in the image, however the bytes arrive.

use xxhash_rust::xxh3::Xxh3;

/// The unit of the block hash: the block size of the file systems we store images on.
pub const BLOCK: usize = 4096;

/// The hash an image was uploaded with, which its refill recomputes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Expected {
    /// Images uploaded before any hash was recorded: nothing to check.
    None,
    Stream(u128),
    Blocks(u128),
}

/// Computes the hash of an [`Expected`] layout from an image's bytes, fed in order.
pub struct Verifier {
    expected: Expected,
    xxh3: Xxh3,
}

impl Verifier {
    pub fn new(expected: Expected) -> Self {
        Self {
            expected,
            xxh3: Xxh3::new(),
        }
    }

    /// Feeds `bytes` read at `offset`, which is a multiple of [`BLOCK`]; `bytes` ends on a
    /// block boundary or at the end of the image.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) {
        match self.expected {
            Expected::None => {}
            Expected::Stream(_) => self.xxh3.update(bytes),
            Expected::Blocks(_) => block_hash_update(&mut self.xxh3, offset, bytes),
        }
    }

    /// Feeds `len` zero bytes that were not read (a hole of the image file).
    pub fn hole(&mut self, mut len: u64) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        if !matches!(self.expected, Expected::Stream(_)) {
            return;
        }
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.xxh3.update(&ZEROS[..n]);
            len -= n as u64;
        }
    }

    /// Checks the hash of an image of `len` bytes, all fed.
    pub fn check(&self, len: u64) -> Result<(), String> {
        let matches = match self.expected {
            Expected::None => true,
            Expected::Stream(expected) => self.xxh3.digest128() == expected,
            Expected::Blocks(expected) => block_hash_digest(&self.xxh3, len) == expected,
        };
        if matches {
            Ok(())
        } else {
            Err(
                "the image's bytes differ from the bytes that were uploaded: the stored image \
                 is corrupt"
                    .to_string(),
            )
        }
    }
}

/// Adds the non-zero blocks of `bytes`, found at `offset`, to a block hash.
pub fn block_hash_update(xxh3: &mut Xxh3, offset: u64, bytes: &[u8]) {
    debug_assert_eq!(offset % BLOCK as u64, 0);
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if !is_zero(block) {
            xxh3.update(&(offset + (i * BLOCK) as u64).to_le_bytes());
            xxh3.update(block);
        }
    }
}

/// The block hash of an image of `len` bytes whose blocks were all added to `xxh3`.
pub fn block_hash_digest(xxh3: &Xxh3, len: u64) -> u128 {
    let mut xxh3 = xxh3.clone();
    xxh3.update(&len.to_le_bytes());
    xxh3.digest128()
}

/// Whether every byte of `block` is zero.
///
/// Words are or-ed 256 bytes at a time, which the compiler vectorizes, and the scan stops at
/// the first piece that is not zero: a block of data costs a few words, not the whole block.
pub fn is_zero(block: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the aligned
    // middle of the slice.
    let (head, middle, tail) = unsafe { block.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && middle
            .chunks(16)
            .all(|words| words.iter().fold(0u128, |acc, &word| acc | word) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_hash(image: &[u8]) -> u128 {
        let mut xxh3 = Xxh3::new();
        block_hash_update(&mut xxh3, 0, image);
        block_hash_digest(&xxh3, image.len() as u64)
    }

    #[test]
    fn block_hash_sees_every_change() {
        let mut image = vec![0u8; 5 * BLOCK + 7];
        image[BLOCK + 3] = 1;
        image[5 * BLOCK + 6] = 9;
        let original = block_hash(&image);

        // A zero block turned non-zero, a data block turned zero, a byte moved to the next
        // block, and the same bytes with a longer tail of zeros: each hashes differently.
        let mut changed = image.clone();
        changed[3 * BLOCK] = 1;
        assert_ne!(block_hash(&changed), original);
        let mut changed = image.clone();
        changed[BLOCK + 3] = 0;
        assert_ne!(block_hash(&changed), original);
        let mut changed = image.clone();
        changed[BLOCK + 3] = 0;
        changed[2 * BLOCK + 3] = 1;
        assert_ne!(block_hash(&changed), original);
        let mut longer = image.clone();
        longer.push(0);
        assert_ne!(block_hash(&longer), original);
    }

    #[test]
    fn block_hash_is_the_same_in_any_pieces() {
        let mut image = vec![0u8; 9 * BLOCK + 100];
        image[BLOCK..3 * BLOCK].fill(0x5a);
        image[9 * BLOCK + 99] = 1;
        let whole = block_hash(&image);

        let mut verifier = Verifier::new(Expected::Blocks(whole));
        verifier.data(0, &image[..3 * BLOCK]);
        verifier.hole(BLOCK as u64);
        verifier.data(4 * BLOCK as u64, &image[4 * BLOCK..]);
        verifier.check(image.len() as u64).unwrap();

        let mut verifier = Verifier::new(Expected::Blocks(whole));
        verifier.data(0, &image[..3 * BLOCK]);
        let err = verifier.check(image.len() as u64).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn stream_hash_takes_holes_as_zeros() {
        let mut image = vec![0u8; 3 * BLOCK];
        image[..BLOCK].fill(7);
        let mut xxh3 = Xxh3::new();
        xxh3.update(&image);

        let mut verifier = Verifier::new(Expected::Stream(xxh3.digest128()));
        verifier.data(0, &image[..BLOCK]);
        verifier.hole(2 * BLOCK as u64);
        verifier.check(image.len() as u64).unwrap();
    }
}
