//! Device tensors: a shape and a buffer in GPU memory, `f32` or bf16.
//!
//! Buffers are reference-counted, so that cloning a tensor (the executor's f, or keeping a value
//! that is also consumed) costs nothing; a tensor is never written through a shared buffer: an
//! in-place collective first takes the buffer for itself ([`CudaTensor::make_unique`]).
//!
//! A buffer is an allocation of its own from the device's memory pool, or, where the rank
//! program offers a kernel's output its planned place ([`ferrotron_exec::arena`]), a range of
//! the rank's arena: one device allocation per rank ([`crate::CudaBackend`]'s `new_arena`),
//! made at the first step and reused by every step after it.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, ValidAsZeroBits};
use ferrotron_exec::arena::{self, Arena, Lease};
use half::bf16;
use std::mem::ManuallyDrop;
use std::sync::Arc;

/// The element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// 32-bit IEEE float: every tensor in verification runs; ids, targets, statistics and
    /// master weights in mixed precision.
    F32,
    /// bfloat16 storage with `f32` arithmetic: weights and activations in mixed precision.
    Bf16,
}

impl Storage {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }

    /// The suffix of this type's kernel names (`gelu_f32`, `gelu_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::Bf16 => "bf16",
        }
    }
}

/// Device memory of one element type: an allocation of its own, or a range of the rank's arena
/// (which it leaves to the arena when dropped). Derefs to the [`CudaSlice`] the kernels take.
pub struct DeviceBuffer<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    /// The arena range it is, if placed.
    lease: Option<Lease>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// `len` elements for a kernel to write, on `stream`: at the next place of that size the
    /// rank program offers in its arena ([`arena::lease`]), else from the memory pool. The
    /// elements are unset (a place holds what it last held).
    ///
    /// # Safety
    /// Every element must be written before it is read.
    pub unsafe fn uninit(stream: &Arc<CudaStream>, len: usize) -> Result<Self, DriverError> {
        if let Some(lease) = arena::lease(len * std::mem::size_of::<T>()) {
            let address = lease.device_address().expect("leased from a device arena");
            // SAFETY: the range lies in the arena's live device allocation, which the lease
            // keeps, and belongs to this buffer alone until it is dropped (`Lease`); the slice
            // is never freed, only leaked (`Drop`).
            let slice = unsafe { stream.upgrade_device_ptr::<T>(address, len) };
            return Ok(DeviceBuffer {
                slice: ManuallyDrop::new(slice),
                lease: Some(lease),
            });
        }
        // SAFETY: as the caller promises.
        Ok(unsafe { stream.alloc::<T>(len) }?.into())
    }

    /// `len` zeros on `stream`, placed as [`DeviceBuffer::uninit`].
    pub fn zeros(stream: &Arc<CudaStream>, len: usize) -> Result<Self, DriverError>
    where
        T: ValidAsZeroBits,
    {
        // SAFETY: set to zeros before anything reads it.
        let mut b = unsafe { Self::uninit(stream, len) }?;
        stream.memset_zeros(&mut *b)?;
        Ok(b)
    }

    /// A copy of `src` on `stream`, placed as [`DeviceBuffer::uninit`].
    pub fn copy_of(stream: &Arc<CudaStream>, src: &CudaSlice<T>) -> Result<Self, DriverError> {
        // SAFETY: every element is copied into before anything reads it.
        let mut b = unsafe { Self::uninit(stream, src.len()) }?;
        stream.memcpy_dtod(src, &mut *b)?;
        Ok(b)
    }
}

impl<T> DeviceBuffer<T> {
    /// Whether it is a range of the rank's arena.
    pub fn is_placed(&self) -> bool {
        self.lease.is_some()
    }
}

