//! Reading and writing safetensors files (the format of Hugging Face's weights and of
//! [`crate::checkpoint`]'s rank files), shared by [`crate::checkpoint`] and [`crate::hf`].
//!
//! A file is read whole and its header checked once (offsets that tile the data, sizes that
//! match dtype × shape); tensors are then converted to [`Tensor`] on demand: `F32` exactly,
//! `F16`, `BF16` and `F64` converted to `f32`. Files are written `F32`, little-endian, and
//! flushed to disk ([`write()`]); [`write_atomic`] adds a temporary sibling and a rename, so a
//! reader sees the old file or the new one, never half of one.

use ferrotron_exec::Tensor;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a safetensors file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// A tensor asked for is not in the file.
    #[error("{path}: tensor `{name}` is missing")]
    Missing {
        /// The file.
        path: String,
        /// The tensor's name in the file.
        name: String,
    },
    /// A tensor whose element type cannot be read as `f32`.
    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, F16, BF16 and F64 are read")]
    Dtype {
        /// The file.
        path: String,
        /// The tensor's name in the file.
        name: String,
        /// Its dtype, as the header spells it.
        dtype: String,
    },
}

impl SafetensorsError {
    /// Whether this is a file that does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SafetensorsError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A safetensors file read into memory, its header parsed and checked.
pub struct SafetensorsFile {
    path: String,
    bytes: Vec<u8>,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafetensorsFile({}, {} bytes)",
            self.path,
            self.bytes.len()
        )
    }
}

impl SafetensorsFile {
    /// Reads and checks `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SafetensorsError::Io {
            path: name.clone(),
            source,
        })?;
        SafetensorsFile::from_bytes(bytes, name)
    }

    /// Checks a file already in memory; `path` is for error messages.
    pub fn from_bytes(bytes: Vec<u8>, path: String) -> Result<SafetensorsFile, SafetensorsError> {
        let (n, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| SafetensorsError::Format {
                path: path.clone(),
                why: describe(&e),
            })?;
        Ok(SafetensorsFile {
            path,
            bytes,
            data_start: n + 8,
            metadata,
        })
    }

    /// The file's path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The names of the tensors in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// Whether the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The shape of tensor `name`, if the file holds it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.metadata.info(name).map(|i| i.shape.as_slice())
    }

    /// The dtype of tensor `name`, if the file holds it.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.metadata.info(name).map(|i| i.dtype)
    }

    /// The free-form `__metadata__` of the header.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, SafetensorsError> {
        self.metadata
            .info(name)
            .ok_or_else(|| SafetensorsError::Missing {
                path: self.path.clone(),
                name: name.to_owned(),
            })
    }

    /// Tensor `name` as `f32`.
    pub fn tensor(&self, name: &str) -> Result<Tensor, SafetensorsError> {
        let info = self.info(name)?;
        let (s, e) = info.data_offsets;
        // The header was checked against the buffer's length when the file was opened.
        let raw = &self.bytes[self.data_start + s..self.data_start + e];
        let data = to_f32(raw, info.dtype).ok_or_else(|| SafetensorsError::Dtype {
            path: self.path.clone(),
            name: name.to_owned(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok(Tensor {
            shape: info.shape.clone(),
            data: data.into(),
        })
    }
}

/// A readable account of the safetensors crate's error.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "shorter than its 8-byte header length".into(),
        E::HeaderTooLarge => "header length over 100 MB".into(),
        E::InvalidHeaderLength => "header length past the end of the file".into(),
        E::InvalidHeader => "header is not UTF-8".into(),
        E::InvalidHeaderStart | E::InvalidHeaderDeserialization => {
            "header is not a safetensors JSON table".into()
        }
        E::InvalidOffset(name) => format!("tensor `{name}` has invalid data offsets"),
        E::TensorInvalidInfo => "a tensor's data size does not match its dtype and shape".into(),
        E::MetadataIncompleteBuffer => "the data does not match the header's offsets".into(),
        E::ValidationOverflow => "a tensor's size overflows".into(),
        other => format!("{other:?}"),
    }
}

/// Little-endian elements of `dtype` as `f32`; `None` for a dtype that is not a float.
fn to_f32(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// IEEE half precision to single, exactly (every half is a single).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: man × 2^-24, normalised.
            let shift = man.leading_zeros() - 21; // bring the top bit to position 10
            let man = (man << shift) & 0x3ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (man << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// A tensor borrowed for the writer, stored `F32`.
struct F32View<'a>(&'a Tensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes `tensors` (by name) to `path` as `F32`, with `metadata` in the header, and flushes
/// the file to disk. Not atomic: see [`write_atomic`].
pub fn write(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), SafetensorsError> {
    let name = path.display().to_string();
    let io = |source| SafetensorsError::Io {
        path: name.clone(),
        source,
    };
    for (n, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(SafetensorsError::Format {
                path: name.clone(),
                why: format!(
                    "tensor `{n}` has shape {:?} but {} elements",
                    t.shape,
                    t.data.len()
                ),
            });
        }
    }
    let views = tensors.iter().map(|&(n, t)| (n, F32View(t)));
    let bytes = safetensors::serialize(views, &metadata).map_err(|e| SafetensorsError::Format {
        path: name.clone(),
        why: describe(&e),
    })?;
    let mut f = File::create(path).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// A name for a temporary sibling of `path` that no other writer (thread or process) uses.
pub(crate) fn temp_sibling(path: &Path, what: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{base}.{what}-{}-{n}", std::process::id()))
}

/// The directory `path` is in (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a directory's entries (a rename in it) to disk; a no-op where directories cannot
/// be opened.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir) {
        Ok(f) => f.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

/// [`write()`], atomically: into a temporary sibling of `path`, then renamed over it (and the
/// directory flushed), so `path` holds the old file or the whole new one. A failure leaves no
/// temporary file behind.
pub fn write_atomic(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), SafetensorsError> {
    let tmp = temp_sibling(path, "tmp");
    let result = write(&tmp, tensors, metadata).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| SafetensorsError::Io {
            path: path.display().to_string(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    sync_dir(&parent_dir(path)).map_err(|source| SafetensorsError::Io {
        path: parent_dir(path).display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn half_precision_converts_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0200), 2f32.powi(-15));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
