//! A validating, zero-copy reader of qcow2 images over a byte slice.
//!
//! The refill maps an uploaded image read-only and hands the whole mapping to
//! [`Qcow2Image::parse`], which reads metadata only: the header and its extensions, the active
//! L1 table, the L2 tables it points to, the refcount table and the snapshot table. Guest data
//! is never touched by parsing. [`Qcow2Image::mappings`] then describes the guest disk in
//! order, as runs of [`Extent`]s:
//!
//! - `Data` runs carry the host offset of their bytes, so the refill writes them with `pwrite`
//!   straight from the mapping ([`Qcow2Image::host_bytes`]);
//! - `Zero` runs are left as holes;
//! - `Compressed` clusters are inflated one at a time into a cluster-sized buffer
//!   ([`Qcow2Image::decompress_cluster`], or [`Qcow2Image::decompress_cluster_with`] to reuse
//!   a [`Decompressor`] per worker thread).
//!
//! # Supported
//! - Versions 2 and 3, cluster sizes 512 B to 2 MiB.
//! - Unallocated clusters (zeros: a backing file is refused, so nothing shows through),
//!   normal clusters, zero clusters with or without preallocated host space, and compressed
//!   clusters: raw deflate (no zlib header, as qemu writes them) or zstd when the header's
//!   compression type is 1.
//! - Extended L2 entries: 32 subclusters per cluster, each allocated, zero or unallocated.
//! - Internal snapshots: their table and L1 tables are checked; the active state is read.
//! - Any virtual size. qemu counts a disk in 512-byte sectors and ignores a partial last
//!   sector, so [`Qcow2Image::virtual_size`] is the header's size rounded down to 512 and the
//!   mappings end exactly there: the bytes equal `qemu-img convert -O raw` of the image.
//!
//! # Refused
//! Everything that would make the content depend on another file or key, or that shows the
//! image is damaged, fails [`Qcow2Image::parse`] with a [`Qcow2Error`] that names the cause:
//! a backing file, an external data file (and the raw external data bit), encryption,
//! unknown incompatible features, the dirty and corrupt bits, an invalid header length,
//! compression type, header extension or snapshot table, a missing refcount table (qemu
//! refuses it too), tables or clusters outside the file or misaligned, an L1 table too small
//! for the virtual size, metadata structures that overlap each other, data or compressed
//! clusters that overlap metadata, and reserved bits set in table entries. A compressed
//! cluster that does not inflate to exactly one cluster fails its decompression, so a
//! truncated image never reads as zeros.
//!
//! Not checked: refcount values (reading does not depend on them), bitmap extension tables,
//! and host clusters shared between guest clusters.
//!
//! # Safety model
//! - Every read is a bounds-checked `get` with checked arithmetic: no input makes this module
//!   panic, overflow or read outside the slice.
//! - Memory is bounded by the file, never by a count read from it: parsing keeps one bit per
//!   host cluster of the file (2 MiB for a 1 TiB image with 64 KiB clusters); decompression
//!   writes into the caller's buffer and bounds the zstd window to 8 MiB.
//! - Work is bounded by the metadata present in the file: walks visit the L1 entries that cover
//!   the virtual size and the entries of the L2 tables they point to; an unallocated L1 range
//!   is one zero run whatever its size.
//! - The slice is the caller's read-only mapping of the image file. If the file shrinks under
//!   it, a touched page past the end raises SIGBUS: the caller parses and refills under a
//!   [`crate::sigbus::Guard`], which reads vanished pages as zeros and flags the window, and
//!   fails the refill when the guard reports a fault, whatever this module returned.
//!
//! # Fuzzing
//! The seed corpus is `fuzz/corpus/qcow2/` (small images made by `fuzz/make-corpus.sh`).
//! `cargo test --lib qcow2::tests::corpus` replays it with a deterministic mutation loop
//! (`QCOW2_FUZZ_ITERATIONS` sets its length). With a nightly toolchain and `cargo-fuzz`:
//! `cargo +nightly fuzz run qcow2 /tmp/qcow2-corpus fuzz/corpus/qcow2 -- -max_total_time=600`
//! from the repository root (libFuzzer adds new inputs to the first directory only, so the
//! committed seeds stay as they are).

use std::fmt;

use zstd::stream::raw::{DParameter, Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

/// The first four bytes of every qcow2 image.
const MAGIC: &[u8; 4] = b"QFI\xfb";

const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
/// Offset of the v3 `compression_type` byte, present when the header is longer.
const COMPRESSION_TYPE_AT: u64 = 104;

const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// The spec requires 16 KiB clusters for extended L2 entries.
const MIN_SUBCLUSTER_CLUSTER_BITS: u32 = 14;
const SUBCLUSTERS: u64 = 32;
const SECTOR: u64 = 512;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = (1 << 5) - 1;
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;

/// Bits 9-55 of L1 and standard L2 entries: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 0-8 and 56-62 of an L1 entry.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits 1-8 and 56-61 of a standard L2 entry.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L2_ZERO: u64 = 1 << 0;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_COPIED: u64 = 1 << 63;
/// Bits 0-8 of a refcount table entry.
const REFCOUNT_RESERVED: u64 = 0x1ff;
/// Host offsets must stay below 2^56, also inside compressed descriptors.
const MAX_HOST_OFFSET_BITS: u32 = 56;

/// qemu's own limit on the number of internal snapshots.
const MAX_SNAPSHOTS: u32 = 65536;
const SNAPSHOT_ENTRY_FIXED_LEN: u64 = 40;

/// Largest zstd window accepted (2^23 = 8 MiB); a cluster is at most 2 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A qcow2 structure, named in errors.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Structure {
    /// The header in the first cluster.
    Header,
    /// A header extension after the header.
    HeaderExtension,
    /// The active L1 table.
    L1Table,
    /// An L2 table of the active L1 table.
    L2Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    SnapshotL1Table,
    /// A normal guest data cluster (or subcluster run).
    DataCluster,
    /// The compressed bytes of a guest cluster.
    CompressedCluster,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::HeaderExtension => "header extension",
            Self::L1Table => "L1 table",
            Self::L2Table => "L2 table",
            Self::RefcountTable => "refcount table",
            Self::RefcountBlock => "refcount block",
            Self::SnapshotTable => "snapshot table",
            Self::SnapshotL1Table => "snapshot L1 table",
            Self::DataCluster => "data cluster",
            Self::CompressedCluster => "compressed cluster",
        })
    }
}

/// Why an image is refused or a cluster cannot be read.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum Qcow2Error {
    #[error("not a qcow2 image: the QFI\\xfb magic is missing")]
    NotQcow2,
    #[error("the qcow2 header is cut short: the file has only {file_len} bytes")]
    TruncatedHeader { file_len: u64 },
    #[error("qcow2 version {0} is not supported; versions 2 and 3 are")]
    UnsupportedVersion(u32),
    #[error("cluster_bits {0} is not supported; 9 to 21 (512 B to 2 MiB clusters) are")]
    UnsupportedClusterSize(u32),
    #[error(
        "header length {0} is invalid: version 3 needs a multiple of 8 from 104 bytes up to the \
         cluster size"
    )]
    InvalidHeaderLength(u64),
    #[error("the image is dirty: it was not closed cleanly and its metadata may be inconsistent")]
    Dirty,
    #[error("the image is marked corrupt")]
    MarkedCorrupt,
    #[error("the image keeps its data in an external data file; only self-contained images are")]
    ExternalDataFile,
    #[error("the image sets the raw external data bit, which belongs to external data files")]
    RawExternalData,
    #[error("the image uses unknown incompatible features (bits {0:#x})")]
    UnknownIncompatibleFeatures(u64),
    #[error("the image has a backing file; only self-contained images are accepted")]
    BackingFile,
    #[error("the image is encrypted (crypt_method {0}); encrypted images are not accepted")]
    Encrypted(u32),
    #[error("compression type {0} is unknown; 0 (deflate) and 1 (zstd) are supported")]
    UnknownCompressionType(u8),
    #[error("the compression type feature bit does not match compression type {0}")]
    CompressionBitMismatch(u8),
    #[error("refcount order {0} is invalid; the maximum is 6")]
    InvalidRefcountOrder(u32),
    #[error("the image has no refcount table")]
    NoRefcountTable,
    #[error("extended L2 entries need clusters of at least 16 KiB, not {0} bytes")]
    SubclustersTooSmall(u64),
    #[error("the virtual size of {0} bytes is too large")]
    VirtualSizeTooLarge(u64),
    #[error("the L1 table has {l1_size} entries but the virtual size needs {needed}")]
    L1TableTooSmall { l1_size: u32, needed: u64 },
    #[error("the header extension at offset {offset} is invalid: {reason}")]
    InvalidHeaderExtension { offset: u64, reason: &'static str },
    #[error("the snapshot table is invalid: {reason}")]
    InvalidSnapshotTable { reason: &'static str },
    #[error(
        "the {what} at offset {offset} ({len} bytes) does not fit in the file of {file_len} bytes"
    )]
    OutsideFile {
        what: Structure,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("the {what} at offset {offset} is not aligned to a cluster")]
    Misaligned { what: Structure, offset: u64 },
    #[error("the {what} at offset {offset} overlaps other metadata")]
    Overlap { what: Structure, offset: u64 },
    #[error("{what} entry {index} ({entry:#018x}) is invalid: {reason}")]
    InvalidTableEntry {
        what: Structure,
        index: u64,
        entry: u64,
        reason: &'static str,
    },
    #[error("the L2 entry of guest offset {guest_offset} ({entry:#018x}) is invalid: {reason}")]
    InvalidL2Entry {
        guest_offset: u64,
        entry: u64,
        reason: &'static str,
    },
    #[error("the compressed cluster at guest offset {guest_offset} is corrupt: {reason}")]
    CorruptCompressedCluster {
        guest_offset: u64,
        reason: &'static str,
    },
    #[error("a buffer of {len} bytes cannot take a cluster of {cluster_size} bytes")]
    BufferSize { len: u64, cluster_size: u64 },
    #[error("the mapping at guest offset {0} is not a compressed cluster")]
    NotCompressed(u64),
}

