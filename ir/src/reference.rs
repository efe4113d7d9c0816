//! The reference evaluator: the executable specification of every op.
//!
//! [`eval_op`] computes one op on dense `f64` tensors, [`eval_graph`] a whole graph in program
//! order. It is slow and simple on purpose: every op is a few obvious loops over multi-indices,
//! with no fusion, no parallelism and no cleverness, so that reading it settles what an op means.
//! It is the ground truth for
//! - autodiff's gradient checks (each backward op is checked here against a finite difference of
//!   its forward op, in this module's tests),
//! - the sharding rules' property tests (`partitioner/tests/rule_props.rs`: evaluating an op on
//!   each rank's slice and combining the results as the rule's layout says must give the
//!   unpartitioned result),
//! - the runtimes, whose kernels are compared against it.
//!
//! Conventions beyond the op docs ([`crate::op`]):
//! - Integer tensors (ids, targets) are held as `f64` holding exact integers; an id that is not
//!   an integer in range is an error ([`EvalError::Index`]), never a panic.
//! - `Dropout` is deterministic here: the element at flat (row-major) index `i` is kept iff
//!   `splitmix64(i) / 2^64 >= p` ([`dropout_keeps`]), kept elements are scaled by `1/(1−p)`, and
//!   `DropoutGrad` applies the same mask to `dy` by index.
//! - `LayerNormGrad` without a weight returns the parameter gradients of an identity affine
//!   (`Σ dy·x̂` and `Σ dy`); `RmsNormGrad` likewise.
//! - One process has no communicator: `AllReduce`, `F` and `G` are the identity, and `AllGather`,
//!   `ReduceScatter` and `LocalSlice` are the identity over one part and an error
//!   ([`EvalError::NeedsCommunicator`]) over more.
//! - `CrossEntropy` averages over the predicting positions (all of them, or all but the last of
//!   each sequence with `shift`); with `classes: Some(c)` the classes `c..` are padding, excluded
//!   from the softmax and given zero gradient, and a target must be below `c`. Targets no position
//!   predicts (the first of each sequence with `shift`) are not read.

use crate::graph::{Graph, NodeId, ValueId};
use crate::index::{self, around, broadcast_offset};
use crate::op::{Activation, Op, RopeScaling};
use crate::shape::Dim;
use std::collections::HashMap;
use thiserror::Error;

/// The most elements one tensor may have here (2 GiB of `f64`): the reference evaluator is for
/// test-sized models, and an attribute asking for more is reported, not allocated.
pub const MAX_ELEMENTS: usize = 1 << 28;

/// A dense row-major tensor of f64 (integer tensors hold exact integers).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<usize>,
    /// The elements in row-major order; `data.len()` is the product of `shape`.
    pub data: Vec<f64>,
}

/// Why an op or a graph cannot be evaluated.
#[derive(Debug, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum EvalError {
    /// Inputs or attributes the op is not defined on (shapes that do not fit, a bad axis, ...).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// An index (an embedding id, a class target) that is not an integer in its range.
    #[error("{op}: {what} {value} (element {element}) is not an integer in 0..{bound}")]
    Index {
        op: &'static str,
        what: &'static str,
        value: f64,
        element: usize,
        bound: usize,
    },
    /// A collective over more than one rank.
    #[error(
        "{op} over {parts} ranks needs a communicator; the reference evaluator runs one process"
    )]
    NeedsCommunicator { op: &'static str, parts: u64 },
    /// A tensor larger than [`MAX_ELEMENTS`].
    #[error(
        "{op}: a tensor of shape {shape:?} is too large for the reference evaluator \
         (at most {MAX_ELEMENTS} elements)"
    )]
    TooLarge { op: &'static str, shape: Vec<u64> },
    /// A graph input or parameter without a value in the feed.
    #[error("no value was fed for `{name}` ({value})")]
    MissingFeed { name: String, value: ValueId },
    /// A fed or computed value whose shape is not the one the graph declares.
    #[error("`{name}` has shape {found:?}, but the graph declares {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<u64>,
        found: Vec<usize>,
    },
    /// A malformed graph: a node or value used before it is defined, or that does not exist.
    #[error("malformed graph: {0}")]
    Graph(String),
    /// An op that failed inside a graph, with the node's name.
    #[error("in `{node}`: {source}")]
    Node {
        node: String,
        source: Box<EvalError>,
    },
}

type Result<T, E = EvalError> = std::result::Result<T, E>;

fn invalid(op: &'static str, msg: impl Into<String>) -> EvalError {
    EvalError::Invalid {
        op,
        msg: msg.into(),
    }
}

/// A shape check's message from [`crate::index`] as an [`EvalError::Invalid`] of `op`.
trait OrInvalid<T> {
    fn or_invalid(self, op: &'static str) -> Result<T>;
}

impl<T> OrInvalid<T> for Result<T, String> {
    fn or_invalid(self, op: &'static str) -> Result<T> {
        self.map_err(|msg| invalid(op, msg))
    }
}

/// Calls `f` with every multi-index of `shape` in row-major order (once, with `[]`, for a scalar;
/// never for a shape with a zero dimension).
fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0; shape.len()];
    loop {
        f(&idx);
        let mut i = shape.len();
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            idx[i] += 1;
            if idx[i] < shape[i] {
                break;
            }
            idx[i] = 0;
        }
    }
}

fn row_major_index(index: &[usize], shape: &[usize]) -> usize {
    index
        .iter()
        .zip(shape)
        .fold(0, |flat, (&i, &s)| flat * s + i)
}

impl Tensor {
    /// A tensor from its shape and row-major data.
    ///
    /// # Panics
    /// When `data.len()` is not the product of `shape` (use [`Tensor::try_new`] on untrusted
    /// input).
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        Tensor::try_new(shape, data).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A tensor from its shape and row-major data, or why they do not fit together.
    pub fn try_new(shape: Vec<usize>, data: Vec<f64>) -> Result<Tensor, EvalError> {
        let t = Tensor { shape, data };
        t.check("Tensor")?;
        Ok(t)
    }

    /// A scalar (rank 0).
    pub fn scalar(value: f64) -> Tensor {
        Tensor {
            shape: Vec::new(),
            data: vec![value],
        }
    }

    /// A tensor with every element `value`.
    ///
    /// # Panics
    /// When the shape has more than [`MAX_ELEMENTS`] elements.
    pub fn full(shape: Vec<usize>, value: f64) -> Tensor {
        Tensor::try_full("Tensor", shape, value).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A tensor of zeros.
    ///
    /// # Panics
    /// When the shape has more than [`MAX_ELEMENTS`] elements.
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    fn try_full(op: &'static str, shape: Vec<usize>, value: f64) -> Result<Tensor> {
        match index::numel(&shape) {
            Some(n) if n <= MAX_ELEMENTS => Ok(Tensor {
                data: vec![value; n],
                shape,
            }),
            _ => Err(EvalError::TooLarge {
                op,
                shape: shape.iter().map(|&s| s as u64).collect(),
            }),
        }
    }

    /// A tensor whose element at each multi-index is `f(index)`.
    ///
    /// # Panics
    /// When the shape has more than [`MAX_ELEMENTS`] elements.
    pub fn from_fn(shape: Vec<usize>, mut f: impl FnMut(&[usize]) -> f64) -> Tensor {
        let mut t = Tensor::zeros(shape);
        let mut k = 0;
        let shape = t.shape.clone();
        for_each_index(&shape, |idx| {
            t.data[k] = f(idx);
            k += 1;
        });
        t
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The element at a multi-index.
    ///
    /// # Panics
    /// When the index does not fit the shape.
    pub fn at(&self, index: &[usize]) -> f64 {
        assert!(
            index.len() == self.shape.len() && index.iter().zip(&self.shape).all(|(i, s)| i < s),
            "index {index:?} is out of range for shape {:?}",
            self.shape
        );
        self.data[row_major_index(index, &self.shape)]
    }

    /// The largest absolute elementwise difference, or `None` when the shapes differ. NaNs count
    /// as infinitely different.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        (self.shape == other.shape).then(|| {
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| {
                    let d = (a - b).abs();
                    if d.is_nan() {
                        f64::INFINITY
                    } else {
                        d
                    }
                })
                .fold(0.0, f64::max)
        })
    }

    /// The largest absolute element (0 for an empty tensor).
    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    /// Whether the shapes are equal and every `|a − b| <= atol + rtol·|b|`.
    pub fn allclose(&self, other: &Tensor, rtol: f64, atol: f64) -> bool {
        self.shape == other.shape
            && self
                .data
                .iter()
                .zip(&other.data)
                .all(|(a, b)| (a - b).abs() <= atol + rtol * b.abs())
    }

    /// The same elements under a new shape with as many elements.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor, EvalError> {
        Tensor::try_new(shape, self.data.clone())
    }

    fn check(&self, op: &'static str) -> Result<()> {
        index::check_len(&self.shape, self.data.len()).or_invalid(op)
    }

    fn map(&self, f: impl Fn(f64) -> f64) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&x| f(x)).collect(),
        }
    }

    /// `(outer, n)`: the tensor as `outer` rows of its last axis (`n` elements each).
    fn rows(&self) -> (usize, usize) {
        index::rows(&self.shape)
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar functions

/// `erf(x)`, accurate to a few ulp: a series with positive terms below 2.5, the continued
/// fraction of `erfc` above.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        erf_series(a)
    } else {
        1.0 - erfc_fraction(a)
    };
    r.copysign(x)
}

