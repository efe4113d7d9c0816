//! The runtime's tensor: a dense, row-major `f32` buffer with its shape. Integer tensors (token
//! ids, targets) hold exact integers in `f32` (every id below 2^24 is exact, far above any
//! vocabulary), so one buffer type serves every op; the IR's dtypes decide how values are read.
//! The elements are a [`Buffer`]: the tensor's own allocation, or its place in a rank's arena
//! ([`crate::arena`]).

use crate::arena::Buffer;
use ferrotron_partitioner::Region;
use std::fmt;

/// A dense row-major tensor of `f32`.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    /// Sizes, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements, row-major.
    pub data: Buffer,
}

impl Tensor {
    /// A tensor from its shape and data; `None` when they disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Tensor> {
        (shape.iter().product::<usize>() == data.len()).then_some(Tensor {
            shape,
            data: data.into(),
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: Buffer::zeros(n),
        }
    }

    /// A tensor filled with `value`.
    pub fn full(shape: Vec<usize>, value: f32) -> Tensor {
        let n = shape.iter().product();
        let mut data = Buffer::to_overwrite(n);
        data.fill(value);
        Tensor { shape, data }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size in bytes of the data.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// What `region` covers of this (full) tensor: a rank's shard.
    pub fn take(&self, region: &Region) -> Tensor {
        let shape = region.shape();
        let mut data = Buffer::to_overwrite(shape.iter().product());
        region.extract_into(&self.data, &self.shape, &mut data);
        Tensor { shape, data }
    }

    /// This tensor zero-padded at the end of each dimension up to `shape` (the vocabulary
    /// padding of a parameter).
    pub fn padded(&self, shape: &[usize]) -> Tensor {
        if self.shape == shape {
            return self.clone();
        }
        let mut out = Tensor::zeros(shape.to_vec());
        Region::whole(&self.shape).place(&self.data, &mut out.data, shape);
        out
    }

    /// The leading `shape` corner of this tensor (vocabulary padding cropped).
    pub fn cropped(&self, shape: &[usize]) -> Tensor {
        if self.shape == shape {
            return self.clone();
        }
        self.take(&Region::whole(shape))
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}", self.shape)?;
        if self.data.len() <= 8 {
            write!(f, "{:?}", self.data)
        } else {
            write!(
                f,
                "[{}, {}, ... {}]",
                self.data[0],
                self.data[1],
                self.data[self.data.len() - 1]
            )
        }
    }
}