/// How compressed clusters are compressed; one algorithm per image.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Compression {
    /// Raw deflate (RFC 1951) without a zlib header; qemu calls it "zlib".
    Deflate,
    /// Zstandard frames.
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        })
    }
}

/// Where the guest bytes of a [`Mapping`] come from.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Extent {
    /// The guest bytes are the file's bytes from `host_offset` on, `len` of them.
    Data { host_offset: u64 },
    /// The guest bytes read as zeros.
    Zero,
    /// One compressed cluster, stored in `compressed_len` bytes from `host_offset`.
    ///
    /// The mapping starts on a cluster boundary; its guest bytes are the first `len` bytes of
    /// the inflated cluster ([`Qcow2Image::decompress_cluster`]).
    Compressed {
        host_offset: u64,
        compressed_len: u64,
        algorithm: Compression,
    },
}

/// A run of guest bytes `[guest_offset, guest_offset + len)` and where they come from.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Mapping {
    /// Byte offset in the guest disk.
    pub guest_offset: u64,
    /// Bytes in the run; never 0.
    pub len: u64,
    pub extent: Extent,
}

impl Mapping {
    /// Extends `self` by `next` when they are one run: adjacent zeros, or adjacent data that
    /// is also contiguous in the file. Compressed clusters stay one mapping each.
    fn absorb(&mut self, next: &Mapping) -> bool {
        let Some(end) = self.guest_offset.checked_add(self.len) else {
            return false;
        };
        let joins = end == next.guest_offset
            && match (self.extent, next.extent) {
                (Extent::Zero, Extent::Zero) => true,
                (Extent::Data { host_offset: a }, Extent::Data { host_offset: b }) => {
                    a.checked_add(self.len) == Some(b)
                }
                _ => false,
            };
        if joins {
            self.len += next.len;
        }
        joins
    }
}

/// What an upload needs to know about an image, from [`inspect`] or [`Qcow2Image::info`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ImageInfo {
    /// 2 or 3.
    pub version: u32,
    /// Guest disk size in bytes as qemu sees it: the header's size rounded down to 512.
    pub virtual_size: u64,
    /// The `size` field of the header, in bytes.
    pub header_size: u64,
    pub cluster_size: u64,
    /// The algorithm of compressed clusters, if the image has any.
    pub compression: Compression,
    /// Whether L2 entries describe 32 subclusters each.
    pub extended_l2: bool,
    pub refcount_bits: u32,
    /// Internal snapshots (their content is not read).
    pub snapshots: u32,
    /// Guest bytes stored in normal clusters.
    pub data_bytes: u64,
    /// Guest bytes stored in compressed clusters.
    pub compressed_bytes: u64,
}

/// Whether `head` (the first bytes of a file) starts like a qcow2 image.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// Parses and validates a whole image and describes it.
pub fn inspect(bytes: &[u8]) -> Result<ImageInfo, Qcow2Error> {
    Qcow2Image::parse(bytes).map(|image| image.info())
}

/// Guest bytes between two calls of the release callback of [`Qcow2Image::parse_releasing`].
pub const RELEASE_EVERY: u64 = 16 << 20;

/// A parsed and validated qcow2 image, borrowing the bytes of the file.
pub struct Qcow2Image<'a> {
    bytes: &'a [u8],
    info: ImageInfo,
    cluster_bits: u32,
    /// log2 of the entries in one L2 table.
    l2_bits: u32,
    l1_offset: u64,
    /// L1 entries covering the header's size; later entries are never read.
    l1_entries: u64,
}