/// `erfc(x) = 1 − erf(x)`, with full relative accuracy in the right tail.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x < 0.0 {
        2.0 - erfc(-x)
    } else if x < 2.5 {
        1.0 - erf_series(x)
    } else {
        erfc_fraction(x)
    }
}

/// `erf(x) = 2/√π · e^(−x²) · Σ_n 2ⁿ x^(2n+1) / (1·3·…·(2n+1))` for `0 <= x < 2.5`: every term is
/// positive, so nothing cancels.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let (mut term, mut sum) = (x, x);
    for n in 1..200 {
        term *= 2.0 * x2 / (2 * n + 1) as f64;
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x2).exp() * sum
}

/// `erfc(x) = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + …)))))` for `x >= 2.5`,
/// evaluated from the bottom.
fn erfc_fraction(x: f64) -> f64 {
    if x > 27.0 {
        return 0.0; // below the smallest subnormal
    }
    let mut f = x;
    for k in (1..=120).rev() {
        f = x + (k as f64 / 2.0) / f;
    }
    (-x * x).exp() / (std::f64::consts::PI.sqrt() * f)
}

/// The standard normal CDF `Φ(x)`.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The standard normal density `φ(x)`.
fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

const GELU_TANH_C: f64 = 0.044_715;

fn sqrt_2_over_pi() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// An activation's value at `x`.
pub fn activation(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Gelu => x * normal_cdf(x),
        Activation::GeluTanh => {
            let u = sqrt_2_over_pi() * (x + GELU_TANH_C * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
        Activation::Silu => x * sigmoid(x),
        Activation::Relu => x.max(0.0),
    }
}

/// An activation's derivative at `x` (ReLU's is 0 at 0).
pub fn activation_grad(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Gelu => normal_cdf(x) + x * normal_pdf(x),
        Activation::GeluTanh => {
            let c = sqrt_2_over_pi();
            let t = (c * (x + GELU_TANH_C * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * GELU_TANH_C * x * x)
        }
        Activation::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// SplitMix64's output for seed `i` (its first draw): the hash behind the reference dropout mask.
pub fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether the reference dropout keeps the element at flat index `i` under drop probability `p`.
pub fn dropout_keeps(i: u64, p: f64) -> bool {
    splitmix64(i) as f64 / 2f64.powi(64) >= p
}

/// The smallest `u` with `u as f64 / 2^64 >= p` (`u64` to `f64` is monotonic, so `h >= u` is
/// exactly [`dropout_keeps`]' test `h as f64 / 2^64 >= p`); `p` in `[0, 1)`.
pub fn keep_threshold(p: f64) -> u64 {
    let target = p * 2f64.powi(64);
    let (mut lo, mut hi) = (0u64, u64::MAX);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if mid as f64 >= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

// ---------------------------------------------------------------------------------------------
// Attribute helpers

/// An integer index held in an `f64`, checked to be in `0..bound`.
fn index(
    op: &'static str,
    what: &'static str,
    value: f64,
    element: usize,
    bound: usize,
) -> Result<usize> {
    index::integer(value, bound).ok_or(EvalError::Index {
        op,
        what,
        value,
        element,
        bound,
    })
}

// ---------------------------------------------------------------------------------------------
// The ops

/// Evaluates one op on input tensors, one tensor per output.
pub fn eval_op(op: &Op<&Tensor, Dim>) -> Result<Vec<Tensor>, EvalError> {
    let name = op.mnemonic();
    for t in op.inputs() {
        t.check(name)?;
    }
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Embedding { table, ids } => one(embedding(name, table, ids)?),
        Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        } => one(matmul(name, a, b, *transpose_a, *transpose_b)?),
        Op::Add(a, b) => one(binary(name, a, b, |x, y| x + y)?),
        Op::Sub(a, b) => one(binary(name, a, b, |x, y| x - y)?),
        Op::Mul(a, b) => one(binary(name, a, b, |x, y| x * y)?),
        Op::Div(a, b) => one(binary(name, a, b, |x, y| x / y)?),
        Op::Scale { x, factor } => {
            let f = index::scale(factor).or_invalid(name)?;
            one(x.map(|v| v * f))
        }
        Op::Gelu(x) => one(x.map(|v| activation(Activation::Gelu, v))),
        Op::GeluTanh(x) => one(x.map(|v| activation(Activation::GeluTanh, v))),
        Op::Silu(x) => one(x.map(|v| activation(Activation::Silu, v))),
        Op::Relu(x) => one(x.map(|v| activation(Activation::Relu, v))),
        Op::LayerNorm {
            x,
            weight,
            bias,
            eps,
        } => one(layer_norm(name, x, *weight, *bias, *eps)?),
        Op::RmsNorm { x, weight, eps } => one(rms_norm(name, x, *weight, *eps)?),
        Op::Softmax { x, causal } => one(softmax(name, x, *causal)?),
        Op::Reshape { x, shape } => one(Tensor {
            shape: index::reshape(&x.shape, shape).or_invalid(name)?,
            data: x.data.clone(),
        }),
        Op::Transpose { x, perm } => one(transpose(name, x, perm)?),
        Op::Slice {
            x,
            dim: ax,
            start,
            end,
        } => {
            let (a, start, end) = index::slice(&x.shape, *ax, start, end).or_invalid(name)?;
            one(slice_axis(x, a, start, end))
        }
        Op::Split { x, dim: ax, sizes } => {
            let (a, parts) = index::split(&x.shape, *ax, sizes).or_invalid(name)?;
            Ok(parts
                .into_iter()
                .map(|p| slice_axis(x, a, p.start, p.end))
                .collect())
        }
        Op::Concat { xs, dim: ax } => one(concat(name, xs, *ax)?),
        Op::Rotary {
            x,
            base,
            inverse,
            scaling,
        } => one(rotary(name, x, *base, *inverse, scaling.as_ref())?),
        Op::Dropout { x, p } => {
            let scale = index::dropout_scale(*p).or_invalid(name)?;
            Ok(vec![dropout_mask(x, *p, scale)])
        }
        Op::CrossEntropy {
            logits,
            targets,
            shift,
            classes,
        } => {
            let ce = CeRows::new(name, logits, targets, *shift, classes.as_ref())?;
            let total: f64 = ce
                .rows
                .iter()
                .map(|&(row, target)| {
                    let r = ce.row(logits, row);
                    log_sum_exp(r) - r[target]
                })
                .sum();
            one(Tensor::scalar(total / ce.rows.len() as f64))
        }
        Op::CrossEntropyGrad {
            logits,
            targets,
            dloss,
            shift,
            classes,
        } => {
            let ce = CeRows::new(name, logits, targets, *shift, classes.as_ref())?;
            index::same_shape("the loss gradient", &[], &dloss.shape).or_invalid(name)?;
            let scale = dloss.data[0] / ce.rows.len() as f64;
            let mut out = Tensor::zeros(logits.shape.clone());
            for &(row, target) in &ce.rows {
                let r = ce.row(logits, row);
                let lse = log_sum_exp(r);
                let g = &mut out.data[row * ce.vocab..row * ce.vocab + ce.classes];
                for (v, (g, &l)) in g.iter_mut().zip(r).enumerate() {
                    let hit = if v == target { 1.0 } else { 0.0 };
                    *g = scale * ((l - lse).exp() - hit);
                }
            }
            one(out)
        }
        Op::AllReduce { x, .. } | Op::F { x, .. } | Op::G { x, .. } => one((*x).clone()),
        Op::AllGather { x, dim, parts, .. }
        | Op::ReduceScatter { x, dim, parts, .. }
        | Op::LocalSlice { x, dim, parts, .. } => {
            index::axis(&x.shape, *dim).or_invalid(name)?;
            match parts {
                0 => Err(invalid(name, "a collective over 0 parts")),
                1 => one((*x).clone()),
                _ => Err(EvalError::NeedsCommunicator {
                    op: name,
                    parts: *parts,
                }),
            }
        }
        Op::SumTo { x, shape } => one(sum_to(name, x, &index::dims(shape).or_invalid(name)?)?),
        Op::Expand { x, shape } => one(expand(name, x, &index::dims(shape).or_invalid(name)?)?),
        Op::Fill {
            shape,
            value,
            dtype,
        } => {
            index::fill(*value, *dtype, value.is_finite()).or_invalid(name)?;
            let shape = index::dims(shape).or_invalid(name)?;
            one(Tensor::try_full(name, shape, *value)?)
        }
        Op::Pad {
            x,
            dim: ax,
            before,
            after,
        } => {
            let (a, before, after) = index::pad(&x.shape, *ax, before, after).or_invalid(name)?;
            let mut shape = x.shape.clone();
            shape[a] = shape[a]
                .checked_add(before)
                .and_then(|s| s.checked_add(after))
                .ok_or_else(|| invalid(name, "padded size overflows"))?;
            let mut out = Tensor::try_full(name, shape, 0.0)?;
            let (outer, n, inner) = around(&x.shape, a);
            let m = out.shape[a];
            for o in 0..outer {
                let src = &x.data[o * n * inner..(o + 1) * n * inner];
                let dst = (o * m + before) * inner;
                out.data[dst..dst + n * inner].copy_from_slice(src);
            }
            one(out)
        }
        Op::ActGrad { act, x, dy } => {
            index::same_shape("the gradient", &x.shape, &dy.shape).or_invalid(name)?;
            one(Tensor {
                shape: x.shape.clone(),
                data: x
                    .data
                    .iter()
                    .zip(&dy.data)
                    .map(|(&x, &g)| g * activation_grad(*act, x))
                    .collect(),
            })
        }
        Op::LayerNormGrad { x, weight, dy, eps } => {
            layer_norm_grad(name, x, *weight, dy, *eps, true)
        }
        Op::RmsNormGrad { x, weight, dy, eps } => {
            layer_norm_grad(name, x, *weight, dy, *eps, false)
        }
        Op::SoftmaxGrad { y, dy } => {
            index::min_rank("the softmax output", &y.shape, 1).or_invalid(name)?;
            index::same_shape("the gradient", &y.shape, &dy.shape).or_invalid(name)?;
            let (outer, n) = y.rows();
            let mut out = Tensor::zeros(y.shape.clone());
            for r in 0..outer {
                let (ys, gs) = (&y.data[r * n..(r + 1) * n], &dy.data[r * n..(r + 1) * n]);
                let dot: f64 = ys.iter().zip(gs).map(|(y, g)| y * g).sum();
                for (o, (y, g)) in out.data[r * n..(r + 1) * n]
                    .iter_mut()
                    .zip(ys.iter().zip(gs))
                {
                    *o = y * (g - dot);
                }
            }
            one(out)
        }
        Op::EmbeddingGrad { table, ids, dy } => {
            let (rows, width) = index::embedding_table(&table.shape).or_invalid(name)?;
            let mut expected = ids.shape.clone();
            expected.push(width);
            index::same_shape("the output gradient", &expected, &dy.shape).or_invalid(name)?;
            let mut out = Tensor::zeros(table.shape.clone());
            for (k, &id) in ids.data.iter().enumerate() {
                let row = index(name, "id", id, k, rows)?;
                let src = &dy.data[k * width..(k + 1) * width];
                for (o, g) in out.data[row * width..(row + 1) * width].iter_mut().zip(src) {
                    *o += g;
                }
            }
            one(out)
        }
        Op::DropoutGrad { dy, forward, p } => {
            let scale = index::dropout_scale(*p).or_invalid(name)?;
            index::same_shape("the gradient", &forward.shape, &dy.shape).or_invalid(name)?;
            one(dropout_mask(dy, *p, scale))
        }
    }
}

fn binary(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f64, f64) -> f64,
) -> Result<Tensor> {
    let shape = index::binary(&a.shape, &b.shape).or_invalid(name)?;
    let mut out = Tensor::try_full(name, shape, 0.0)?;
    let shape = out.shape.clone();
    let mut k = 0;
    for_each_index(&shape, |idx| {
        out.data[k] = f(
            a.data[broadcast_offset(idx, &a.shape)],
            b.data[broadcast_offset(idx, &b.shape)],
        );
        k += 1;
    });
    Ok(out)
}

fn embedding(name: &'static str, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (rows, width) = index::embedding_table(&table.shape).or_invalid(name)?;
    let mut shape = ids.shape.clone();
    shape.push(width);
    let mut out = Tensor::try_full(name, shape, 0.0)?;
    for (k, &id) in ids.data.iter().enumerate() {
        let row = index(name, "id", id, k, rows)?;
        out.data[k * width..(k + 1) * width]
            .copy_from_slice(&table.data[row * width..(row + 1) * width]);
    }
    Ok(out)
}

fn matmul(name: &'static str, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let mm = index::matmul(&a.shape, &b.shape, ta, tb).or_invalid(name)?;
    let mut out = Tensor::try_full(name, mm.out_shape(), 0.0)?;
    let (m, n, k) = (mm.m, mm.n, mm.k);
    let (a_rows, a_cols, b_rows, b_cols) = (mm.a_rows, mm.a_cols, mm.b_rows, mm.b_cols);
    // A(i, l) and B(l, j) of one batch, read through the transposes.
    let a_at = |base: usize, i: usize, l: usize| {
        a.data[base + if ta { l * a_cols + i } else { i * a_cols + l }]
    };
    let b_at = |base: usize, l: usize, j: usize| {
        b.data[base + if tb { j * b_cols + l } else { l * b_cols + j }]
    };
    let mut bi = 0;
    for_each_index(&mm.batch, |idx| {
        let base_a = broadcast_offset(idx, mm.batch_a) * a_rows * a_cols;
        let base_b = broadcast_offset(idx, mm.batch_b) * b_rows * b_cols;
        for i in 0..m {
            for j in 0..n {
                out.data[(bi * m + i) * n + j] = (0..k)
                    .map(|l| a_at(base_a, i, l) * b_at(base_b, l, j))
                    .sum();
            }
        }
        bi += 1;
    });
    Ok(out)
}

/// The shape of an optional tensor.
fn shape_of(t: Option<&Tensor>) -> Option<&[usize]> {
    t.map(|t| &t.shape[..])
}

/// Per row of the last axis: `(x̂, 1/σ)`, with `x̂ = (x − μ)/σ` for LayerNorm (`centered`) and
/// `x̂ = x/σ`, `σ = √(mean(x²) + eps)`, for RMSNorm.
fn normalize(row: &[f64], eps: f64, centered: bool) -> (Vec<f64>, f64) {
    let n = row.len() as f64;
    let mean = if centered {
        row.iter().sum::<f64>() / n
    } else {
        0.0
    };
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    (row.iter().map(|x| (x - mean) * inv).collect(), inv)
}

fn norm_forward(
    name: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    centered: bool,
) -> Result<Tensor> {
    let (outer, n) =
        index::norm(&x.shape, eps, None, shape_of(weight), shape_of(bias)).or_invalid(name)?;
    let mut out = Tensor::zeros(x.shape.clone());
    for r in 0..outer {
        let (xhat, _) = normalize(&x.data[r * n..(r + 1) * n], eps, centered);
        for (i, v) in xhat.into_iter().enumerate() {
            let w = weight.map_or(1.0, |w| w.data[i]);
            let b = bias.map_or(0.0, |b| b.data[i]);
            out.data[r * n + i] = v * w + b;
        }
    }
    Ok(out)
}

fn layer_norm(
    name: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    norm_forward(name, x, weight, bias, eps, true)
}

fn rms_norm(name: &'static str, x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    norm_forward(name, x, weight, None, eps, false)
}

/// LayerNorm's (`centered`) or RMSNorm's VJP: `dx`, `dweight = Σ dy·x̂` and, for LayerNorm,
/// `dbias = Σ dy`, the sums over every leading position.
fn layer_norm_grad(
    name: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    dy: &Tensor,
    eps: f64,
    centered: bool,
) -> Result<Vec<Tensor>> {
    let (outer, n) =
        index::norm(&x.shape, eps, Some(&dy.shape), shape_of(weight), None).or_invalid(name)?;
    let mut dx = Tensor::zeros(x.shape.clone());
    let mut dw = Tensor::zeros(vec![n]);
    let mut db = Tensor::zeros(vec![n]);
    for r in 0..outer {
        let (xhat, inv) = normalize(&x.data[r * n..(r + 1) * n], eps, centered);
        let dys = &dy.data[r * n..(r + 1) * n];
        // The gradient with respect to x̂, then through the normalization:
        // dx = (g − mean(g) − x̂·mean(g·x̂))/σ for LayerNorm, (g − x̂·mean(g·x̂))/σ for RMSNorm.
        let g: Vec<f64> = (0..n)
            .map(|i| dys[i] * weight.map_or(1.0, |w| w.data[i]))
            .collect();
        let mean_g = if centered {
            g.iter().sum::<f64>() / n as f64
        } else {
            0.0
        };
        let mean_gx = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / n as f64;
        for i in 0..n {
            dx.data[r * n + i] = inv * (g[i] - mean_g - xhat[i] * mean_gx);
            dw.data[i] += dys[i] * xhat[i];
            db.data[i] += dys[i];
        }
    }
    Ok(if centered {
        vec![dx, dw, db]
    } else {
        vec![dx, dw]
    })
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY || max.is_nan() {
        return max;
    }
    max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

fn softmax(name: &'static str, x: &Tensor, causal: bool) -> Result<Tensor> {
    let (outer, keys, queries) = index::softmax(&x.shape, causal).or_invalid(name)?;
    let mut out = Tensor::zeros(x.shape.clone());
    for r in 0..outer {
        // Query i sees keys 0..=i + (keys − queries).
        let visible = if causal {
            r % queries + (keys - queries) + 1
        } else {
            keys
        };
        let row = &x.data[r * keys..r * keys + visible];
        let lse = log_sum_exp(row);
        for (o, v) in out.data[r * keys..r * keys + visible].iter_mut().zip(row) {
            *o = (v - lse).exp();
        }
    }
    Ok(out)
}

fn transpose(name: &'static str, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let shape = index::transpose(&x.shape, perm).or_invalid(name)?;
    let mut src = vec![0; x.rank()];
    Ok(Tensor::from_fn(shape, |idx| {
        for (i, &p) in perm.iter().enumerate() {
            src[p] = idx[i];
        }
        x.data[row_major_index(&src, &x.shape)]
    }))
}

/// `x[start..end]` along axis `a` (bounds already checked).
fn slice_axis(x: &Tensor, a: usize, start: usize, end: usize) -> Tensor {
    let (outer, n, inner) = around(&x.shape, a);
    let mut shape = x.shape.clone();
    shape[a] = end - start;
    let mut data = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        data.extend_from_slice(&x.data[(o * n + start) * inner..(o * n + end) * inner]);
    }
    Tensor { shape, data }
}

fn concat(name: &'static str, xs: &[&Tensor], ax: i64) -> Result<Tensor> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
    let (a, shape) = index::concat(&shapes, ax).or_invalid(name)?;
    let mut out = Tensor::try_full(name, shape, 0.0)?;
    let (outer, _, inner) = around(&xs[0].shape, a);
    let mut k = 0;
    for o in 0..outer {
        for x in xs {
            let chunk = x.shape[a] * inner;
            out.data[k..k + chunk].copy_from_slice(&x.data[o * chunk..(o + 1) * chunk]);
            k += chunk;
        }
    }
    Ok(out)
}

fn rotary(
    name: &'static str,
    x: &Tensor,
    base: f64,
    inverse: bool,
    scaling: Option<&RopeScaling>,
) -> Result<Tensor> {
    let (seq, heads, head_dim) = index::rotary(&x.shape, base).or_invalid(name)?;
    if let Some(s) = scaling {
        index::rope_scaling(s).or_invalid(name)?;
    }
    let r = x.rank();
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let outer: usize = x.shape[..r - 3].iter().product();
    let mut out = x.clone();
    for o in 0..outer {
        for pos in 0..seq {
            for h in 0..heads {
                let at = ((o * seq + pos) * heads + h) * head_dim;
                for i in 0..half {
                    let theta =
                        sign * pos as f64 * index::rotary_frequency(i, head_dim, base, scaling);
                    let (sin, cos) = theta.sin_cos();
                    let (x1, x2) = (x.data[at + i], x.data[at + i + half]);
                    out.data[at + i] = x1 * cos - x2 * sin;
                    out.data[at + i + half] = x2 * cos + x1 * sin;
                }
            }
        }
    }
    Ok(out)
}

fn dropout_mask(x: &Tensor, p: f64, scale: f64) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if dropout_keeps(i as u64, p) {
                    v * scale
                } else {
                    0.0
                }
            })
            .collect(),
    }
}

