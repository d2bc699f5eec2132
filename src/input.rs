//! Files sluice reads whole (the config, each file of a reference directory, the state file)
//! are read under a size bound: a file over it is refused from its metadata, before a byte of it
//! is read or parsed, so a mistaken or hostile multi-gigabyte file costs neither memory nor a
//! parser's time. The callers choose the bound and word the refusal.

use std::io::Read as _;
use std::path::Path;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is larger than the bound.
    #[error("{size} bytes, over the bound of {max} bytes")]
    TooLarge {
        /// The file's size (at least `max + 1` when it grew while being read).
        size: u64,
        /// The bound.
        max: u64,
    },
}

/// Reads `path` whole if it holds at most `max` bytes. The size is checked before reading and
/// again while reading, since a file can grow in between.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > max {
        return Err(ReadError::TooLarge { size, max });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    let read = bytes.len() as u64;
    if read > max {
        return Err(ReadError::TooLarge { size: read, max });
    }
    Ok(bytes)
}

/// [`read_bounded`] for a text file: bytes that are not UTF-8 are an I/O error of kind
/// `InvalidData`, as [`std::fs::read_to_string`] reports them.
pub fn read_text_bounded(path: &Path, max: u64) -> Result<String, ReadError> {
    let bytes = read_bounded(path, max)?;
    String::from_utf8(bytes).map_err(|_| {
        ReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn files_up_to_the_bound_are_read_and_larger_ones_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_bounded(&path, 10).unwrap(), b"0123456789");
        match read_bounded(&path, 9) {
            Err(ReadError::TooLarge { size: 10, max: 9 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_invalid_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        match read_text_bounded(&path, 10) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
            other => panic!("expected InvalidData, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        match read_bounded(&dir.path().join("nope"), 10) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
}
