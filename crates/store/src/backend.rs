//! Two wrappers of redb's file backend that keep bytes off a file that may be damaged.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::collections::HashMap;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex, OnceLock};

/// Forwards to the file until damage is reported, then refuses every write: whatever redb still
/// tries (a commit, the shutdown header on drop) cannot change the damaged file.
#[derive(Debug)]
pub(crate) struct Sealable {
    inner: FileBackend,
    damaged: Arc<OnceLock<String>>,
}

impl Sealable {
    pub(crate) fn new(inner: FileBackend, damaged: Arc<OnceLock<String>>) -> Self {
        Self { inner, damaged }
    }

    fn writable(&self) -> io::Result<()> {
        match self.damaged.get() {
            Some(why) => Err(io::Error::other(format!("store sealed after damage: {why}"))),
            None => Ok(()),
        }
    }
}

/// Reads the file; keeps every write in memory, per 4 KiB block. redb's repair and integrity
/// check need a writable handle: over this one they run without changing a byte of the file.
#[derive(Debug)]
pub(crate) struct Overlay {
    inner: FileBackend,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    blocks: HashMap<u64, Vec<u8>>,
    len: u64,
    /// Bytes of the file at or past this offset read as zero (it was truncated in memory).
    file_valid: u64,
}

const BLOCK: u64 = 4096;

impl Overlay {
    pub(crate) fn new(inner: FileBackend) -> io::Result<Self> {
        let len = inner.len()?;
        Ok(Self { inner, state: Mutex::new(OverlayState { blocks: HashMap::new(), len, file_valid: len }) })
    }

    fn state(&self) -> io::Result<std::sync::MutexGuard<'_, OverlayState>> {
        self.state.lock().map_err(|_| io::Error::other("overlay lock poisoned"))
    }

    /// Bytes of the file itself (zero past what is valid).
    fn read_file(&self, st: &OverlayState, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let avail = st.file_valid.saturating_sub(offset).min(out.len() as u64) as usize;
        if avail > 0 {
            self.inner.read(offset, &mut out[..avail])?;
        }
        out[avail..].fill(0);
        Ok(())
    }

    fn block<'a>(&self, st: &'a mut OverlayState, index: u64) -> io::Result<&'a mut Vec<u8>> {
        if !st.blocks.contains_key(&index) {
            let mut bytes = vec![0; BLOCK as usize];
            self.read_file(st, index * BLOCK, &mut bytes)?;
            st.blocks.insert(index, bytes);
        }
        Ok(st.blocks.get_mut(&index).expect("inserted above"))
    }
}

impl StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let st = self.state()?;
        if offset.checked_add(out.len() as u64).is_none_or(|end| end > st.len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file"));
        }
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let (index, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(out.len() - done);
            match st.blocks.get(&index) {
                Some(block) => out[done..done + n].copy_from_slice(&block[within..within + n]),
                None => self.read_file(&st, pos, &mut out[done..done + n])?,
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state()?;
        if len < st.len {
            st.file_valid = st.file_valid.min(len);
            st.blocks.retain(|index, _| index * BLOCK < len);
            let (index, within) = (len / BLOCK, (len % BLOCK) as usize);
            if let Some(block) = st.blocks.get_mut(&index) {
                block[within..].fill(0);
            }
        }
        st.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.state()?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (index, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(data.len() - done);
            self.block(&mut st, index)?[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        st.len = st.len.max(offset + data.len() as u64);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

impl StorageBackend for Sealable {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.writable()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