impl fmt::Debug for Qcow2Image<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("file_len", &self.bytes.len())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<'a> Qcow2Image<'a> {
    /// Parses `bytes`, the whole image file, and validates every structure the guest disk
    /// depends on; after `Ok`, [`Self::mappings`] yields no error.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Qcow2Error> {
        Self::parse_releasing(bytes, &|| {})
    }

    /// [`Self::parse`], calling `release` after every [`RELEASE_EVERY`] bytes of guest disk
    /// checked, so that a caller who mapped the file can drop the pages read so far: the
    /// tables of an image with small clusters are spread over the whole file, and the kernel
    /// maps the pages around each one it reads.
    pub fn parse_releasing(bytes: &'a [u8], release: &dyn Fn()) -> Result<Self, Qcow2Error> {
        let header = Header::read(bytes)?;
        header.check()?;
        check_extensions(bytes, &header)?;

        let mut image = Self::layout(bytes, &header)?;
        let mut host = HostClusters::new(image.file_len(), header.cluster_bits)?;
        image.claim_metadata(&header, &mut host)?;
        image.check_guest_clusters(&host, release)?;
        Ok(image)
    }

    /// Sizes, features and counts of the image.
    pub fn info(&self) -> ImageInfo {
        self.info
    }

    /// Guest disk size in bytes: the header's size rounded down to 512, as qemu reads it.
    pub fn virtual_size(&self) -> u64 {
        self.info.virtual_size
    }

    /// Bytes per cluster: the size of the buffer [`Self::decompress_cluster`] fills.
    pub fn cluster_size(&self) -> u64 {
        self.info.cluster_size
    }

    /// The guest disk in order, as merged runs covering exactly `[0, virtual_size)`.
    pub fn mappings(&self) -> Mappings<'_, 'a> {
        Mappings {
            pieces: self.pieces(),
            pending: None,
        }
    }

    /// The file's bytes behind a `Data` mapping; `None` for other extents.
    pub fn host_bytes(&self, mapping: &Mapping) -> Option<&'a [u8]> {
        match mapping.extent {
            Extent::Data { host_offset } => span(self.bytes, host_offset, mapping.len),
            _ => None,
        }
    }

    /// Inflates the compressed cluster of `mapping` into `out`, which must be exactly one
    /// cluster long. Builds a fresh [`Decompressor`]; workers should keep one and call
    /// [`Self::decompress_cluster_with`].
    pub fn decompress_cluster(&self, mapping: &Mapping, out: &mut [u8]) -> Result<(), Qcow2Error> {
        self.decompress_cluster_with(&mut Decompressor::new(), mapping, out)
    }

    /// [`Self::decompress_cluster`] with a reusable `decompressor`.
    pub fn decompress_cluster_with(
        &self,
        decompressor: &mut Decompressor,
        mapping: &Mapping,
        out: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        let Extent::Compressed {
            host_offset,
            compressed_len,
            algorithm,
        } = mapping.extent
        else {
            return Err(Qcow2Error::NotCompressed(mapping.guest_offset));
        };
        if out.len() as u64 != self.cluster_size() {
            return Err(Qcow2Error::BufferSize {
                len: out.len() as u64,
                cluster_size: self.cluster_size(),
            });
        }
        let input =
            span(self.bytes, host_offset, compressed_len).ok_or(Qcow2Error::OutsideFile {
                what: Structure::CompressedCluster,
                offset: host_offset,
                len: compressed_len,
                file_len: self.file_len(),
            })?;

        let inflated = match algorithm {
            Compression::Deflate => decompressor.inflate_deflate(input, out),
            Compression::Zstd => decompressor.inflate_zstd(input, out),
        };
        inflated.map_err(|reason| Qcow2Error::CorruptCompressedCluster {
            guest_offset: mapping.guest_offset,
            reason,
        })
    }

    fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn is_extended(&self) -> bool {
        self.info.extended_l2
    }

    /// Checks the header's sizes against each other and builds the image with empty counts.
    fn layout(bytes: &'a [u8], header: &Header) -> Result<Self, Qcow2Error> {
        let extended_l2 = header.incompatible & INCOMPAT_EXTENDED_L2 != 0;
        let entry_bits = if extended_l2 { 4 } else { 3 };
        let l2_bits = header.cluster_bits - entry_bits;
        // At most 21 + 18 bits: a shift that cannot overflow.
        let l1_span = 1u64 << (header.cluster_bits + l2_bits);
        let l1_entries = header.size.div_ceil(l1_span);
        if u64::from(header.l1_size) < l1_entries {
            return Err(Qcow2Error::L1TableTooSmall {
                l1_size: header.l1_size,
                needed: l1_entries,
            });
        }

        let compression = match header.compression_type {
            0 => Compression::Deflate,
            _ => Compression::Zstd,
        };
        let info = ImageInfo {
            version: header.version,
            virtual_size: header.size / SECTOR * SECTOR,
            header_size: header.size,
            cluster_size: 1 << header.cluster_bits,
            compression,
            extended_l2,
            refcount_bits: 1 << header.refcount_order,
            snapshots: header.nb_snapshots,
            data_bytes: 0,
            compressed_bytes: 0,
        };
        Ok(Self {
            bytes,
            info,
            cluster_bits: header.cluster_bits,
            l2_bits,
            l1_offset: header.l1_table_offset,
            l1_entries,
        })
    }

    /// Claims every metadata cluster in `host`, failing on the first overlap.
    fn claim_metadata(&self, header: &Header, host: &mut HostClusters) -> Result<(), Qcow2Error> {
        host.claim_header();

        let l1_len = u64::from(header.l1_size) * 8;
        host.claim(Structure::L1Table, header.l1_table_offset, l1_len)?;

        let table_len = u64::from(header.refcount_table_clusters) << self.cluster_bits;
        host.claim(
            Structure::RefcountTable,
            header.refcount_table_offset,
            table_len,
        )?;
        for index in 0..table_len / 8 {
            let entry = self.read_entry(
                Structure::RefcountTable,
                header.refcount_table_offset,
                index,
            )?;
            if entry & REFCOUNT_RESERVED != 0 {
                return Err(Qcow2Error::InvalidTableEntry {
                    what: Structure::RefcountTable,
                    index,
                    entry,
                    reason: "reserved bits are set",
                });
            }
            if entry != 0 {
                host.claim(Structure::RefcountBlock, entry, self.cluster_size())?;
            }
        }

        self.claim_snapshots(header, host)?;

        for index in 0..self.l1_entries {
            if let Some(l2_offset) = self.l2_table(index)? {
                host.claim(Structure::L2Table, l2_offset, self.cluster_size())?;
            }
        }
        Ok(())
    }

    /// Checks the snapshot table and claims it with the snapshots' L1 tables.
    fn claim_snapshots(&self, header: &Header, host: &mut HostClusters) -> Result<(), Qcow2Error> {
        if header.nb_snapshots == 0 {
            return Ok(());
        }
        if header.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Qcow2Error::InvalidSnapshotTable {
                reason: "more than 65536 snapshots",
            });
        }

        let start = header.snapshots_offset;
        let mut at = start;
        for _ in 0..header.nb_snapshots {
            let fixed =
                span(self.bytes, at, SNAPSHOT_ENTRY_FIXED_LEN).ok_or(Qcow2Error::OutsideFile {
                    what: Structure::SnapshotTable,
                    offset: start,
                    len: at.saturating_sub(start) + SNAPSHOT_ENTRY_FIXED_LEN,
                    file_len: self.file_len(),
                })?;
            let l1_offset = be64(fixed, 0).unwrap_or(0);
            let l1_size = be32(fixed, 8).unwrap_or(0);
            let id_len = be16(fixed, 12).unwrap_or(0);
            let name_len = be16(fixed, 14).unwrap_or(0);
            let extra_len = be32(fixed, 36).unwrap_or(0);

            if l1_size != 0 {
                host.claim(
                    Structure::SnapshotL1Table,
                    l1_offset,
                    u64::from(l1_size) * 8,
                )?;
            }
            let entry_len = (SNAPSHOT_ENTRY_FIXED_LEN
                + u64::from(extra_len)
                + u64::from(id_len)
                + u64::from(name_len))
            .next_multiple_of(8);
            at = at
                .checked_add(entry_len)
                .ok_or(Qcow2Error::InvalidSnapshotTable {
                    reason: "an entry is too long",
                })?;
        }
        host.claim(Structure::SnapshotTable, start, at - start)
    }

    /// Walks the guest disk once, checking that no data lies on metadata, and counts it.
    fn check_guest_clusters(
        &mut self,
        host: &HostClusters,
        release: &dyn Fn(),
    ) -> Result<(), Qcow2Error> {
        let (mut data_bytes, mut compressed_bytes) = (0u64, 0u64);
        let mut next_release = RELEASE_EVERY;
        for piece in self.pieces() {
            let piece = piece?;
            if piece.guest_offset + piece.len >= next_release {
                release();
                next_release = piece.guest_offset + piece.len + RELEASE_EVERY;
            }
            match piece.extent {
                Extent::Data { host_offset } => {
                    host.check_free(Structure::DataCluster, host_offset, piece.len)?;
                    data_bytes += piece.len;
                }
                Extent::Compressed {
                    host_offset,
                    compressed_len,
                    ..
                } => {
                    host.check_free(Structure::CompressedCluster, host_offset, compressed_len)?;
                    compressed_bytes += piece.len;
                }
                Extent::Zero => {}
            }
        }

        self.info.data_bytes = data_bytes;
        self.info.compressed_bytes = compressed_bytes;
        Ok(())
    }

    /// Unmerged mappings, one per L1 range, cluster or run of like subclusters.
    fn pieces(&self) -> Pieces<'_, 'a> {
        Pieces {
            image: self,
            guest_offset: 0,
            failed: false,
        }
    }

    /// Entry `index` (8 bytes) of the table at `table`.
    fn read_entry(&self, what: Structure, table: u64, index: u64) -> Result<u64, Qcow2Error> {
        index
            .checked_mul(8)
            .and_then(|delta| table.checked_add(delta))
            .and_then(|at| be64(self.bytes, at))
            .ok_or(Qcow2Error::OutsideFile {
                what,
                offset: table,
                len: index.saturating_add(1).saturating_mul(8),
                file_len: self.file_len(),
            })
    }

    /// The L2 table of L1 entry `index`, or `None` when its whole range is unallocated.
    fn l2_table(&self, index: u64) -> Result<Option<u64>, Qcow2Error> {
        let entry = self.read_entry(Structure::L1Table, self.l1_offset, index)?;
        if entry & L1_RESERVED != 0 {
            return Err(Qcow2Error::InvalidTableEntry {
                what: Structure::L1Table,
                index,
                entry,
                reason: "reserved bits are set",
            });
        }

        let offset = entry & OFFSET_MASK;
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(Qcow2Error::Misaligned {
                what: Structure::L2Table,
                offset,
            });
        }
        Ok((offset != 0).then_some(offset))
    }

    /// The mapping that starts at `guest_offset` (below the virtual size) and runs to the
    /// end of its L1 range, cluster, or run of like subclusters.
    fn piece_at(&self, guest_offset: u64) -> Result<Mapping, Qcow2Error> {
        let l1_shift = self.cluster_bits + self.l2_bits;
        let l1_index = guest_offset >> l1_shift;
        let Some(l2_offset) = self.l2_table(l1_index)? else {
            let range_end = (l1_index + 1)
                .checked_mul(1 << l1_shift)
                .map_or(self.virtual_size(), |end| end.min(self.virtual_size()));
            return Ok(Mapping {
                guest_offset,
                len: range_end - guest_offset,
                extent: Extent::Zero,
            });
        };

        let cluster_size = self.cluster_size();
        let cluster_start = guest_offset & !(cluster_size - 1);
        let cluster_end = (cluster_start + cluster_size).min(self.virtual_size());
        let index = (guest_offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1);
        let (entry, bitmap) = if self.is_extended() {
            let entry = self.read_entry(Structure::L2Table, l2_offset, index * 2)?;
            let bitmap = self.read_entry(Structure::L2Table, l2_offset, index * 2 + 1)?;
            (entry, bitmap)
        } else {
            (self.read_entry(Structure::L2Table, l2_offset, index)?, 0)
        };

        let invalid = |reason| Qcow2Error::InvalidL2Entry {
            guest_offset: cluster_start,
            entry,
            reason,
        };
        let (end, extent) = if entry & L2_COMPRESSED != 0 {
            if bitmap != 0 {
                return Err(invalid("a compressed cluster has a subcluster bitmap"));
            }
            (cluster_end, self.compressed_extent(entry, cluster_start)?)
        } else if self.is_extended() {
            if entry & L2_ZERO != 0 {
                return Err(invalid(
                    "the zero flag is reserved with extended L2 entries",
                ));
            }
            let host_cluster = self.host_cluster(entry, cluster_start)?;
            self.subcluster_run(
                guest_offset,
                cluster_start,
                cluster_end,
                host_cluster,
                bitmap,
            )
            .map_err(invalid)?
        } else {
            let host_cluster = self.host_cluster(entry, cluster_start)?;
            let within = guest_offset - cluster_start;
            let extent = if entry & L2_ZERO != 0 {
                if self.info.version == 2 {
                    return Err(invalid("the zero flag is reserved in version 2 images"));
                }
                Extent::Zero
            } else if host_cluster == 0 {
                Extent::Zero
            } else {
                Extent::Data {
                    host_offset: host_cluster + within,
                }
            };
            (cluster_end, extent)
        };

        let mapping = Mapping {
            guest_offset,
            len: end - guest_offset,
            extent,
        };
        if let Extent::Data { host_offset } = extent {
            if self.host_bytes(&mapping).is_none() {
                return Err(Qcow2Error::OutsideFile {
                    what: Structure::DataCluster,
                    offset: host_offset,
                    len: mapping.len,
                    file_len: self.file_len(),
                });
            }
        }
        Ok(mapping)
    }

    /// The host cluster offset of a standard L2 entry (0 when none), checked.
    fn host_cluster(&self, entry: u64, guest_offset: u64) -> Result<u64, Qcow2Error> {
        if entry & L2_RESERVED != 0 {
            return Err(Qcow2Error::InvalidL2Entry {
                guest_offset,
                entry,
                reason: "reserved bits are set",
            });
        }
        let offset = entry & OFFSET_MASK;
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(Qcow2Error::Misaligned {
                what: Structure::DataCluster,
                offset,
            });
        }
        Ok(offset)
    }

    /// The run of subclusters like the one at `guest_offset`, up to the cluster's end.
    fn subcluster_run(
        &self,
        guest_offset: u64,
        cluster_start: u64,
        cluster_end: u64,
        host_cluster: u64,
        bitmap: u64,
    ) -> Result<(u64, Extent), &'static str> {
        let subcluster_bits = self.cluster_bits - SUBCLUSTERS.trailing_zeros();
        let within = guest_offset - cluster_start;
        // Per subcluster: bit 0 allocated, bit 1 reads as zeros.
        let state =
            |index: u64| ((bitmap >> index) & 1) | (((bitmap >> (SUBCLUSTERS + index)) & 1) << 1);

        let first = within >> subcluster_bits;
        let mut next = first + 1;
        while next < SUBCLUSTERS && state(next) == state(first) {
            next += 1;
        }
        let end = (cluster_start + (next << subcluster_bits)).min(cluster_end);

        let extent = match state(first) {
            0b11 => return Err("a subcluster is both allocated and zero"),
            0b01 if host_cluster == 0 => return Err("an allocated subcluster has no host cluster"),
            0b01 => Extent::Data {
                host_offset: host_cluster + within,
            },
            _ => Extent::Zero,
        };
        Ok((end, extent))
    }

    /// Decodes a compressed cluster descriptor and checks its bytes lie in the file.
    fn compressed_extent(&self, entry: u64, guest_offset: u64) -> Result<Extent, Qcow2Error> {
        let invalid = |reason| Qcow2Error::InvalidL2Entry {
            guest_offset,
            entry,
            reason,
        };
        if entry & L2_COPIED != 0 {
            return Err(invalid("a compressed cluster has the copied flag"));
        }

        // The offset takes the low 62 - (cluster_bits - 8) bits, the sector count the rest.
        let offset_bits = 62 - (self.cluster_bits - 8);
        let host_offset = entry & ((1 << offset_bits) - 1);
        if host_offset >> MAX_HOST_OFFSET_BITS != 0 {
            return Err(invalid("the compressed data offset is beyond 2^56"));
        }
        let sectors = ((entry & !(L2_COMPRESSED | L2_COPIED)) >> offset_bits) + 1;

        // The sector count rounds the end up to a sector, which may pass a file whose last
        // sector is partial: accept that slack, no more.
        let end = (host_offset & !(SECTOR - 1)) + sectors * SECTOR;
        let file_len = self.file_len();
        let file_end = file_len.next_multiple_of(SECTOR);
        if host_offset >= file_len || end > file_end {
            return Err(Qcow2Error::OutsideFile {
                what: Structure::CompressedCluster,
                offset: host_offset,
                len: end - host_offset,
                file_len,
            });
        }
        Ok(Extent::Compressed {
            host_offset,
            compressed_len: end.min(file_len) - host_offset,
            algorithm: self.info.compression,
        })
    }
}

