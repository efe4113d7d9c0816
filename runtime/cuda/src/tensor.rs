//! Device tensors: a shape and a buffer in GPU memory, `f32` or bf16.
//!
//! Buffers are reference-counted, so that cloning a tensor (the executor's f, or keeping a value
//! that is also consumed) costs nothing; a tensor is never written through a shared buffer: an
//! in-place collective first takes the buffer for itself ([`CudaTensor::make_unique`]).

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
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

/// A device buffer of one element type.
#[derive(Clone, Debug)]
pub enum DeviceData {
    /// `f32` elements.
    F32(Arc<CudaSlice<f32>>),
    /// bf16 elements.
    Bf16(Arc<CudaSlice<bf16>>),
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
    pub fn f32(shape: Vec<usize>, buf: CudaSlice<f32>) -> CudaTensor {
        CudaTensor {
            shape,
            data: DeviceData::F32(Arc::new(buf)),
        }
    }

    /// A bf16 tensor over `buf`.
    pub fn bf16(shape: Vec<usize>, buf: CudaSlice<bf16>) -> CudaTensor {
        CudaTensor {
            shape,
            data: DeviceData::Bf16(Arc::new(buf)),
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

    /// Makes this tensor the only owner of its buffer, copying it (on `stream`) if it is
    /// shared, so that it can be written in place.
    pub fn make_unique(
        &mut self,
        stream: &Arc<CudaStream>,
    ) -> Result<(), cudarc::driver::DriverError> {
        match &mut self.data {
            DeviceData::F32(b) => {
                if Arc::get_mut(b).is_none() {
                    *b = Arc::new(stream.clone_dtod(b.as_ref())?);
                }
            }
            DeviceData::Bf16(b) => {
                if Arc::get_mut(b).is_none() {
                    *b = Arc::new(stream.clone_dtod(b.as_ref())?);
                }
            }
        }
        Ok(())
    }
}