/// The positions a cross-entropy averages over: `(row of the logits, target class)`.
struct CeRows {
    rows: Vec<(usize, usize)>,
    vocab: usize,
    classes: usize,
}

impl CeRows {
    fn new(
        name: &'static str,
        logits: &Tensor,
        targets: &Tensor,
        shift: bool,
        classes: Option<&Dim>,
    ) -> Result<CeRows> {
        index::min_rank("the logits ([..., seq, vocab])", &logits.shape, 2).or_invalid(name)?;
        let r = logits.rank();
        index::same_shape("the targets", &logits.shape[..r - 1], &targets.shape)
            .or_invalid(name)?;
        let (seq, vocab) = (logits.shape[r - 2], logits.shape[r - 1]);
        let classes = index::ce_classes(&logits.shape, classes).or_invalid(name)?;
        let mut rows = Vec::new();
        for row in 0..targets.numel() {
            let t = row % seq;
            let target_at = if shift {
                if t + 1 == seq {
                    continue; // the last position predicts nothing
                }
                row + 1
            } else {
                row
            };
            let target = index(name, "target", targets.data[target_at], target_at, classes)?;
            rows.push((row, target));
        }
        if rows.is_empty() {
            return Err(invalid(
                name,
                format!(
                    "no position predicts a target (logits {:?}, shift {shift}): no mean",
                    logits.shape
                ),
            ));
        }
        Ok(CeRows {
            rows,
            vocab,
            classes,
        })
    }

