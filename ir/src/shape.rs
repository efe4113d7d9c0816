//! Shapes with named dimensions. A [`Dim`] is a size plus, where the model file named it, the
//! dimension's name (`hidden`, `heads`): names never change what a shape means (two dims are equal
//! when their sizes are), but they let the partitioner and every error message speak the model's
//! language ("heads = 12 is not divisible by tp = 8").

use crate::DType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// One dimension: its size and, optionally, the name it was written with in the model file.
#[derive(Clone, Debug, Eq)]
pub struct Dim {
    /// Number of elements along this dimension.
    pub size: u64,
    /// The dimension's name or expression in the model file (`"hidden"`, `"4 * hidden"`).
    pub name: Option<Arc<str>>,
}

impl Dim {
    /// An unnamed dimension.
    pub fn new(size: u64) -> Dim {
        Dim { size, name: None }
    }

    /// A dimension carrying the name it has in the model.
    pub fn named(size: u64, name: impl Into<Arc<str>>) -> Dim {
        Dim {
            size,
            name: Some(name.into()),
        }
    }
}

/// Sizes decide equality; the name is an annotation.
impl PartialEq for Dim {
    fn eq(&self, other: &Dim) -> bool {
        self.size == other.size
    }
}

impl From<u64> for Dim {
    fn from(size: u64) -> Dim {
        Dim::new(size)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}={}", self.size),
            None => write!(f, "{}", self.size),
        }
    }
}

/// Serialized as `64` or `"head_dim=64"`, so a plan file stays as readable as a model file.
impl Serialize for Dim {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.name {
            Some(_) => s.serialize_str(&self.to_string()),
            None => s.serialize_u64(self.size),
        }
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dim, D::Error> {
        struct DimVisitor;
        impl serde::de::Visitor<'_> for DimVisitor {
            type Value = Dim;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 64 or \"head_dim=64\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dim, E> {
                Ok(Dim::new(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dim, E> {
                u64::try_from(v)
                    .map(Dim::new)
                    .map_err(|_| E::custom(format!("a dimension cannot be negative ({v})")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dim, E> {
                let (name, size) = v
                    .rsplit_once('=')
                    .ok_or_else(|| E::custom(format!("expected NAME=SIZE, found `{v}`")))?;
                let size = size
                    .trim()
                    .parse()
                    .map_err(|_| E::custom(format!("`{size}` is not a size")))?;
                Ok(Dim::named(size, name.trim()))
            }
        }
        d.deserialize_any(DimVisitor)
    }
}

/// A tensor shape: dimensions outermost first. Rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape from plain sizes, without names.
    pub fn from_sizes(sizes: &[u64]) -> Shape {
        Shape(sizes.iter().map(|&s| Dim::new(s)).collect())
    }

    /// The scalar shape `[]`.
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The sizes alone.
    pub fn sizes(&self) -> Vec<u64> {
        self.0.iter().map(|d| d.size).collect()
    }

    /// The sizes as a host tensor's shape (`usize`).
    pub fn extents(&self) -> Vec<usize> {
        self.0.iter().map(|d| d.size as usize).collect()
    }

    /// Size of dimension `i` (must be in range).
    pub fn size(&self, i: usize) -> u64 {
        self.0[i].size
    }

    /// Number of elements, or `None` when it does not fit in a `u64`.
    pub fn numel(&self) -> Option<u64> {
        self.0.iter().try_fold(1u64, |n, d| n.checked_mul(d.size))
    }

    /// Turns a possibly negative axis (`-1` = last) into an index, if it is in range.
    pub fn axis(&self, axis: i64) -> Option<usize> {
        let rank = self.rank() as i64;
        let a = if axis < 0 { axis + rank } else { axis };
        (0..rank).contains(&a).then_some(a as usize)
    }

    /// The last dimension, if the rank is at least one.
    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// What a value is: its dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Shape,
}

impl TensorType {
    /// A type from its parts.
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    /// Bytes the tensor occupies, saturating at `u64::MAX`.
    pub fn size_bytes(&self) -> u64 {
        self.shape
            .numel()
            .and_then(|n| n.checked_mul(self.dtype.size_bytes()))
            .unwrap_or(u64::MAX)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