impl<T> From<CudaSlice<T>> for DeviceBuffer<T> {
    fn from(slice: CudaSlice<T>) -> Self {
        DeviceBuffer {
            slice: ManuallyDrop::new(slice),
            lease: None,
        }
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.lease {
            // The arena owns the memory: the slice is let go without a free. Work queued on
            // the stream that reads it runs before the next value placed there is written,
            // which is queued after it on the same stream.
            Some(_) => {
                slice.leak();
            }
            None => drop(slice),
        }
    }
}

impl<T> std::ops::Deref for DeviceBuffer<T> {
    type Target = CudaSlice<T>;

    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> std::ops::DerefMut for DeviceBuffer<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.lease {
            Some(lease) => write!(
                f,
                "DeviceBuffer({} elements at {lease:?})",
                self.slice.len()
            ),
            None => write!(f, "DeviceBuffer({} elements)", self.slice.len()),
        }
    }
}

/// A rank's arena ([`ferrotron_exec::arena`]) of `bytes` in device memory: one allocation on
/// `stream` (the rank's), which the arena keeps until the last value placed in it is dropped.
/// Left unset, as any output buffer (the CPU stand-in fills it with NaNs, so a kernel that read
/// a place before writing it would show).
pub fn new_arena(stream: &Arc<CudaStream>, bytes: u64) -> Result<Arc<Arena>, DriverError> {
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    // SAFETY: every value placed in it is written before it is read (`DeviceBuffer::uninit`).
    let memory = unsafe { stream.alloc::<u8>(bytes.max(1)) }?;
    let (address, read) = memory.device_ptr(stream);
    drop(read);
    Ok(Arena::on_device(bytes, address, Box::new(memory)))
}

/// A device buffer of one element type.
#[derive(Clone, Debug)]
pub enum DeviceData {
    /// `f32` elements.
    F32(Arc<DeviceBuffer<f32>>),
    /// bf16 elements.
    Bf16(Arc<DeviceBuffer<bf16>>),
}

/// A tensor in GPU memory, row-major.
#[derive(Clone, Debug)]
pub struct CudaTensor {
    /// The dimensions; empty for a scalar.
    pub shape: Vec<usize>,
    /// The elements (`shape.iter().product()` of them).
    pub data: DeviceData,
}

impl CudaTensor {
    /// An `f32` tensor over `buf`.
    pub fn f32(shape: Vec<usize>, buf: impl Into<DeviceBuffer<f32>>) -> CudaTensor {
        CudaTensor {
            shape,
            data: DeviceData::F32(Arc::new(buf.into())),
        }
    }

    /// A bf16 tensor over `buf`.
    pub fn bf16(shape: Vec<usize>, buf: impl Into<DeviceBuffer<bf16>>) -> CudaTensor {
        CudaTensor {
            shape,
            data: DeviceData::Bf16(Arc::new(buf.into())),
        }
    }

    /// Whether its buffer is a range of the rank's arena.
    pub fn is_placed(&self) -> bool {
        match &self.data {
            DeviceData::F32(b) => b.is_placed(),
            DeviceData::Bf16(b) => b.is_placed(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> Storage {
        match self.data {
            DeviceData::F32(_) => Storage::F32,
            DeviceData::Bf16(_) => Storage::Bf16,
        }
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The bytes the elements occupy.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }

    /// Makes this tensor the only owner of its buffer, copying it (on `stream`, to a place
    /// offered for it: [`DeviceBuffer::copy_of`]) if it is shared, so that it can be written in
    /// place.
    pub fn make_unique(&mut self, stream: &Arc<CudaStream>) -> Result<(), DriverError> {
        match &mut self.data {
            DeviceData::F32(b) => {
                if Arc::get_mut(b).is_none() {
                    *b = Arc::new(DeviceBuffer::copy_of(stream, b)?);
                }
            }
            DeviceData::Bf16(b) => {
                if Arc::get_mut(b).is_none() {
                    *b = Arc::new(DeviceBuffer::copy_of(stream, b)?);
                }
            }
        }
        Ok(())
    }
}
