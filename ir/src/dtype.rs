//! Element types. A value's dtype travels with its shape in [`TensorType`](crate::TensorType);
//! runtimes pick kernels by it and the cost model counts bytes with [`DType::size_bytes`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DType {
    /// IEEE single precision: the default for parameters and activations.
    #[default]
    F32,
    /// bfloat16: 8-bit exponent, 7-bit mantissa (mixed-precision training).
    BF16,
    /// IEEE half precision.
    F16,
    /// 32-bit signed integer (token ids).
    I32,
    /// 64-bit signed integer (token ids, as PyTorch stores them).
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
        }
    }

    /// Whether arithmetic (matmul, norms, activations) is defined on this dtype.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Whether this dtype can hold token ids or class labels.
    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        })
    }
}
