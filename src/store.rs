//! The state directory: the records file, volume backing files and stored images.
//!
//! ```text
//! state_dir/
//!   volumed.lock         flock'd by the running daemon: one daemon per state directory
//!   state.json           every record; replaced atomically (write, fsync, rename, fsync dir)
//!   volumes/<id>.raw     one sparse backing file per volume, exactly the volume's size
//!   images/<id>.img      uploaded images, read-only
//!   images/<id>.part     an upload in progress
//! ```
//!
//! A crash at any instant leaves either the old or the new `state.json`, never a torn one.
//! Files are created and made durable before the record that names them, and records are
//! removed before their files, so after a crash a file may lack a record (it is swept at
//! start) but a record never lacks its file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{AttachmentRecord, ImageRecord, VolumeRecord};

/// Everything the daemon persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version of this file.
    pub version: u32,
    pub volumes: BTreeMap<Uuid, VolumeRecord>,
    pub attachments: BTreeMap<Uuid, AttachmentRecord>,
    pub images: BTreeMap<Uuid, ImageRecord>,
    /// Next inode number to hand to a new volume; never reused.
    pub next_ino: u64,
}

/// First inode number of volumes; lower ones are the root and the control file.
pub const FIRST_VOLUME_INO: u64 = 16;

/// Paths inside the state directory and the durable writes to them.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// An exclusive lock on a state directory, held for the daemon's life.
pub struct StateLock {
    _file: File,
}

impl Store {
    /// Uses `root`, creating it and its subdirectories (mode 0700) if needed.
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in [
            root.to_path_buf(),
            root.join("volumes"),
            root.join("images"),
        ] {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Takes the directory's lock without waiting; fails if another daemon holds it.
    pub fn lock(&self) -> io::Result<StateLock> {
        let path = self.root.join("volumed.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            let holder = fs::read_to_string(&path).unwrap_or_default();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another volumed (pid {}) uses state directory {}",
                        holder.trim(),
                        self.root.display()
                    ),
                )
            } else {
                err
            });
        }

        // Record our pid for the message above; the lock, not this text, decides.
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(StateLock { _file: file })
    }

    /// Loads `state.json`, or an empty state if there is none yet.
    pub fn load(&self) -> io::Result<State> {
        let path = self.state_path();
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(State {
                    version: 1,
                    next_ino: FIRST_VOLUME_INO,
                    ..State::default()
                })
            }
            Err(e) => return Err(e),
        };
        let mut state: State = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt: {e}", path.display()),
            )
        })?;
        state.next_ino = state.next_ino.max(FIRST_VOLUME_INO);
        Ok(state)
    }

    /// Replaces `state.json` atomically and durably.
    pub fn save(&self, state: &State) -> io::Result<()> {
        let path = self.state_path();
        let tmp = self.root.join("state.json.tmp");
        let text = serde_json::to_vec_pretty(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;

        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.root)
    }

    /// Path of a volume's backing file.
    pub fn volume_path(&self, id: Uuid) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.raw"))
    }

    /// Creates a sparse backing file of `size` bytes, durably.
    pub fn create_volume_file(&self, id: Uuid, size: u64) -> io::Result<()> {
        let path = self.volume_path(id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let made = file.set_len(size).and_then(|()| file.sync_all());
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        sync_dir(&self.root.join("volumes"))
    }

    /// Removes a volume's backing file.
    pub fn remove_volume_file(&self, id: Uuid) -> io::Result<()> {
        remove_if_present(&self.volume_path(id))?;
        sync_dir(&self.root.join("volumes"))
    }

    /// Path of a stored image.
    pub fn image_path(&self, id: Uuid) -> PathBuf {
        self.root.join("images").join(format!("{id}.img"))
    }

    /// Path of an upload in progress.
    pub fn upload_path(&self, id: Uuid) -> PathBuf {
        self.root.join("images").join(format!("{id}.part"))
    }

    /// Turns a finished upload into the read-only stored image, durably.
    pub fn commit_upload(&self, id: Uuid) -> io::Result<()> {
        let part = self.upload_path(id);
        fs::set_permissions(&part, fs::Permissions::from_mode(0o400))?;
        fs::rename(&part, self.image_path(id))?;
        sync_dir(&self.root.join("images"))
    }

    /// Removes an image's stored data and any partial upload.
    pub fn remove_image_files(&self, id: Uuid) -> io::Result<()> {
        remove_if_present(&self.image_path(id))?;
        remove_if_present(&self.upload_path(id))?;
        sync_dir(&self.root.join("images"))
    }

    /// Files in `volumes/` and `images/` that no record names: leftovers of a crash.
    pub fn orphans(&self, state: &State) -> io::Result<Vec<PathBuf>> {
        let mut orphans = Vec::new();
        for entry in fs::read_dir(self.root.join("volumes"))? {
            let path = entry?.path();
            let known = file_id(&path, "raw").is_some_and(|id| state.volumes.contains_key(&id));
            if !known {
                orphans.push(path);
            }
        }
        for entry in fs::read_dir(self.root.join("images"))? {
            let path = entry?.path();
            let known = file_id(&path, "img").is_some_and(|id| state.images.contains_key(&id));
            if !known {
                orphans.push(path);
            }
        }
        Ok(orphans)
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }
}