/// The guest disk as merged runs; see [`Qcow2Image::mappings`].
///
/// Yields an error at most once, after which it ends. A parsed image yields none.
pub struct Mappings<'i, 'a> {
    pieces: Pieces<'i, 'a>,
    pending: Option<Result<Mapping, Qcow2Error>>,
}

impl Iterator for Mappings<'_, '_> {
    type Item = Result<Mapping, Qcow2Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut run = match self.pending.take().or_else(|| self.pieces.next())? {
            Ok(mapping) => mapping,
            Err(err) => return Some(Err(err)),
        };
        for piece in self.pieces.by_ref() {
            match piece {
                Ok(next) if run.absorb(&next) => {}
                other => {
                    self.pending = Some(other);
                    break;
                }
            }
        }
        Some(Ok(run))
    }
}

/// Unmerged mappings in guest order; ends after the first error.
struct Pieces<'i, 'a> {
    image: &'i Qcow2Image<'a>,
    guest_offset: u64,
    failed: bool,
}

impl Iterator for Pieces<'_, '_> {
    type Item = Result<Mapping, Qcow2Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.guest_offset >= self.image.virtual_size() {
            return None;
        }
        let piece = self.image.piece_at(self.guest_offset);
        match &piece {
            // Every piece is at least one byte long and ends at most at the virtual size.
            Ok(mapping) => self.guest_offset += mapping.len,
            Err(_) => self.failed = true,
        }
        Some(piece)
    }
}

/// Reusable inflate state; one per thread that decompresses clusters.
pub struct Decompressor {
    /// libdeflate: whole-buffer inflation, which suits a cluster whose inflated size is
    /// known and is faster than a streaming inflater.
    deflate: libdeflater::Decompressor,
    zstd: Option<ZstdDecoder<'static>>,
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Decompressor {
    /// Empty state; the zstd decoder is only set up for the first zstd cluster.
    pub fn new() -> Self {
        Self {
            deflate: libdeflater::Decompressor::new(),
            zstd: None,
        }
    }

    /// Inflates raw deflate `input` into exactly `out.len()` bytes; bytes after the end of
    /// the stream (sector padding, the next compressed cluster) are ignored.
    fn inflate_deflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
        // libdeflate stops at the stream's final block, whatever follows it in `input`.
        match self.deflate.deflate_decompress(input, out) {
            Ok(written) if written == out.len() => Ok(()),
            Ok(_) => Err("the data inflates to less than a cluster"),
            Err(libdeflater::DecompressionError::InsufficientSpace) => {
                Err("the data inflates to more than a cluster")
            }
            Err(libdeflater::DecompressionError::BadData) => {
                Err("the data is not valid deflate, or is cut short")
            }
        }
    }

    /// Decodes zstd frames from `input` until `out` is full and the last frame has ended;
    /// bytes after it are ignored, as qemu does.
    fn inflate_zstd(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
        let decoder = match &mut self.zstd {
            Some(decoder) => {
                decoder
                    .reinit()
                    .map_err(|_| "the zstd decoder cannot be reset")?;
                decoder
            }
            None => {
                let mut decoder = ZstdDecoder::new().map_err(|_| "no zstd decoder")?;
                decoder
                    .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                    .map_err(|_| "the zstd decoder cannot be limited")?;
                self.zstd.insert(decoder)
            }
        };

        let capacity = out.len();
        let mut src = InBuffer::around(input);
        let mut dst = OutBuffer::around(out);
        let mut remaining_hint = 1;
        while dst.pos() < capacity {
            let before = (src.pos(), dst.pos());
            remaining_hint = decoder
                .run(&mut src, &mut dst)
                .map_err(|_| "the data is not valid zstd")?;
            if (src.pos(), dst.pos()) == before {
                return Err("the compressed data is cut short");
            }
        }

        // A full buffer may leave the frame's epilogue (a checksum) unread: finish it with no
        // room left, which fails if the frame still had bytes to produce.
        if remaining_hint != 0 {
            remaining_hint = decoder
                .run(&mut src, &mut dst)
                .map_err(|_| "the data is not valid zstd")?;
        }
        if remaining_hint != 0 {
            return Err("the data inflates to more than a cluster");
        }
        Ok(())
    }
}

/// The fields of the header this reader uses, in host byte order.
struct Header {
    version: u32,
    backing_file_offset: u64,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u64,
    compression_type: u8,
}

impl Header {
    fn read(bytes: &[u8]) -> Result<Self, Qcow2Error> {
        if !probe(bytes) {
            return Err(Qcow2Error::NotQcow2);
        }
        let truncated = Qcow2Error::TruncatedHeader {
            file_len: bytes.len() as u64,
        };
        let u32_at = |at| be32(bytes, at).ok_or(truncated.clone());
        let u64_at = |at| be64(bytes, at).ok_or(truncated.clone());

        let version = u32_at(4)?;
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let mut header = Self {
            version,
            backing_file_offset: u64_at(8)?,
            cluster_bits: u32_at(20)?,
            size: u64_at(24)?,
            crypt_method: u32_at(32)?,
            l1_size: u32_at(36)?,
            l1_table_offset: u64_at(40)?,
            refcount_table_offset: u64_at(48)?,
            refcount_table_clusters: u32_at(56)?,
            nb_snapshots: u32_at(60)?,
            snapshots_offset: u64_at(64)?,
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
        };
        if version == 2 {
            return Ok(header);
        }

        header.incompatible = u64_at(72)?;
        header.autoclear = u64_at(88)?;
        header.refcount_order = u32_at(96)?;
        header.header_length = u64::from(u32_at(100)?);
        if header.header_length > COMPRESSION_TYPE_AT {
            header.compression_type = span(bytes, COMPRESSION_TYPE_AT, 1)
                .and_then(|byte| byte.first().copied())
                .ok_or(truncated)?;
        }
        Ok(header)
    }

    /// Refuses what this reader does not support or what makes the content depend on
    /// anything but the file, before any table is read.
    fn check(&self) -> Result<(), Qcow2Error> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Qcow2Error::UnsupportedClusterSize(self.cluster_bits));
        }
        let cluster_size = 1u64 << self.cluster_bits;
        if self.version == 3
            && (self.header_length < V3_MIN_HEADER_LEN
                || self.header_length % 8 != 0
                || self.header_length > cluster_size)
        {
            return Err(Qcow2Error::InvalidHeaderLength(self.header_length));
        }

        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(Qcow2Error::Dirty);
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        if self.incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(Qcow2Error::UnknownIncompatibleFeatures(
                self.incompatible & !INCOMPAT_KNOWN,
            ));
        }
        if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(Qcow2Error::RawExternalData);
        }
        if self.backing_file_offset != 0 {
            return Err(Qcow2Error::BackingFile);
        }
        if self.crypt_method != 0 {
            return Err(Qcow2Error::Encrypted(self.crypt_method));
        }

        if self.compression_type > 1 {
            return Err(Qcow2Error::UnknownCompressionType(self.compression_type));
        }
        let has_compression_bit = self.incompatible & INCOMPAT_COMPRESSION != 0;
        if has_compression_bit != (self.compression_type != 0) {
            return Err(Qcow2Error::CompressionBitMismatch(self.compression_type));
        }
        // qemu will not open such an image either.
        if self.refcount_table_clusters == 0 {
            return Err(Qcow2Error::NoRefcountTable);
        }
        if self.refcount_order > 6 {
            return Err(Qcow2Error::InvalidRefcountOrder(self.refcount_order));
        }
        if self.incompatible & INCOMPAT_EXTENDED_L2 != 0
            && self.cluster_bits < MIN_SUBCLUSTER_CLUSTER_BITS
        {
            return Err(Qcow2Error::SubclustersTooSmall(cluster_size));
        }
        // Guest offsets are `off_t` for the refill's pwrite.
        if self.size > i64::MAX as u64 {
            return Err(Qcow2Error::VirtualSizeTooLarge(self.size));
        }
        Ok(())
    }
}

/// Walks the header extensions, which must end within the first cluster.
fn check_extensions(bytes: &[u8], header: &Header) -> Result<(), Qcow2Error> {
    let area_end = 1u64 << header.cluster_bits;
    let mut at = header.header_length;
    while at < area_end {
        let invalid = |reason| Qcow2Error::InvalidHeaderExtension { offset: at, reason };
        let (Some(kind), Some(len)) = (be32(bytes, at), be32(bytes, at + 4)) else {
            return Err(invalid("the file ends inside it"));
        };
        let data_at = at + 8;
        let len = u64::from(len);
        if data_at > area_end || len > area_end - data_at {
            return Err(invalid("it runs past the first cluster"));
        }
        if span(bytes, data_at, len).is_none() {
            return Err(invalid("the file ends inside it"));
        }

        match kind {
            EXT_END => return Ok(()),
            EXT_CRYPTO_HEADER => return Err(invalid("an encryption header in a plain image")),
            _ => {}
        }
        at = data_at + len.next_multiple_of(8);
    }
    Ok(())
}

/// One bit per host cluster of the file: set where metadata lives.
struct HostClusters {
    claimed: Vec<u64>,
    cluster_bits: u32,
    file_len: u64,
}

impl HostClusters {
    fn new(file_len: u64, cluster_bits: u32) -> Result<Self, Qcow2Error> {
        let clusters = file_len.div_ceil(1 << cluster_bits);
        let words = usize::try_from(clusters.div_ceil(64))
            .map_err(|_| Qcow2Error::TruncatedHeader { file_len })?;
        Ok(Self {
            claimed: vec![0; words],
            cluster_bits,
            file_len,
        })
    }

    /// The first cluster holds the header and its extensions.
    fn claim_header(&mut self) {
        if let Some(word) = self.claimed.first_mut() {
            *word |= 1;
        }
    }