    /// The real classes' logits of one row.
    fn row<'a>(&self, logits: &'a Tensor, row: usize) -> &'a [f64] {
        &logits.data[row * self.vocab..row * self.vocab + self.classes]
    }
}

/// `x` broadcast to `shape`: the transpose of [`sum_to`].
fn expand(name: &'static str, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    index::expand(&x.shape, shape).or_invalid(name)?;
    let mut out = Tensor::try_full(name, shape.to_vec(), 0.0)?;
    let mut k = 0;
    for_each_index(shape, |idx| {
        out.data[k] = x.data[broadcast_offset(idx, &x.shape)];
        k += 1;
    });
    Ok(out)
}

fn sum_to(name: &'static str, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    index::sum_to(&x.shape, shape).or_invalid(name)?;
    let mut out = Tensor::try_full(name, shape.to_vec(), 0.0)?;
    let mut k = 0;
    for_each_index(&x.shape, |idx| {
        out.data[broadcast_offset(idx, shape)] += x.data[k];
        k += 1;
    });
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Graphs

fn check_declared(g: &Graph, v: ValueId, t: &Tensor) -> Result<()> {
    let declared = g.ty(v).shape.sizes();
    let matches = declared.len() == t.shape.len()
        && declared.iter().zip(&t.shape).all(|(&d, &s)| d == s as u64);
    if matches {
        Ok(())
    } else {
        Err(EvalError::ShapeMismatch {
            name: g.values[v].name.clone(),
            expected: declared,
            found: t.shape.clone(),
        })
    }
}

/// Evaluates a whole graph in program order; `feed` gives every graph input and parameter value.
/// Returns every value: the fed ones and every node output. Values in `feed` that are neither
/// inputs nor parameters are ignored.
pub fn eval_graph(
    g: &Graph,
    feed: &HashMap<ValueId, Tensor>,
) -> Result<HashMap<ValueId, Tensor>, EvalError> {
    let mut env: HashMap<ValueId, Tensor> = HashMap::new();
    let fed = g
        .inputs
        .iter()
        .copied()
        .chain(g.params.values().map(|p| p.value));
    for v in fed {
        let data = g
            .values
            .get(v)
            .ok_or_else(|| EvalError::Graph(format!("value {v} does not exist")))?;
        let t = feed.get(&v).ok_or_else(|| EvalError::MissingFeed {
            name: data.name.clone(),
            value: v,
        })?;
        t.check("feed")?;
        check_declared(g, v, t)?;
        env.insert(v, t.clone());
    }
    for &n in &g.order {
        let node = g
            .nodes
            .get(n)
            .ok_or_else(|| EvalError::Graph(format!("node {n} does not exist")))?;
        let in_node = |e: EvalError| EvalError::Node {
            node: node.name.clone(),
            source: Box::new(e),
        };
        let outs = {
            let op = node.op.try_map(
                |v| {
                    env.get(v)
                        .ok_or_else(|| EvalError::Graph(undefined(g, *v, n)))
                },
                |d| Ok(d.clone()),
            )?;
            eval_op(&op).map_err(in_node)?
        };
        if outs.len() != node.outputs.len() {
            return Err(EvalError::Graph(format!(
                "node `{}` has {} outputs, its op produced {}",
                node.name,
                node.outputs.len(),
                outs.len()
            )));
        }
        for (&v, t) in node.outputs.iter().zip(outs) {
            if g.values.get(v).is_none() {
                return Err(EvalError::Graph(format!("value {v} does not exist")));
            }
            check_declared(g, v, &t)?;
            env.insert(v, t);
        }
    }
    Ok(env)
}

fn undefined(g: &Graph, v: ValueId, n: NodeId) -> String {
    let value = g.values.get(v).map_or("?", |d| d.name.as_str());
    let node = g.nodes.get(n).map_or("?", |d| d.name.as_str());
    format!("`{node}` reads `{value}` ({v}) before it is defined")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::MeshAxis;
    use crate::{DType, Init, Shape, TensorType};

    fn t(shape: &[usize], data: &[f64]) -> Tensor {
        Tensor::new(shape.to_vec(), data.to_vec())
    }

    #[test]
    fn keep_threshold_matches_dropout_keeps() {
        for p in [0.0, 1e-12, 0.1, 0.25, 0.5, 0.9, 0.999_999] {
            let u = keep_threshold(p);
            for h in [
                u.wrapping_sub(1),
                u,
                u.wrapping_add(1),
                u.saturating_add(1 << 20),
            ] {
                let keeps = h as f64 / 2f64.powi(64) >= p;
                assert_eq!(h >= u, keeps, "p {p}, h {h}");
            }
        }
    }

    fn random(rng: &mut fastrand::Rng, shape: &[usize]) -> Tensor {
        Tensor::from_fn(shape.to_vec(), |_| rng.f64() * 4.0 - 2.0)
    }

    fn eval1(op: Op<&Tensor, Dim>) -> Tensor {
        let mut out = eval_op(&op).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
        let scale = 1.0f64.max(b.max_abs());
        let diff = a
            .max_abs_diff(b)
            .unwrap_or_else(|| panic!("shapes differ: {:?} vs {:?}", a.shape, b.shape));
        assert!(
            diff <= tol * scale,
            "differ by {diff:e}:\n  {:?}\n  {:?}",
            a.data,
            b.data
        );
    }

    fn d(n: u64) -> Dim {
        Dim::new(n)
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape, b.shape);
        a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
    }

    /// The numerical VJP `⟨dy, ∂f/∂x⟩` by central differences.
    fn numeric_vjp(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, dy: &Tensor) -> Tensor {
        let h = 1e-5;
        let mut out = Tensor::zeros(x.shape.clone());
        for i in 0..x.numel() {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus.data[i] += h;
            minus.data[i] -= h;
            out.data[i] = (dot(dy, &f(&plus)) - dot(dy, &f(&minus))) / (2.0 * h);
        }
        out
    }

    const FD_TOL: f64 = 1e-7;

    #[test]
    fn erf_matches_known_values() {
        // From CPython's math.erf / math.erfc.
        let cases = [
            (0.1, 0.1124629160182849, 0.8875370839817152),
            (0.5, 0.5204998778130465, 0.4795001221869535),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (1.5, 0.9661051464753108, 0.033894853524689274),
            (2.0, 0.9953222650189527, 0.004677734981047265),
            (2.4, 0.999311486103355, 0.0006885138966450789),
            (2.5, 0.999593047982555, 0.0004069520174449589),
            (2.6, 0.9997639655834707, 0.00023603441652934908),
            (3.0, 0.9999779095030014, 2.2090496998585438e-05),
            (4.0, 0.9999999845827421, 1.541725790028002e-08),
            (5.5, 0.9999999999999927, 7.357847917974398e-15),
        ];
        for (x, e, c) in cases {
            assert!((erf(x) - e).abs() < 1e-15, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + e).abs() < 1e-15);
            // Full relative accuracy in the tail, where erfc is not computed as 1 − erf.
            let tol = if x >= 2.5 { 1e-14 * c } else { 1e-15 };
            assert!((erfc(x) - c).abs() <= tol, "erfc({x}) = {}", erfc(x));
            assert!((erfc(-x) - (2.0 - c)).abs() < 1e-15);
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(40.0), 1.0);
        assert_eq!(erfc(40.0), 0.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn gelu_values() {
        // x·Φ(x): Φ(1) = 0.8413447460685429, Φ(−2) = 0.022750131948179195.
        let x = t(&[3], &[1.0, -2.0, 0.0]);
        let y = eval1(Op::Gelu(&x));
        assert_close(
            &y,
            &t(&[3], &[0.8413447460685429, -0.04550026389635844, 0.0]),
            1e-15,
        );
        // GPT-2: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) at x = 1.
        let y = eval1(Op::GeluTanh(&x));
        let u: f64 = (2.0 / std::f64::consts::PI).sqrt() * 1.044715;
        assert!((y.data[0] - 0.5 * (1.0 + u.tanh())).abs() < 1e-15);
        assert!((y.data[0] - 0.8411919906082768).abs() < 1e-12);
    }

    #[test]
    fn matmul_with_transposes_and_broadcasting() {
        // a: [1, 2, 3] read transposed (A = [[1,4],[2,5],[3,6]]); b: two batches [2, 2].
        let a = t(&[1, 2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = t(&[2, 2, 2], &[1., 0., 0., 1., 0., 1., 1., 1.]);
        let y = eval1(Op::MatMul {
            a: &a,
            b: &b,
            transpose_a: true,
            transpose_b: false,
        });
        let expected = [1., 4., 2., 5., 3., 6., 4., 5., 5., 7., 6., 9.];
        assert_eq!(y, t(&[2, 3, 2], &expected));

        // transpose_b: B = [[1,0,1],[0,1,1]].
        let a = t(&[2, 2], &[1., 2., 3., 4.]);
        let b = t(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
        let y = eval1(Op::MatMul {
            a: &a,
            b: &b,
            transpose_a: false,
            transpose_b: true,
        });
        assert_eq!(y, t(&[2, 3], &[1., 2., 3., 3., 4., 7.]));

        // Both batch axes broadcast: [2,1,1,2] · [3,2,1] → [2,3,1,1], out[i,j] = a_i · b_j.
        let a = t(&[2, 1, 1, 2], &[1., 2., 3., 4.]);
        let b = t(&[3, 2, 1], &[1., 1., 1., 0., 0., 2.]);
        let y = eval1(Op::MatMul {
            a: &a,
            b: &b,
            transpose_a: false,
            transpose_b: false,
        });
        assert_eq!(y, t(&[2, 3, 1, 1], &[3., 1., 4., 7., 3., 8.]));

        let bad = eval_op(&Op::MatMul {
            a: &a,
            b: &a,
            transpose_a: false,
            transpose_b: false,
        });
        assert!(matches!(bad, Err(EvalError::Invalid { .. })), "{bad:?}");
    }

    #[test]
    fn broadcasting_elementwise() {
        let a = t(&[2, 1], &[1., 2.]);
        let b = t(&[3], &[10., 20., 30.]);
        assert_eq!(
            eval1(Op::Sub(&a, &b)),
            t(&[2, 3], &[-9., -19., -29., -8., -18., -28.])
        );
        assert_eq!(
            eval1(Op::Div(&b, &Tensor::scalar(10.0))),
            t(&[3], &[1., 2., 3.])
        );
        assert!(eval_op(&Op::Add(&b, &t(&[2], &[1., 2.]))).is_err());
    }

    #[test]
    fn causal_softmax_masks_future_keys() {
        // 2 queries, 3 keys: query 0 sees keys 0..=1, query 1 all three.
        let x = t(&[2, 3], &[0., 3f64.ln(), 5., 0., 0., 0.]);
        let y = eval1(Op::Softmax {
            x: &x,
            causal: true,
        });
        assert_close(
            &y,
            &t(&[2, 3], &[0.25, 0.75, 0., 1. / 3., 1. / 3., 1. / 3.]),
            1e-15,
        );
        // Batched: the query index restarts in each matrix.
        let x = Tensor::zeros(vec![2, 2, 2]);
        let y = eval1(Op::Softmax {
            x: &x,
            causal: true,
        });
        assert_eq!(y, t(&[2, 2, 2], &[1., 0., 0.5, 0.5, 1., 0., 0.5, 0.5]));
        let y = eval1(Op::Softmax {
            x: &x,
            causal: false,
        });
        assert_eq!(y, Tensor::full(vec![2, 2, 2], 0.5));
        assert!(eval_op(&Op::Softmax {
            x: &Tensor::zeros(vec![3, 2]),
            causal: true
        })
        .is_err());
    }

    /// Llama 3.1's rescaling (its published figures): the high frequencies kept, the low ones
    /// divided by the factor, the band between blended; the rotation
    /// with it is still undone by its inverse.
    #[test]
    fn rotary_frequencies_follow_the_llama3_bands() {
        let s = RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        };
        let (d, base) = (128, 500000.0f64);
        let plain = |i: usize| base.powf(-2.0 * i as f64 / d as f64);
        let scaled = |i: usize| index::rotary_frequency(i, d, base, Some(&s));
        // Wavelength 2π: under 8192 / 4.
        assert_eq!(scaled(0), plain(0));
        // Wavelength ~4.1e5: over 8192 / 1.
        assert_eq!(scaled(60), plain(60) / 8.0);
        // Wavelength ~2,950, between: (1 − t)·f/8 + t·f with t = (8192/λ − 1)/(4 − 1).
        let f = plain(30);
        let wavelength = 2.0 * std::f64::consts::PI / f;
        assert!(2048.0 < wavelength && wavelength < 8192.0, "{wavelength}");
        let smooth = (8192.0 / wavelength - 1.0) / 3.0;
        assert!((scaled(30) - ((1.0 - smooth) * f / 8.0 + smooth * f)).abs() < 1e-18);
        assert!(plain(30) / 8.0 < scaled(30) && scaled(30) < plain(30));
        // Without rescaling, the plain frequency to the bit.
        assert_eq!(index::rotary_frequency(30, d, base, None), f);

        let x = t(
            &[3, 1, 8],
            &(0..24).map(|i| i as f64 * 0.1).collect::<Vec<_>>(),
        );
        let small = RopeScaling {
            original_max_position: 16,
            ..s
        };
        let op = |x, inverse| Op::Rotary {
            x,
            base: 10.0,
            inverse,
            scaling: Some(small),
        };
        let y = eval1(op(&x, false));
        assert_ne!(
            y,
            eval1(Op::Rotary {
                x: &x,
                base: 10.0,
                inverse: false,
                scaling: None
            })
        );
        assert_close(&eval1(op(&y, true)), &x, 1e-12);
        let bad = RopeScaling {
            high_freq_factor: 0.5,
            ..s
        };
        assert!(eval_op(&Op::Rotary {
            x: &x,
            base: 10.0,
            inverse: false,
            scaling: Some(bad)
        })
        .is_err());
    }

    #[test]
    fn rotary_rotates_half_pairs_and_inverts() {
        // [seq 2, heads 1, head_dim 4]: position 0 is unchanged; at position 1 the pair (0, 2)
        // turns by 1 radian and (1, 3) by 10000^(−1/2) = 0.01.
        let x = t(&[2, 1, 4], &[1., 2., 3., 4., 1., 2., 3., 4.]);
        let y = eval1(Op::Rotary {
            x: &x,
            base: 10000.0,
            inverse: false,
            scaling: None,
        });
        let (s1, c1) = 1f64.sin_cos();
        let (s2, c2) = 0.01f64.sin_cos();
        let pos1 = [
            c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + s1,
            4. * c2 + 2. * s2,
        ];
        assert_close(
            &y,
            &t(
                &[2, 1, 4],
                &[1., 2., 3., 4., pos1[0], pos1[1], pos1[2], pos1[3]],
            ),
            1e-15,
        );

        let mut rng = fastrand::Rng::with_seed(7);
        let x = random(&mut rng, &[2, 5, 3, 6]);
        let y = eval1(Op::Rotary {
            x: &x,
            base: 500.0,
            inverse: false,
            scaling: None,
        });
        let back = eval1(Op::Rotary {
            x: &y,
            base: 500.0,
            inverse: true,
            scaling: None,
        });
        assert_close(&back, &x, 1e-14);
        // The inverse is the transpose: ⟨R x, dy⟩ = ⟨x, R⁻¹ dy⟩.
        let dy = random(&mut rng, &[2, 5, 3, 6]);
        let rdy = eval1(Op::Rotary {
            x: &dy,
            base: 500.0,
            inverse: true,
            scaling: None,
        });
        assert!((dot(&y, &dy) - dot(&x, &rdy)).abs() < 1e-12);
        assert!(eval_op(&Op::Rotary {
            x: &Tensor::zeros(vec![2, 1, 3]),
            base: 10000.0,
            inverse: false,
            scaling: None,
        })
        .is_err());
    }

    #[test]
    fn cross_entropy_by_hand() {
        let ln2 = 2f64.ln();
        // One sequence of 3 positions, 2 classes.
        let logits = t(&[1, 3, 2], &[0., 0., 3f64.ln(), 0., 5., 5.]);
        let targets = t(&[1, 3], &[0., 0., 1.]);
        let ce = |shift, classes: Option<u64>, logits: &Tensor, targets: &Tensor| {
            eval1(Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes: classes.map(d),
            })
            .data[0]
        };
        // shift: position 0 predicts target 0 (p = 1/2), position 1 target 1 (p = 1/4).
        let loss = ce(true, None, &logits, &targets);
        assert!((loss - 1.5 * ln2).abs() < 1e-15, "{loss}");
        // no shift: p = 1/2, 3/4, 1/2.
        let loss = ce(false, None, &logits, &targets);
        assert!((loss - (ln2 + (4f64 / 3.).ln() + ln2) / 3.).abs() < 1e-15);
        // With shift, the first target is never read: out of range is fine.
        let odd = t(&[1, 3], &[7., 0., 1.]);
        assert!((ce(true, None, &logits, &odd) - 1.5 * ln2).abs() < 1e-15);
        assert!(matches!(
            eval_op(&Op::CrossEntropy {
                logits: &logits,
                targets: &odd,
                shift: false,
                classes: None
            }),
            Err(EvalError::Index { .. })
        ));
    }

    #[test]
    fn cross_entropy_padding_equals_unpadded() {
        let mut rng = fastrand::Rng::with_seed(3);
        let real = random(&mut rng, &[2, 4, 5]);
        // Pad the class axis with 3 garbage columns.
        let junk = Tensor::full(vec![2, 4, 3], 40.0);
        let padded = eval1(Op::Concat {
            xs: vec![&real, &junk],
            dim: -1,
        });
        let targets = Tensor::from_fn(vec![2, 4], |_| rng.usize(0..5) as f64);
        let dloss = Tensor::scalar(0.7);
        for shift in [false, true] {
            let full = eval1(Op::CrossEntropy {
                logits: &real,
                targets: &targets,
                shift,
                classes: None,
            });
            let pad = eval1(Op::CrossEntropy {
                logits: &padded,
                targets: &targets,
                shift,
                classes: Some(d(5)),
            });
            assert_close(&pad, &full, 1e-14);
            let g_full = eval1(Op::CrossEntropyGrad {
                logits: &real,
                targets: &targets,
                dloss: &dloss,
                shift,
                classes: None,
            });
            let g_pad = eval1(Op::CrossEntropyGrad {
                logits: &padded,
                targets: &targets,
                dloss: &dloss,
                shift,
                classes: Some(d(5)),
            });
            let expected = eval1(Op::Concat {
                xs: vec![&g_full, &Tensor::zeros(vec![2, 4, 3])],
                dim: -1,
            });
            assert_close(&g_pad, &expected, 1e-14);
        }
        // A target in the padding is an error.
        let bad = Tensor::full(vec![2, 4], 6.0);
        assert!(eval_op(&Op::CrossEntropy {
            logits: &padded,
            targets: &bad,
            shift: false,
            classes: Some(d(5)),
        })
        .is_err());
    }

    #[test]
    fn layer_norm_by_hand() {
        // x = [1, 2, 3, 4]: mean 2.5, variance 1.25.
        let x = t(&[1, 4], &[1., 2., 3., 4.]);
        let w = t(&[4], &[1., 2., 1., 1.]);
        let b = t(&[4], &[0., 0., 0., 1.]);
        let y = eval1(Op::LayerNorm {
            x: &x,
            weight: Some(&w),
            bias: Some(&b),
            eps: 1e-5,
        });
        let s = (1.25f64 + 1e-5).sqrt();
        assert_close(
            &y,
            &t(&[1, 4], &[-1.5 / s, -1.0 / s, 0.5 / s, 1.5 / s + 1.0]),
            1e-15,
        );
        // RMSNorm: mean(x²) = 7.5.
        let y = eval1(Op::RmsNorm {
            x: &x,
            weight: None,
            eps: 1e-5,
        });
        let r = (7.5f64 + 1e-5).sqrt();
        assert_close(&y, &t(&[1, 4], &[1. / r, 2. / r, 3. / r, 4. / r]), 1e-15);
        assert!(eval_op(&Op::LayerNorm {
            x: &x,
            weight: Some(&b),
            bias: None,
            eps: 0.0
        })
        .is_err());
    }

    #[test]
    fn sum_to_and_pad_by_hand() {
        let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let sum = |shape: &[u64]| {
            eval1(Op::SumTo {
                x: &x,
                shape: shape.iter().copied().map(d).collect(),
            })
        };
        assert_eq!(sum(&[3]), t(&[3], &[5., 7., 9.]));
        assert_eq!(sum(&[2, 1]), t(&[2, 1], &[6., 15.]));
        assert_eq!(sum(&[1, 1]), t(&[1, 1], &[21.]));
        assert_eq!(sum(&[]), Tensor::scalar(21.));
        assert_eq!(sum(&[2, 3]), x);
        assert!(eval_op(&Op::SumTo {
            x: &x,
            shape: vec![d(2)]
        })
        .is_err());

        let pad = |axis, before, after| {
            eval1(Op::Pad {
                x: &x,
                dim: axis,
                before: d(before),
                after: d(after),
            })
        };
        assert_eq!(
            pad(-1, 1, 2),
            t(&[2, 6], &[0., 1., 2., 3., 0., 0., 0., 4., 5., 6., 0., 0.])
        );
        assert_eq!(
            pad(0, 0, 1),
            t(&[3, 3], &[1., 2., 3., 4., 5., 6., 0., 0., 0.])
        );
        // Pad is Slice's transpose.
        let mut rng = fastrand::Rng::with_seed(11);
        let big = random(&mut rng, &[3, 7, 2]);
        let small = random(&mut rng, &[3, 4, 2]);
        let sliced = eval1(Op::Slice {
            x: &big,
            dim: 1,
            start: d(2),
            end: d(6),
        });
        let padded = eval1(Op::Pad {
            x: &small,
            dim: -2,
            before: d(2),
            after: d(1),
        });
        assert!((dot(&sliced, &small) - dot(&big, &padded)).abs() < 1e-12);
    }

    #[test]
    fn shape_ops() {
        let x = Tensor::from_fn(vec![2, 3, 4], |i| (i[0] * 100 + i[1] * 10 + i[2]) as f64);
        let y = eval1(Op::Transpose {
            x: &x,
            perm: vec![2, 0, 1],
        });
        assert_eq!(y.shape, vec![4, 2, 3]);
        assert_eq!(y.at(&[3, 1, 2]), 123.0);
        let parts = eval_op(&Op::Split {
            x: &x,
            dim: 1,
            sizes: vec![d(1), d(2)],
        })
        .unwrap();
        assert_eq!(parts[1].shape, vec![2, 2, 4]);
        assert_eq!(parts[1].at(&[1, 0, 3]), 113.0);
        let joined = eval1(Op::Concat {
            xs: parts.iter().collect(),
            dim: -2,
        });
        assert_eq!(joined, x);
        let r = eval1(Op::Reshape {
            x: &x,
            shape: vec![d(6), d(4)],
        });
        assert_eq!(r.at(&[5, 1]), 121.0);
        assert!(eval_op(&Op::Reshape {
            x: &x,
            shape: vec![d(5)]
        })
        .is_err());
        assert!(eval_op(&Op::Transpose {
            x: &x,
            perm: vec![0, 0, 1]
        })
        .is_err());
        assert!(eval_op(&Op::Slice {
            x: &x,
            dim: 3,
            start: d(0),
            end: d(1)
        })
        .is_err());
    }

    #[test]
    fn embedding_and_its_errors() {
        let table = t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
        let ids = t(&[2, 2], &[2., 0., 0., 1.]);
        let y = eval1(Op::Embedding {
            table: &table,
            ids: &ids,
        });
        assert_eq!(y, t(&[2, 2, 2], &[5., 6., 1., 2., 1., 2., 3., 4.]));
        for bad in [3.0, -1.0, 0.5, f64::NAN] {
            let ids = t(&[1], &[bad]);
            let r = eval_op(&Op::Embedding {
                table: &table,
                ids: &ids,
            });
            assert!(matches!(r, Err(EvalError::Index { .. })), "{bad}: {r:?}");
        }
        // A tensor whose data does not fit its shape is an error, not a panic.
        let broken = Tensor {
            shape: vec![2, 2],
            data: vec![1.0],
        };
        assert!(eval_op(&Op::Relu(&broken)).is_err());
        assert!(eval_op(&Op::Fill {
            shape: vec![d(1 << 40), d(1 << 40)],
            value: 0.0,
            dtype: DType::F32
        })
        .is_err());
    }

    #[test]
    fn dropout_is_a_deterministic_mask() {
        let x = Tensor::full(vec![100, 100], 1.0);
        let y = eval1(Op::Dropout { x: &x, p: 0.25 });
        let kept = y.data.iter().filter(|&&v| v != 0.0).count();
        assert!((7300..7700).contains(&kept), "{kept}");
        assert!(y.data.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        for (i, &v) in y.data.iter().enumerate() {
            assert_eq!(v != 0.0, dropout_keeps(i as u64, 0.25));
        }
        assert_eq!(eval1(Op::Dropout { x: &x, p: 0.0 }), x);
        // SplitMix64 seeded with 0: its well-known first output.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert!(eval_op(&Op::Dropout { x: &x, p: 1.0 }).is_err());
    }

    #[test]
    fn collectives_on_one_process() {
        let x = t(&[2, 2], &[1., 2., 3., 4.]);
        for op in [
            Op::AllReduce {
                x: &x,
                axis: MeshAxis::Tp,
            },
            Op::F {
                x: &x,
                axis: MeshAxis::Tp,
            },
            Op::G {
                x: &x,
                axis: MeshAxis::Dp,
            },
            Op::AllGather {
                x: &x,
                dim: 0,
                axis: MeshAxis::Tp,
                parts: 1,
                partial_grad: false,
            },
            Op::ReduceScatter {
                x: &x,
                dim: 1,
                axis: MeshAxis::Tp,
                parts: 1,
            },
            Op::LocalSlice {
                x: &x,
                dim: -1,
                axis: MeshAxis::Tp,
                parts: 1,
            },
        ] {
            assert_eq!(eval1(op), x);
        }
        let r = eval_op(&Op::AllGather {
            x: &x,
            dim: 0,
            axis: MeshAxis::Tp,
            parts: 2,
            partial_grad: false,
        });
        assert!(
            matches!(r, Err(EvalError::NeedsCommunicator { parts: 2, .. })),
            "{r:?}"
        );
        assert!(eval_op(&Op::LocalSlice {
            x: &x,
            dim: 0,
            axis: MeshAxis::Tp,
            parts: 4,
        })
        .is_err());
    }

    // ---- Finite-difference checks: each backward op against its forward op.

    #[test]
    fn act_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(1);
        // Keep away from ReLU's kink at 0.
        let x = Tensor::from_fn(vec![3, 7], |_| {
            let v = rng.f64() * 8.0 - 4.0;
            if v.abs() < 0.01 {
                0.5
            } else {
                v
            }
        });
        let dy = random(&mut rng, &[3, 7]);
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            let forward = |x: &Tensor| {
                eval1(match act {
                    Activation::Gelu => Op::Gelu(x),
                    Activation::GeluTanh => Op::GeluTanh(x),
                    Activation::Silu => Op::Silu(x),
                    Activation::Relu => Op::Relu(x),
                })
            };
            let analytic = eval1(Op::ActGrad {
                act,
                x: &x,
                dy: &dy,
            });
            assert_close(&analytic, &numeric_vjp(forward, &x, &dy), FD_TOL);
        }
    }

    #[test]
    fn layer_norm_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(2);
        let x = random(&mut rng, &[2, 3, 5]);
        let w = random(&mut rng, &[5]);
        let b = random(&mut rng, &[5]);
        let dy = random(&mut rng, &[2, 3, 5]);
        let eps = 1e-3;
        let ln = |x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>| {
            eval1(Op::LayerNorm {
                x,
                weight: w,
                bias: b,
                eps,
            })
        };
        for weight in [Some(&w), None] {
            let grads = eval_op(&Op::LayerNormGrad {
                x: &x,
                weight,
                dy: &dy,
                eps,
            })
            .unwrap();
            assert_eq!(grads.len(), 3);
            let dx = numeric_vjp(|x| ln(x, weight, Some(&b)), &x, &dy);
            assert_close(&grads[0], &dx, FD_TOL);
            // Without a weight, the parameter gradients are those at weight 1.
            let at = weight
                .cloned()
                .unwrap_or_else(|| Tensor::full(vec![5], 1.0));
            let dw = numeric_vjp(|w| ln(&x, Some(w), Some(&b)), &at, &dy);
            assert_close(&grads[1], &dw, FD_TOL);
            let db = numeric_vjp(|b| ln(&x, Some(&at), Some(b)), &b, &dy);
            assert_close(&grads[2], &db, FD_TOL);
        }
    }

    #[test]
    fn rms_norm_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(4);
        let x = random(&mut rng, &[4, 6]);
        let w = random(&mut rng, &[6]);
        let dy = random(&mut rng, &[4, 6]);
        let eps = 1e-3;
        let rms = |x: &Tensor, w: Option<&Tensor>| eval1(Op::RmsNorm { x, weight: w, eps });
        for weight in [Some(&w), None] {
            let grads = eval_op(&Op::RmsNormGrad {
                x: &x,
                weight,
                dy: &dy,
                eps,
            })
            .unwrap();
            assert_eq!(grads.len(), 2);
            assert_close(&grads[0], &numeric_vjp(|x| rms(x, weight), &x, &dy), FD_TOL);
            let at = weight
                .cloned()
                .unwrap_or_else(|| Tensor::full(vec![6], 1.0));
            assert_close(
                &grads[1],
                &numeric_vjp(|w| rms(&x, Some(w)), &at, &dy),
                FD_TOL,
            );
        }
    }

    #[test]
    fn softmax_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(5);
        let x = random(&mut rng, &[2, 3, 4]);
        let dy = random(&mut rng, &[2, 3, 4]);
        for causal in [false, true] {
            let sm = |x: &Tensor| eval1(Op::Softmax { x, causal });
            let y = sm(&x);
            let analytic = eval1(Op::SoftmaxGrad { y: &y, dy: &dy });
            assert_close(&analytic, &numeric_vjp(sm, &x, &dy), FD_TOL);
        }
    }

    #[test]
    fn embedding_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(6);
        let table = random(&mut rng, &[5, 3]);
        // Repeated ids: their rows accumulate.
        let ids = t(&[2, 3], &[1., 4., 1., 0., 1., 4.]);
        let dy = random(&mut rng, &[2, 3, 3]);
        let analytic = eval1(Op::EmbeddingGrad {
            table: &table,
            ids: &ids,
            dy: &dy,
        });
        let numeric = numeric_vjp(
            |tb| {
                eval1(Op::Embedding {
                    table: tb,
                    ids: &ids,
                })
            },
            &table,
            &dy,
        );
        assert_close(&analytic, &numeric, FD_TOL);
        assert!(analytic.data[2 * 3..3 * 3].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn cross_entropy_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(8);
        let logits = random(&mut rng, &[2, 3, 6]);
        let targets = Tensor::from_fn(vec![2, 3], |_| rng.usize(0..4) as f64);
        let dloss = Tensor::scalar(1.3);
        for shift in [false, true] {
            for classes in [None, Some(4)] {
                let classes = classes.map(d);
                let analytic = eval1(Op::CrossEntropyGrad {
                    logits: &logits,
                    targets: &targets,
                    dloss: &dloss,
                    shift,
                    classes: classes.clone(),
                });
                let numeric = numeric_vjp(
                    |l| {
                        eval1(Op::CrossEntropy {
                            logits: l,
                            targets: &targets,
                            shift,
                            classes: classes.clone(),
                        })
                    },
                    &logits,
                    &dloss,
                );
                assert_close(&analytic, &numeric, FD_TOL);
            }
        }
    }

    #[test]
    fn dropout_grad_matches_finite_differences() {
        let mut rng = fastrand::Rng::with_seed(9);
        let x = random(&mut rng, &[4, 5]);
        let dy = random(&mut rng, &[4, 5]);
        let y = eval1(Op::Dropout { x: &x, p: 0.3 });
        let analytic = eval1(Op::DropoutGrad {
            dy: &dy,
            forward: &y,
            p: 0.3,
        });
        let numeric = numeric_vjp(|x| eval1(Op::Dropout { x, p: 0.3 }), &x, &dy);
        assert_close(&analytic, &numeric, FD_TOL);
    }

    #[test]
    fn sum_to_is_broadcastings_transpose() {
        let mut rng = fastrand::Rng::with_seed(10);
        let small = random(&mut rng, &[3, 1]);
        let big = random(&mut rng, &[2, 3, 4]);
        let zeros = Tensor::zeros(vec![2, 3, 4]);
        let broadcast = eval1(Op::Add(&small, &zeros));
        let summed = eval1(Op::SumTo {
            x: &big,
            shape: vec![d(3), d(1)],
        });
        assert!((dot(&broadcast, &big) - dot(&small, &summed)).abs() < 1e-12);
    }

    #[test]
    fn eval_graph_runs_in_order_and_checks_feeds() {
        let f32 = |s: &[u64]| TensorType::new(DType::F32, Shape::from_sizes(s));
        let mut g = Graph::new("tiny");
        let x = g.add_input("x", f32(&[2, 3]));
        let w = g.add_param("w", f32(&[3, 4]), Init::Zeros, None);
        let h = g
            .add_node(
                "h",
                Op::MatMul {
                    a: x,
                    b: w,
                    transpose_a: false,
                    transpose_b: false,
                },
                vec!["h".into()],
                None,
            )
            .unwrap()[0];
        let y = g
            .add_node("y", Op::Gelu(h), vec!["y".into()], None)
            .unwrap()[0];
        let mut rng = fastrand::Rng::with_seed(12);
        let (xv, wv) = (random(&mut rng, &[2, 3]), random(&mut rng, &[3, 4]));
        let mut feed = HashMap::from([(x, xv.clone())]);
        let missing = eval_graph(&g, &feed);
        assert!(
            matches!(&missing, Err(EvalError::MissingFeed { name, .. }) if name == "w"),
            "{missing:?}"
        );
        feed.insert(w, random(&mut rng, &[4, 3]));
        assert!(matches!(
            eval_graph(&g, &feed),
            Err(EvalError::ShapeMismatch { .. })
        ));
        feed.insert(w, wv.clone());
        let env = eval_graph(&g, &feed).unwrap();
        let hv = eval1(Op::MatMul {
            a: &xv,
            b: &wv,
            transpose_a: false,
            transpose_b: false,
        });
        assert_eq!(env[&y], eval1(Op::Gelu(&hv)));
        assert_eq!(env.len(), 4);

        // An op failing inside the graph names its node.
        let mut g2 = Graph::new("ids");
        let table = g2.add_param("wte", f32(&[3, 2]), Init::Zeros, None);
        let ids = g2.add_input("ids", TensorType::new(DType::I64, Shape::from_sizes(&[2])));
        g2.add_node(
            "emb",
            Op::Embedding { table, ids },
            vec!["emb".into()],
            None,
        )
        .unwrap();
        let feed = HashMap::from([
            (table, Tensor::zeros(vec![3, 2])),
            (ids, t(&[2], &[0., 3.])),
        ]);
        let err = eval_graph(&g2, &feed).unwrap_err();
        assert!(
            matches!(&err, EvalError::Node { node, .. } if node == "emb"),
            "{err}"
        );
        assert!(err.to_string().contains("0..3"), "{err}");
    }
}