/// Writes a stream to a new file, leaving a hole wherever a whole aligned block is zero.
///
/// Stored images are then as sparse as their content: a refill's `SEEK_DATA` walk skips
/// the holes instead of reading and scanning gigabytes of zeros, and an upload writes only
/// its data. A block split across two writes waits in `partial` until it is complete, so
/// how the stream is chunked does not change what is allocated.
pub struct SparseWriter {
    file: File,
    /// The block hash of everything written (see [`crate::verify`]).
    block_hash: xxhash_rust::xxh3::Xxh3,
    /// Bytes of the stream before `partial`; always a multiple of [`SPARSE_BLOCK`].
    offset: u64,
    partial: Vec<u8>,
}

/// The unit of hole detection in stored images: the block of the block hash.
const SPARSE_BLOCK: usize = crate::verify::BLOCK;

impl SparseWriter {
    pub fn new(file: File) -> Self {
        SparseWriter {
            file,
            block_hash: xxhash_rust::xxh3::Xxh3::new(),
            offset: 0,
            partial: Vec::with_capacity(SPARSE_BLOCK),
        }
    }

    /// Appends `data` to the stream.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if !self.partial.is_empty() {
            let take = (SPARSE_BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < SPARSE_BLOCK {
                return Ok(());
            }
            let block = std::mem::take(&mut self.partial);
            self.write_blocks(&block)?;
            self.partial = block;
            self.partial.clear();
        }

        let whole = data.len() - data.len() % SPARSE_BLOCK;
        self.write_blocks(&data[..whole])?;
        self.partial.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Writes the last partial block, sets the length (trailing zeros become a hole) and
    /// makes the file durable. Returns the stream's block hash.
    pub fn finish(mut self) -> io::Result<u128> {
        let partial = std::mem::take(&mut self.partial);
        self.write_blocks(&partial)?;
        self.file.set_len(self.offset)?;
        self.file.sync_all()?;
        Ok(crate::verify::block_hash_digest(
            &self.block_hash,
            self.offset,
        ))
    }

    /// Writes whole blocks (or the stream's last bytes) at `offset`, skipping zero blocks
    /// and coalescing the others into one write per run; hashes the others.
    fn write_blocks(&mut self, blocks: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;

        let mut run_start = 0;
        for (i, block) in blocks.chunks(SPARSE_BLOCK).enumerate() {
            let at = i * SPARSE_BLOCK;
            if crate::verify::is_zero(block) {
                let run = &blocks[run_start..at];
                self.file
                    .write_all_at(run, self.offset + run_start as u64)?;
                run_start = at + block.len();
            } else {
                let offset = self.offset + at as u64;
                self.block_hash.update(&offset.to_le_bytes());
                self.block_hash.update(block);
            }
        }
        let run = &blocks[run_start..];
        self.file
            .write_all_at(run, self.offset + run_start as u64)?;
        self.offset += blocks.len() as u64;
        Ok(())
    }
}

fn file_id(path: &Path, extension: &str) -> Option<Uuid> {
    if path.extension()? != extension {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a directory's entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams arrive in chunks of any size; zero blocks become holes, the content stays exact,
    /// and the block hash is the one of the whole content.
    #[test]
    fn sparse_writer_leaves_holes_whatever_the_chunking() {
        use std::os::unix::fs::MetadataExt;

        let mut image = vec![0u8; (6 << 20) + 10];
        image[..100].fill(7);
        image[(3 << 20) + 5000..(3 << 20) + 9000].fill(9);
        image[(6 << 20) + 9] = 1;
        let dir = tempfile::tempdir().unwrap();
        let mut whole = xxhash_rust::xxh3::Xxh3::new();
        crate::verify::block_hash_update(&mut whole, 0, &image);
        let expected = crate::verify::block_hash_digest(&whole, image.len() as u64);

        for chunk_len in [1000, 4096, 12_345, 1 << 20] {
            let path = dir.path().join(format!("image-{chunk_len}"));
            let mut writer = SparseWriter::new(File::create(&path).unwrap());
            for chunk in image.chunks(chunk_len) {
                writer.write(chunk).unwrap();
            }
            assert_eq!(writer.finish().unwrap(), expected, "chunks of {chunk_len}");

            assert_eq!(fs::read(&path).unwrap(), image, "chunks of {chunk_len}");
            let allocated = fs::metadata(&path).unwrap().blocks() * 512;
            assert!(
                allocated <= 64 << 10,
                "{allocated} bytes allocated, chunks of {chunk_len}"
            );
        }

        let path = dir.path().join("zeros");
        let mut writer = SparseWriter::new(File::create(&path).unwrap());
        writer.write(&[0; 10_000]).unwrap();
        writer.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), vec![0; 10_000]);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut state = store.load().unwrap();
        assert_eq!(state.next_ino, FIRST_VOLUME_INO);

        state.next_ino = 99;
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap().next_ino, 99);
    }

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _held = store.lock().unwrap();
        let err = store.lock().err().unwrap();
        assert!(err.to_string().contains("another volumed"), "{err}");
    }

    #[test]
    fn unnamed_files_are_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = Uuid::new_v4();
        store.create_volume_file(id, 4096).unwrap();
        let orphans = store.orphans(&State::default()).unwrap();
        assert_eq!(orphans, vec![store.volume_path(id)]);
    }

    #[test]
    fn corrupt_state_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(store.load().is_err());
    }
}