    /// Claims `[offset, offset + len)` for `what`: aligned, inside the file, unclaimed.
    fn claim(&mut self, what: Structure, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if offset & ((1 << self.cluster_bits) - 1) != 0 {
            return Err(Qcow2Error::Misaligned { what, offset });
        }
        if len == 0 {
            return Ok(());
        }
        for cluster in self.clusters(what, offset, len)? {
            let (word, bit) = self.bit(cluster);
            let word = self
                .claimed
                .get_mut(word)
                .ok_or(Qcow2Error::Overlap { what, offset })?;
            if *word & bit != 0 {
                return Err(Qcow2Error::Overlap { what, offset });
            }
            *word |= bit;
        }
        Ok(())
    }

    /// Fails if `[offset, offset + len)` touches a metadata cluster.
    fn check_free(&self, what: Structure, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        for cluster in self.clusters(what, offset, len)? {
            let (word, bit) = self.bit(cluster);
            if self.claimed.get(word).is_none_or(|word| word & bit != 0) {
                return Err(Qcow2Error::Overlap { what, offset });
            }
        }
        Ok(())
    }

    /// The clusters `[offset, offset + len)` touches, once checked to lie in the file.
    fn clusters(
        &self,
        what: Structure,
        offset: u64,
        len: u64,
    ) -> Result<std::ops::Range<u64>, Qcow2Error> {
        let end = offset.checked_add(len).filter(|&end| end <= self.file_len);
        let Some(end) = end else {
            return Err(Qcow2Error::OutsideFile {
                what,
                offset,
                len,
                file_len: self.file_len,
            });
        };
        Ok(offset >> self.cluster_bits..end.div_ceil(1 << self.cluster_bits))
    }

    fn bit(&self, cluster: u64) -> (usize, u64) {
        let word = usize::try_from(cluster / 64).unwrap_or(usize::MAX);
        (word, 1 << (cluster % 64))
    }
}

/// The bytes `[offset, offset + len)` of `bytes`, if they are all there.
fn span(bytes: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    bytes.get(start..start.checked_add(len)?)
}

fn be16(bytes: &[u8], at: u64) -> Option<u16> {
    Some(u16::from_be_bytes(span(bytes, at, 2)?.try_into().ok()?))
}

fn be32(bytes: &[u8], at: u64) -> Option<u32> {
    Some(u32::from_be_bytes(span(bytes, at, 4)?.try_into().ok()?))
}

fn be64(bytes: &[u8], at: u64) -> Option<u64> {
    Some(u64::from_be_bytes(span(bytes, at, 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    const BACKING_FILE_OFFSET_AT: usize = 8;
    const CLUSTER_BITS_AT: usize = 20;
    const SIZE_AT: usize = 24;
    const CRYPT_METHOD_AT: usize = 32;
    const L1_SIZE_AT: usize = 36;
    const L1_OFFSET_AT: usize = 40;
    const REFCOUNT_TABLE_AT: usize = 48;
    const REFCOUNT_CLUSTERS_AT: usize = 56;
    const INCOMPAT_AT: usize = 72;
    const AUTOCLEAR_AT: usize = 88;
    const HEADER_LENGTH_AT: usize = 100;

    /// Runs a qemu tool; a failure fails the test with the tool's own message.
    fn run(program: &str, args: &[&str]) {
        let output = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} (`make deps` installs it): {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A temporary directory of images made with qemu-img and qemu-io.
    struct Scratch {
        dir: tempfile::TempDir,
    }

    impl Scratch {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).to_str().unwrap().to_string()
        }

        /// `qemu-img create` with `options` (the comma-separated `-o` list).
        fn create(&self, name: &str, options: &str, size: u64) {
            let (path, size) = (self.path(name), size.to_string());
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            args.extend([path.as_str(), size.as_str()]);
            run("qemu-img", &args);
        }

        /// Runs each of `commands` through qemu-io on the image.
        fn io(&self, name: &str, commands: &[String]) {
            let path = self.path(name);
            let mut args = vec!["-f", "qcow2"];
            for command in commands {
                args.extend(["-c", command.as_str()]);
            }
            args.push(path.as_str());
            run("qemu-io", &args);
        }

        /// `qemu-img convert -O raw` of the image: the reference guest disk.
        fn raw(&self, name: &str) -> Vec<u8> {
            let out = self.path(&format!("{name}.raw"));
            run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    &self.path(name),
                    &out,
                ],
            );
            std::fs::read(out).unwrap()
        }

        fn read(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.path(name)).unwrap()
        }

        fn write(&self, name: &str, bytes: &[u8]) {
            std::fs::write(self.path(name), bytes).unwrap();
        }
    }

    /// The guest disk rebuilt from the mappings, checking that they tile the virtual size
    /// in order and are merged.
    fn materialize(image: &Qcow2Image<'_>) -> Vec<u8> {
        let mut disk = vec![0u8; usize::try_from(image.virtual_size()).unwrap()];
        let mut cluster = vec![0u8; image.cluster_size() as usize];
        let mut decompressor = Decompressor::new();
        let mut previous: Option<Mapping> = None;
        let mut next_offset = 0;
        for mapping in image.mappings() {
            let mapping = mapping.unwrap();
            assert_eq!(mapping.guest_offset, next_offset, "{mapping:?}");
            assert!(mapping.len > 0, "{mapping:?}");
            if let Some(mut previous) = previous {
                assert!(
                    !previous.absorb(&mapping),
                    "unmerged {previous:?} {mapping:?}"
                );
            }

            let range =
                mapping.guest_offset as usize..(mapping.guest_offset + mapping.len) as usize;
            match mapping.extent {
                Extent::Data { .. } => {
                    disk[range].copy_from_slice(image.host_bytes(&mapping).unwrap());
                }
                Extent::Zero => {}
                Extent::Compressed { .. } => {
                    assert_eq!(mapping.guest_offset % image.cluster_size(), 0);
                    image
                        .decompress_cluster_with(&mut decompressor, &mapping, &mut cluster)
                        .unwrap();
                    disk[range].copy_from_slice(&cluster[..mapping.len as usize]);
                }
            }
            next_offset += mapping.len;
            previous = Some(mapping);
        }
        assert_eq!(next_offset, image.virtual_size());
        disk
    }

    /// Parses `name`, rebuilds its guest disk and compares it with qemu's raw conversion.
    fn assert_reads_like_qemu(scratch: &Scratch, name: &str) -> ImageInfo {
        let bytes = scratch.read(name);
        let image = Qcow2Image::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = materialize(&image);
        let theirs = scratch.raw(name);

        assert_eq!(ours.len(), theirs.len(), "{name}: virtual size");
        if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            panic!("{name}: first difference at guest offset {at}");
        }
        image.info()
    }

    /// Writes that cover every cluster type: partial and unaligned data, zeroes over
    /// nothing and over data (preallocated), a compressed cluster, data at the very end.
    fn cluster_mix(cluster: u64, virtual_size: u64) -> Vec<String> {
        let c = cluster;
        vec![
            format!("write -P 0x11 {} {}", c / 2, c),
            format!("write -P 0x22 {} {}", 3 * c, 2 * c),
            format!("write -z {} {}", 4 * c + 512, 512),
            format!("write -z {} {}", 6 * c, 2 * c),
            format!("write -P 0x33 {} {}", 9 * c, c),
            format!("write -z {} {}", 9 * c, c),
            format!("write -c -P 0x44 {} {}", 11 * c, c),
            format!("write -P 0x55 {} {}", 13 * c + 1024, 3 * c),
            format!("write -P 0x66 {} 1024", virtual_size - 1024),
        ]
    }

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    fn get_u64(bytes: &[u8], at: usize) -> u64 {
        be64(bytes, at as u64).unwrap()
    }

    /// Byte offset in the file of the L2 entry that maps `guest_offset`.
    fn l2_entry_at(bytes: &[u8], guest_offset: u64) -> usize {
        let cluster_bits = be32(bytes, CLUSTER_BITS_AT as u64).unwrap();
        let version = be32(bytes, 4).unwrap();
        let extended = version == 3 && get_u64(bytes, INCOMPAT_AT) & INCOMPAT_EXTENDED_L2 != 0;
        let entry_len = if extended { 16 } else { 8 };
        let entries = (1u64 << cluster_bits) / entry_len;

        let cluster = guest_offset >> cluster_bits;
        let l1 = get_u64(bytes, L1_OFFSET_AT);
        let l2 = get_u64(bytes, (l1 + cluster / entries * 8) as usize) & OFFSET_MASK;
        assert_ne!(l2, 0, "no L2 table for guest offset {guest_offset}");
        (l2 + cluster % entries * entry_len) as usize
    }

    /// A version 3 image made by hand: header, an empty refcount table in cluster 1 and an L1
    /// table of zeros in cluster 2.
    fn hand_made(cluster_bits: u32, size: u64, l1_size: u32) -> Vec<u8> {
        let cluster = 1usize << cluster_bits;
        let mut bytes = vec![0u8; 2 * cluster + l1_size as usize * 8];
        bytes[..4].copy_from_slice(MAGIC);
        put_u32(&mut bytes, 4, 3);
        put_u32(&mut bytes, CLUSTER_BITS_AT, cluster_bits);
        put_u64(&mut bytes, SIZE_AT, size);
        put_u32(&mut bytes, L1_SIZE_AT, l1_size);
        put_u64(&mut bytes, L1_OFFSET_AT, 2 * cluster as u64);
        put_u64(&mut bytes, REFCOUNT_TABLE_AT, cluster as u64);
        put_u32(&mut bytes, REFCOUNT_CLUSTERS_AT, 1);
        put_u32(&mut bytes, 96, 4);
        put_u32(&mut bytes, HEADER_LENGTH_AT, 112);
        bytes
    }

    /// Pseudo-random bytes that deflate to about half their size.
    fn half_compressible(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state & 0x0f) as u8
            })
            .collect()
    }

    #[test]
    fn probe_recognises_the_magic() {
        assert!(probe(b"QFI\xfb\0\0\0\x03"));
        assert!(!probe(b"QFI"));
        assert!(!probe(b"\0\0\0\0QFI\xfb"));
        assert_eq!(inspect(b"hello world"), Err(Qcow2Error::NotQcow2));
    }

    #[test]
    fn every_version_and_cluster_size_reads_like_qemu() {
        let scratch = Scratch::new();
        for compat in ["0.10", "1.1"] {
            for cluster_bits in [9, 12, 16, 21] {
                let cluster = 1u64 << cluster_bits;
                let size = 20 * cluster + 3 * 512;
                let name = format!("v{compat}-{cluster}.qcow2");
                scratch.create(
                    &name,
                    &format!("compat={compat},cluster_size={cluster}"),
                    size,
                );
                scratch.io(&name, &cluster_mix(cluster, size));

                let info = assert_reads_like_qemu(&scratch, &name);

                assert_eq!(info.version, if compat == "0.10" { 2 } else { 3 });
                assert_eq!(info.cluster_size, cluster);
                assert_eq!(info.virtual_size, size);
                assert_eq!(info.compressed_bytes, cluster, "{name}");
                assert!(info.data_bytes >= 5 * cluster, "{name}: {info:?}");
            }
        }
    }

    #[test]
    fn other_qemu_layouts_read_like_qemu() {
        let scratch = Scratch::new();
        let size = 20 * 65536;
        let variants = [
            ("prealloc-metadata", "preallocation=metadata"),
            ("prealloc-falloc", "preallocation=falloc"),
            ("refcount-1", "refcount_bits=1"),
            ("refcount-64", "refcount_bits=64"),
            ("lazy-refcounts", "lazy_refcounts=on"),
            ("extended-prealloc", "extended_l2=on,preallocation=metadata"),
        ];
        for (name, options) in variants {
            // qemu cannot compress into preallocated clusters.
            let mut commands = cluster_mix(65536, size);
            commands.retain(|c| !(options.contains("prealloc") && c.starts_with("write -c")));
            scratch.create(name, options, size);
            scratch.io(name, &commands);
            assert_reads_like_qemu(&scratch, name);
        }

        // Resized both ways, downgraded to version 2, with a persistent bitmap.
        let path = scratch.path("refcount-1");
        run("qemu-img", &["resize", "-q", &path, "+3000320"]);
        assert_reads_like_qemu(&scratch, "refcount-1");
        run("qemu-img", &["resize", "-q", "--shrink", &path, "999936"]);
        assert_reads_like_qemu(&scratch, "refcount-1");
        run(
            "qemu-img",
            &[
                "amend",
                "-q",
                "-o",
                "compat=0.10",
                &scratch.path("lazy-refcounts"),
            ],
        );
        assert_eq!(
            assert_reads_like_qemu(&scratch, "lazy-refcounts").version,
            2
        );
        run(
            "qemu-img",
            &["bitmap", "--add", &scratch.path("prealloc-metadata"), "b0"],
        );
        assert_reads_like_qemu(&scratch, "prealloc-metadata");
    }

    #[test]
    fn a_compressed_cluster_ending_inside_the_last_sector_reads_like_qemu() {
        let scratch = Scratch::new();
        for options in ["cluster_size=4096", "compression_type=zstd"] {
            scratch.create("tail.qcow2", options, 1 << 20);
            let commands = ["write -P 0x01 0 4k", "write -c -P 0x02 128k 64k"].map(String::from);
            scratch.io("tail.qcow2", &commands);
            assert_ne!(scratch.read("tail.qcow2").len() % 512, 0, "{options}");

            assert_reads_like_qemu(&scratch, "tail.qcow2");
        }
    }

    #[test]
    fn images_and_decompressors_can_be_shared_with_workers() {
        fn shareable<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shareable::<Qcow2Image<'static>>();
        shareable::<Mapping>();
        movable::<Decompressor>();
    }

    #[test]
    fn zero_clusters_read_as_zeros_with_and_without_preallocation() {
        let scratch = Scratch::new();
        let cluster = 65536;
        scratch.create("zero.qcow2", "", 20 * cluster);
        scratch.io("zero.qcow2", &cluster_mix(cluster, 20 * cluster));
        let bytes = scratch.read("zero.qcow2");

        // The mix leaves cluster 6 zero without host space and cluster 9 zero over the host
        // cluster its data had.
        let plain = get_u64(&bytes, l2_entry_at(&bytes, 6 * cluster));
        let preallocated = get_u64(&bytes, l2_entry_at(&bytes, 9 * cluster));
        assert_eq!(plain & (L2_ZERO | OFFSET_MASK), L2_ZERO);
        assert_eq!(preallocated & L2_ZERO, L2_ZERO);
        assert_ne!(preallocated & OFFSET_MASK, 0);

        assert_reads_like_qemu(&scratch, "zero.qcow2");
    }

    #[test]
    fn compressed_images_read_like_qemu_with_deflate_and_zstd() {
        let scratch = Scratch::new();
        let mut source = half_compressible(3 << 20);
        source[1 << 20..(1 << 20) + 300_000].fill(0);
        source[2 << 20..(2 << 20) + 70_000].fill(0x5a);
        scratch.write("source.raw", &source);

        for (compression, cluster) in [
            ("zlib", 512),
            ("zlib", 65536),
            ("zstd", 4096),
            ("zstd", 2 << 20),
        ] {
            let name = format!("{compression}-{cluster}.qcow2");
            let options = format!("compression_type={compression},cluster_size={cluster}");
            let args = ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &options];
            let (source, target) = (scratch.path("source.raw"), scratch.path(&name));
            run(
                "qemu-img",
                &[&args[..], &[source.as_str(), target.as_str()]].concat(),
            );

            let info = assert_reads_like_qemu(&scratch, &name);

            let expected = if compression == "zlib" {
                Compression::Deflate
            } else {
                Compression::Zstd
            };
            assert_eq!(info.compression, expected);
            assert!(info.compressed_bytes > 0, "{name}: {info:?}");
        }
    }

    #[test]
    fn extended_l2_subclusters_read_like_qemu() {
        let scratch = Scratch::new();
        for cluster in [16384u64, 65536, 2 << 20] {
            let sub = cluster / 32;
            let size = 20 * cluster + 4096 + 512;
            let name = format!("extended-{cluster}.qcow2");
            scratch.create(
                &name,
                &format!("extended_l2=on,cluster_size={cluster}"),
                size,
            );
            let mut commands = vec![
                // Cluster 0: allocated, unallocated, zero and allocated subclusters mixed.
                format!("write -P 0x11 {sub} {sub}"),
                format!("write -P 0x22 {} {}", 3 * sub, 2 * sub),
                format!("write -z {} {}", 8 * sub, sub),
                format!("write -P 0x23 {} {}", 9 * sub + 100, 10),
                // Cluster 2: data, then zeroes over part of it and over a neighbour.
                format!("write -P 0x33 {} {cluster}", 2 * cluster),
                format!("write -z {} {}", 2 * cluster + 4 * sub, 3 * sub),
                format!("write -z {} {}", 3 * cluster, 5 * sub),
            ];
            commands.extend(cluster_mix(cluster, size).into_iter().skip(6));
            scratch.io(&name, &commands);

            let info = assert_reads_like_qemu(&scratch, &name);

            assert!(info.extended_l2);
            assert_eq!(info.compressed_bytes, cluster);
        }
    }

    #[test]
    fn odd_virtual_sizes_end_where_qemu_ends() {
        let scratch = Scratch::new();
        // qemu-img rounds a new image up to a sector: 1000001 becomes 1000448.
        scratch.create("odd.qcow2", "", 1_000_001);
        scratch.io("odd.qcow2", &["write -P 0x77 0 1000448".to_string()]);
        let info = assert_reads_like_qemu(&scratch, "odd.qcow2");
        assert_eq!(info.virtual_size, 1_000_448);

        // A header size that is not a sector multiple reads like qemu: rounded down.
        let mut bytes = scratch.read("odd.qcow2");
        put_u64(&mut bytes, SIZE_AT, 1_000_001);
        scratch.write("odd.qcow2", &bytes);
        let info = assert_reads_like_qemu(&scratch, "odd.qcow2");
        assert_eq!((info.header_size, info.virtual_size), (1_000_001, 999_936));
    }

    #[test]
    fn a_sparse_image_maps_in_few_runs() {
        let scratch = Scratch::new();
        let size = 8u64 << 30;
        scratch.create("sparse.qcow2", "", size);
        let commands = ["write -P 0x01 0 64k", "write -P 0x02 7G 64k"].map(String::from);
        scratch.io("sparse.qcow2", &commands);
        let bytes = scratch.read("sparse.qcow2");

        let image = Qcow2Image::parse(&bytes).unwrap();
        let mappings: Vec<Mapping> = image.mappings().map(Result::unwrap).collect();

        assert_eq!(image.info().data_bytes, 128 << 10);
        assert_eq!(mappings.len(), 4);
        assert_eq!(mappings[1].extent, Extent::Zero);
        assert_eq!(mappings[1].len, (7 << 30) - (64 << 10));
        assert_eq!(mappings[3].guest_offset + mappings[3].len, size);
    }

    #[test]
    fn a_huge_unallocated_image_is_one_zero_run() {
        let size = 1u64 << 55;
        let bytes = hand_made(21, size, 1 << 16);

        let image = Qcow2Image::parse(&bytes).unwrap();
        let mappings: Vec<Mapping> = image.mappings().map(Result::unwrap).collect();

        let whole = Mapping {
            guest_offset: 0,
            len: size,
            extent: Extent::Zero,
        };
        assert_eq!(mappings, vec![whole]);
    }

    #[test]
    fn huge_virtual_sizes_without_tables_are_refused() {
        let no_l1 = hand_made(16, 1 << 62, 0);
        assert_eq!(
            inspect(&no_l1),
            Err(Qcow2Error::L1TableTooSmall {
                l1_size: 0,
                needed: 1 << 33
            })
        );

        let too_large = hand_made(16, u64::MAX, 0);
        assert_eq!(
            inspect(&too_large),
            Err(Qcow2Error::VirtualSizeTooLarge(u64::MAX))
        );
    }

    #[test]
    fn snapshots_are_checked_and_the_active_state_is_read() {
        let scratch = Scratch::new();
        scratch.create("snap.qcow2", "", 4 << 20);
        scratch.io("snap.qcow2", &["write -P 0x01 0 1M".to_string()]);
        run(
            "qemu-img",
            &["snapshot", "-c", "before", &scratch.path("snap.qcow2")],
        );
        scratch.io("snap.qcow2", &["write -P 0x02 512k 1M".to_string()]);

        let info = assert_reads_like_qemu(&scratch, "snap.qcow2");

        assert_eq!(info.snapshots, 1);
    }

    #[test]
    fn an_empty_image_has_no_mappings() {
        let scratch = Scratch::new();
        scratch.create("empty.qcow2", "", 0);
        let bytes = scratch.read("empty.qcow2");

        let image = Qcow2Image::parse(&bytes).unwrap();

        assert_eq!(image.virtual_size(), 0);
        assert_eq!(image.mappings().count(), 0);
    }

    /// A small valid image to corrupt: data in clusters 0 and 2, 64 KiB clusters.
    fn valid_image(scratch: &Scratch, options: &str) -> Vec<u8> {
        scratch.create("valid.qcow2", options, 1 << 20);
        let commands = ["write -P 0x01 0 64k", "write -P 0x02 128k 64k"].map(String::from);
        scratch.io("valid.qcow2", &commands);
        let bytes = scratch.read("valid.qcow2");
        Qcow2Image::parse(&bytes).unwrap();
        bytes
    }

    fn refusal(bytes: &[u8]) -> Qcow2Error {
        let err = Qcow2Image::parse(bytes).unwrap_err();
        assert!(!err.to_string().is_empty());
        err
    }

    #[test]
    fn dependent_images_are_refused() {
        let scratch = Scratch::new();
        scratch.create("base.qcow2", "", 1 << 20);
        let (base, child) = (scratch.path("base.qcow2"), scratch.path("child.qcow2"));
        let args = [
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &child,
        ];
        run("qemu-img", &args);
        assert_eq!(
            refusal(&scratch.read("child.qcow2")),
            Qcow2Error::BackingFile
        );

        let data_file = scratch.path("data.raw");
        scratch.create("external.qcow2", &format!("data_file={data_file}"), 1 << 20);
        assert_eq!(
            refusal(&scratch.read("external.qcow2")),
            Qcow2Error::ExternalDataFile
        );

        let options = format!("data_file={data_file},data_file_raw=on");
        scratch.create("external-raw.qcow2", &options, 1 << 20);
        assert_eq!(
            refusal(&scratch.read("external-raw.qcow2")),
            Qcow2Error::ExternalDataFile
        );

        let mut raw_bit_only = valid_image(&scratch, "");
        put_u64(&mut raw_bit_only, AUTOCLEAR_AT, AUTOCLEAR_DATA_FILE_RAW);
        assert_eq!(refusal(&raw_bit_only), Qcow2Error::RawExternalData);
    }

    #[test]
    fn encrypted_images_are_refused() {
        let scratch = Scratch::new();
        let path = scratch.path("luks.qcow2");
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=not-a-real-key",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            &path,
            "1M",
        ];
        run("qemu-img", &args);
        assert_eq!(
            refusal(&scratch.read("luks.qcow2")),
            Qcow2Error::Encrypted(2)
        );

        let mut aes = valid_image(&scratch, "");
        put_u32(&mut aes, CRYPT_METHOD_AT, 1);
        assert_eq!(refusal(&aes), Qcow2Error::Encrypted(1));
    }

    #[test]
    fn header_flags_are_checked() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");
        let with = |at: usize, value: u64| {
            let mut bytes = valid.clone();
            put_u64(&mut bytes, at, value);
            refusal(&bytes)
        };

        assert_eq!(with(INCOMPAT_AT, INCOMPAT_DIRTY), Qcow2Error::Dirty);
        assert_eq!(
            with(INCOMPAT_AT, INCOMPAT_CORRUPT),
            Qcow2Error::MarkedCorrupt
        );
        assert_eq!(
            with(INCOMPAT_AT, 1 << 5 | 1 << 40),
            Qcow2Error::UnknownIncompatibleFeatures(1 << 5 | 1 << 40)
        );
        assert_eq!(with(BACKING_FILE_OFFSET_AT, 0x200), Qcow2Error::BackingFile);

        let mut version = valid.clone();
        put_u32(&mut version, 4, 4);
        assert_eq!(refusal(&version), Qcow2Error::UnsupportedVersion(4));
        let mut cluster_bits = valid.clone();
        put_u32(&mut cluster_bits, CLUSTER_BITS_AT, 22);
        assert_eq!(
            refusal(&cluster_bits),
            Qcow2Error::UnsupportedClusterSize(22)
        );
        assert_eq!(
            refusal(&valid[..90]),
            Qcow2Error::TruncatedHeader { file_len: 90 }
        );
    }

    #[test]
    fn header_length_and_compression_type_are_checked() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");
        for length in [72, 100, 108, 65544] {
            let mut bytes = valid.clone();
            put_u32(&mut bytes, HEADER_LENGTH_AT, length);
            assert_eq!(
                refusal(&bytes),
                Qcow2Error::InvalidHeaderLength(length.into())
            );
        }

        let mut unknown = valid.clone();
        unknown[104] = 2;
        assert_eq!(refusal(&unknown), Qcow2Error::UnknownCompressionType(2));
        let mut without_bit = valid.clone();
        without_bit[104] = 1;
        assert_eq!(refusal(&without_bit), Qcow2Error::CompressionBitMismatch(1));
        let mut without_type = valid.clone();
        put_u64(&mut without_type, INCOMPAT_AT, INCOMPAT_COMPRESSION);
        assert_eq!(
            refusal(&without_type),
            Qcow2Error::CompressionBitMismatch(0)
        );
    }

    #[test]
    fn tables_outside_the_file_are_refused() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");
        let past_end = (valid.len() as u64).next_multiple_of(65536) + 65536;

        let mut l1 = valid.clone();
        put_u64(&mut l1, L1_OFFSET_AT, past_end);
        assert!(matches!(
            refusal(&l1),
            Qcow2Error::OutsideFile {
                what: Structure::L1Table,
                ..
            }
        ));

        let mut no_refcounts = valid.clone();
        put_u32(&mut no_refcounts, REFCOUNT_CLUSTERS_AT, 0);
        assert_eq!(refusal(&no_refcounts), Qcow2Error::NoRefcountTable);

        let mut refcounts = valid.clone();
        put_u64(&mut refcounts, REFCOUNT_TABLE_AT, past_end);
        assert!(matches!(
            refusal(&refcounts),
            Qcow2Error::OutsideFile {
                what: Structure::RefcountTable,
                ..
            }
        ));

        let mut l2_entry = valid.clone();
        let at = l2_entry_at(&l2_entry, 0);
        put_u64(&mut l2_entry, at, past_end | L2_COPIED);
        assert_eq!(
            refusal(&l2_entry),
            Qcow2Error::OutsideFile {
                what: Structure::DataCluster,
                offset: past_end,
                len: 65536,
                file_len: valid.len() as u64
            }
        );

        let mut l1_too_small = valid.clone();
        put_u32(&mut l1_too_small, L1_SIZE_AT, 0);
        assert_eq!(
            refusal(&l1_too_small),
            Qcow2Error::L1TableTooSmall {
                l1_size: 0,
                needed: 1
            }
        );
    }

    #[test]
    fn a_truncated_image_is_refused() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");

        let err = refusal(&valid[..valid.len() - 4096]);

        assert!(matches!(err, Qcow2Error::OutsideFile { .. }), "{err}");
    }

    #[test]
    fn overlapping_metadata_is_refused() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");
        let l1_offset = get_u64(&valid, L1_OFFSET_AT);

        let mut l1_on_refcounts = valid.clone();
        put_u64(
            &mut l1_on_refcounts,
            L1_OFFSET_AT,
            get_u64(&valid, REFCOUNT_TABLE_AT),
        );
        assert!(matches!(
            refusal(&l1_on_refcounts),
            Qcow2Error::Overlap { .. }
        ));

        let mut l2_on_header = valid.clone();
        put_u64(&mut l2_on_header, l1_offset as usize, 1 << 60);
        assert!(matches!(
            refusal(&l2_on_header),
            Qcow2Error::InvalidTableEntry { .. }
        ));
        put_u64(&mut l2_on_header, l1_offset as usize, l1_offset);
        assert_eq!(
            refusal(&l2_on_header),
            Qcow2Error::Overlap {
                what: Structure::L2Table,
                offset: l1_offset
            }
        );

        let mut data_on_l1 = valid.clone();
        let at = l2_entry_at(&data_on_l1, 0);
        put_u64(&mut data_on_l1, at, l1_offset | L2_COPIED);
        assert_eq!(
            refusal(&data_on_l1),
            Qcow2Error::Overlap {
                what: Structure::DataCluster,
                offset: l1_offset
            }
        );
    }

    #[test]
    fn misaligned_offsets_and_reserved_bits_are_refused() {
        let scratch = Scratch::new();
        let valid = valid_image(&scratch, "");
        let l1_offset = get_u64(&valid, L1_OFFSET_AT) as usize;
        let l2_offset = get_u64(&valid, l1_offset) & OFFSET_MASK;
        let at = l2_entry_at(&valid, 0);
        let data = get_u64(&valid, at);

        let mut l2 = valid.clone();
        put_u64(&mut l2, l1_offset, (l2_offset + 512) | L2_COPIED);
        assert_eq!(
            refusal(&l2),
            Qcow2Error::Misaligned {
                what: Structure::L2Table,
                offset: l2_offset + 512
            }
        );

        let mut cluster = valid.clone();
        put_u64(&mut cluster, at, data + 512);
        assert!(matches!(
            refusal(&cluster),
            Qcow2Error::Misaligned {
                what: Structure::DataCluster,
                ..
            }
        ));

        let mut l1 = valid.clone();
        put_u64(&mut l1, L1_OFFSET_AT, l1_offset as u64 + 512);
        assert!(matches!(refusal(&l1), Qcow2Error::Misaligned { .. }));

        let mut reserved = valid.clone();
        put_u64(&mut reserved, at, data | 1 << 57);
        assert!(matches!(
            refusal(&reserved),
            Qcow2Error::InvalidL2Entry { .. }
        ));
    }

    #[test]
    fn invalid_cluster_descriptors_are_refused() {
        let scratch = Scratch::new();
        let v2 = valid_image(&scratch, "compat=0.10");
        let mut zero_in_v2 = v2.clone();
        let at = l2_entry_at(&v2, 0);
        put_u64(&mut zero_in_v2, at, get_u64(&v2, at) | L2_ZERO);
        assert!(matches!(
            refusal(&zero_in_v2),
            Qcow2Error::InvalidL2Entry { .. }
        ));

        let extended = valid_image(&scratch, "extended_l2=on");
        let at = l2_entry_at(&extended, 0);
        let mut both = extended.clone();
        put_u64(&mut both, at + 8, 1 | 1 << 32);
        assert!(matches!(refusal(&both), Qcow2Error::InvalidL2Entry { .. }));
        let mut zero_flag = extended.clone();
        put_u64(&mut zero_flag, at, get_u64(&extended, at) | L2_ZERO);
        assert!(matches!(
            refusal(&zero_flag),
            Qcow2Error::InvalidL2Entry { .. }
        ));
        let mut no_host = extended.clone();
        put_u64(&mut no_host, at, 0);
        assert!(matches!(
            refusal(&no_host),
            Qcow2Error::InvalidL2Entry { .. }
        ));

        let mut small_clusters = hand_made(12, 1 << 20, 1);
        put_u64(&mut small_clusters, INCOMPAT_AT, INCOMPAT_EXTENDED_L2);
        assert_eq!(
            refusal(&small_clusters),
            Qcow2Error::SubclustersTooSmall(4096)
        );
    }

    /// A deflate image whose first cluster is compressed into several sectors.
    fn compressed_image(scratch: &Scratch, options: &str) -> Vec<u8> {
        scratch.write("source.raw", &half_compressible(1 << 20));
        let (source, target) = (scratch.path("source.raw"), scratch.path("c.qcow2"));
        let args = ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options];
        run(
            "qemu-img",
            &[&args[..], &[source.as_str(), target.as_str()]].concat(),
        );
        scratch.read("c.qcow2")
    }

    #[test]
    fn cut_compressed_data_fails_instead_of_reading_zeros() {
        let scratch = Scratch::new();
        for options in ["compression_type=zlib", "compression_type=zstd"] {
            let valid = compressed_image(&scratch, options);
            let at = l2_entry_at(&valid, 0);
            let entry = get_u64(&valid, at);
            let offset_bits = 62 - (16 - 8);
            assert!(
                entry >> offset_bits & 0xff > 2,
                "{options}: the cluster needs sectors"
            );

            // Keep the descriptor's first sector only.
            let mut cut = valid.clone();
            put_u64(
                &mut cut,
                at,
                entry & ((1 << offset_bits) - 1) | L2_COMPRESSED,
            );
            let image = Qcow2Image::parse(&cut).unwrap();
            let first = image.mappings().next().unwrap().unwrap();
            let err = image
                .decompress_cluster(&first, &mut vec![0; 65536])
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Qcow2Error::CorruptCompressedCluster {
                        guest_offset: 0,
                        ..
                    }
                ),
                "{options}: {err}"
            );

            // A file cut inside its last compressed cluster is refused outright.
            let err = refusal(&valid[..valid.len() - 2048]);
            assert!(
                matches!(
                    err,
                    Qcow2Error::OutsideFile {
                        what: Structure::CompressedCluster,
                        ..
                    }
                ),
                "{options}: {err}"
            );
        }
    }

    #[test]
    fn decompression_takes_only_compressed_mappings_and_cluster_buffers() {
        let scratch = Scratch::new();
        let valid = compressed_image(&scratch, "compression_type=zlib");
        let image = Qcow2Image::parse(&valid).unwrap();
        let first = image.mappings().next().unwrap().unwrap();

        let err = image
            .decompress_cluster(&first, &mut [0; 4096])
            .unwrap_err();
        assert_eq!(
            err,
            Qcow2Error::BufferSize {
                len: 4096,
                cluster_size: 65536
            }
        );
        let zero = Mapping {
            guest_offset: 0,
            len: 65536,
            extent: Extent::Zero,
        };
        let err = image
            .decompress_cluster(&zero, &mut vec![0; 65536])
            .unwrap_err();
        assert_eq!(err, Qcow2Error::NotCompressed(0));
    }

    #[test]
    fn deflate_must_fill_the_cluster_exactly() {
        let cluster = half_compressible(4096);
        let mut decompressor = Decompressor::new();
        let mut out = vec![0u8; 4096];

        let exact = miniz_oxide::deflate::compress_to_vec(&cluster, 6);
        let mut padded = exact.clone();
        padded.extend_from_slice(&[0xa5; 700]);
        assert_eq!(decompressor.inflate_deflate(&padded, &mut out), Ok(()));
        assert_eq!(out, cluster);

        let short = miniz_oxide::deflate::compress_to_vec(&cluster[..4000], 6);
        let long = miniz_oxide::deflate::compress_to_vec(&[cluster.clone(), vec![1]].concat(), 6);
        for input in [
            &short[..],
            &long[..],
            &exact[..exact.len() / 2],
            &[0xff; 64][..],
            &[],
        ] {
            assert!(decompressor.inflate_deflate(input, &mut out).is_err());
        }
    }

    #[test]
    fn zstd_must_fill_the_cluster_exactly() {
        let cluster = half_compressible(4096);
        let mut decompressor = Decompressor::new();
        let mut out = vec![0u8; 4096];
        let compress = |data: &[u8], checksum: bool| {
            let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
            compressor
                .set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(checksum))
                .unwrap();
            compressor.compress(data).unwrap()
        };

        let exact = compress(&cluster, true);
        let mut padded = exact.clone();
        padded.extend_from_slice(&[0xa5; 700]);
        assert_eq!(decompressor.inflate_zstd(&padded, &mut out), Ok(()));
        assert_eq!(out, cluster);
        let two_frames = [
            compress(&cluster[..1000], false),
            compress(&cluster[1000..], false),
        ];
        assert_eq!(
            decompressor.inflate_zstd(&two_frames.concat(), &mut out),
            Ok(())
        );
        assert_eq!(out, cluster);

        let short = compress(&cluster[..4000], false);
        let long = compress(&[cluster.clone(), vec![1]].concat(), false);
        for input in [
            &short[..],
            &long[..],
            &exact[..exact.len() / 2],
            &[0xff; 64][..],
            &[],
        ] {
            assert!(decompressor.inflate_zstd(input, &mut out).is_err());
        }
    }

    /// What the fuzz target does with one input: parse, walk, inflate.
    fn exercise(bytes: &[u8]) {
        let Ok(image) = Qcow2Image::parse(bytes) else {
            return;
        };
        let mut cluster = vec![0u8; image.cluster_size() as usize];
        let mut decompressor = Decompressor::new();
        let mut inflated = 0;
        for mapping in image.mappings() {
            let mapping = mapping.expect("a parsed image maps without errors");
            match mapping.extent {
                Extent::Data { .. } => assert!(image.host_bytes(&mapping).is_some()),
                Extent::Compressed { .. } if inflated < 64 => {
                    inflated += 1;
                    let _ =
                        image.decompress_cluster_with(&mut decompressor, &mapping, &mut cluster);
                }
                _ => {}
            }
        }
    }

    /// xorshift64*: a deterministic generator for the mutation loop.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound.max(1) as u64) as usize
        }
    }

    /// One to three random edits: bit flips, header fields or table entries set to edge
    /// values, truncation.
    fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
        const HEADER_FIELDS: [(usize, usize); 16] = [
            (4, 4),
            (8, 8),
            (20, 4),
            (24, 8),
            (32, 4),
            (36, 4),
            (40, 8),
            (48, 8),
            (56, 4),
            (60, 4),
            (64, 8),
            (72, 8),
            (88, 8),
            (96, 4),
            (100, 4),
            (104, 1),
        ];
        let len = bytes.len() as u64;
        let edges = [
            0,
            1,
            7,
            9,
            21,
            511,
            512,
            65536,
            len,
            len / 2,
            u32::MAX.into(),
            1 << 62,
            u64::MAX,
        ];

        for _ in 0..1 + rng.below(3) {
            if bytes.is_empty() {
                return;
            }
            match rng.below(6) {
                0 | 1 => {
                    let area = if rng.below(2) == 0 {
                        bytes.len().min(512)
                    } else {
                        bytes.len()
                    };
                    let at = rng.below(area);
                    bytes[at] ^= 1 << rng.below(8);
                }
                2 => {
                    let (at, width) = HEADER_FIELDS[rng.below(HEADER_FIELDS.len())];
                    let value = if rng.below(2) == 0 {
                        edges[rng.below(edges.len())]
                    } else {
                        rng.next() >> rng.below(64)
                    };
                    if let Some(field) = bytes.get_mut(at..at + width) {
                        field.copy_from_slice(&value.to_be_bytes()[8 - width..]);
                    }
                }
                3 => {
                    let at = rng.below(bytes.len() / 8) * 8;
                    let value = match rng.below(3) {
                        0 => edges[rng.below(edges.len())],
                        1 => (rng.next() % len.max(1)) | L2_COPIED,
                        _ => rng.next(),
                    };
                    if let Some(entry) = bytes.get_mut(at..at + 8) {
                        entry.copy_from_slice(&value.to_be_bytes());
                    }
                }
                4 => bytes.truncate(rng.below(bytes.len())),
                _ => {
                    let (from, to) = (rng.below(bytes.len()), rng.below(bytes.len()));
                    let n = rng.below(64).min(bytes.len() - from.max(to));
                    bytes.copy_within(from..from + n, to);
                }
            }
        }
    }

    #[test]
    fn corpus_replays_and_mutations_never_panic() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qcow2");
        let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.unwrap().path();
                (path.display().to_string(), std::fs::read(&path).unwrap())
            })
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "the seed corpus is missing");

        // Every seed is valid, and qemu reads it as we do.
        let scratch = Scratch::new();
        for (name, seed) in &seeds {
            scratch.write("seed.qcow2", seed);
            assert_reads_like_qemu(&scratch, "seed.qcow2");
            exercise(seed);
            eprintln!("{name}: {:?}", inspect(seed).unwrap());
        }

        let iterations: usize = std::env::var("QCOW2_FUZZ_ITERATIONS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(20_000);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for iteration in 0..iterations {
            let mut input = seeds[iteration % seeds.len()].1.clone();
            mutate(&mut rng, &mut input);
            exercise(&input);
        }
    }
}
