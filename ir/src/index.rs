//! Shape and index arithmetic shared by every evaluator of the op set: the `f64` reference
//! evaluator ([`crate::reference`]) and the runtimes' kernels.
//!
//! Everything here is independent of the element type: it reads shapes (row-major, outermost
//! first, `usize` sizes) and attributes, checks that an op is defined on them, and computes the
//! output shapes and the views the loops run over. A check that fails returns its message as
//! `Err(String)`; the caller names the op and makes it its own error type (the reference's
//! `EvalError::Invalid`, a kernel's `KernelError::Invalid`). Nothing here runs per element
//! except [`integer`] (per id or target) and [`broadcast_offset`] (the reference's loops).

use crate::dtype::DType;
use crate::op::{Factor, RopeScaling};
use crate::shape::Dim;
use std::ops::Range;

/// The number of elements of `shape`, or `None` when it overflows `usize`.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &s| n.checked_mul(s))
}

/// Whether `len` elements fill `shape` exactly.
pub fn check_len(shape: &[usize], len: usize) -> Result<(), String> {
    match numel(shape) {
        Some(n) if n == len => Ok(()),
        _ => Err(format!("a tensor of shape {shape:?} holds {len} elements")),
    }
}

/// A dimension attribute as a size in memory.
pub fn dim(d: &Dim) -> Result<usize, String> {
    usize::try_from(d.size).map_err(|_| format!("dimension {d} does not fit in memory"))
}

/// Dimension attributes as sizes in memory.
pub fn dims(ds: &[Dim]) -> Result<Vec<usize>, String> {
    ds.iter().map(dim).collect()
}

/// An axis attribute (negative: counted from the end) as an index into `shape`.
pub fn axis(shape: &[usize], axis: i64) -> Result<usize, String> {
    let rank = shape.len() as i64;
    let a = if axis < 0 { axis + rank } else { axis };
    if (0..rank).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for shape {shape:?}"))
    }
}

/// That the operand `what` of shape `shape` has at least `rank` axes.
pub fn min_rank(what: &str, shape: &[usize], rank: usize) -> Result<(), String> {
    if shape.len() >= rank {
        Ok(())
    } else {
        Err(format!(
            "{what} must have rank at least {rank}, found {shape:?}"
        ))
    }
}

/// That the operand `what` has shape `expected`.
pub fn same_shape(what: &str, expected: &[usize], found: &[usize]) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!("{what} has shape {found:?}, expected {expected:?}"))
    }
}

/// An integer index held in a float, if it is one in `0..bound` (an `f32` converts exactly).
#[inline]
pub fn integer(value: f64, bound: usize) -> Option<usize> {
    (value.fract() == 0.0 && value >= 0.0 && value < bound as f64).then_some(value as usize)
}

/// `(outer, n, inner)`: a shape viewed as `[outer, n, inner]` around axis `a`.
pub fn around(shape: &[usize], a: usize) -> (usize, usize, usize) {
    (
        shape[..a].iter().product(),
        shape[a],
        shape[a + 1..].iter().product(),
    )
}

/// `(rows, n)`: a shape as rows of its last axis (a scalar is one row of one element).
pub fn rows(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&n, outer)) => (outer.iter().product(), n),
        None => (1, 1),
    }
}

// ---------------------------------------------------------------------------------------------
// Broadcasting

/// NumPy broadcasting of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let pick = |s: &[usize], i: usize| {
        let offset = rank - s.len();
        if i < offset {
            1
        } else {
            s[i - offset]
        }
    };
    (0..rank)
        .map(|i| match (pick(a, i), pick(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// The output shape of an elementwise binary op: its operands' shapes broadcast.
pub fn binary(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    broadcast_shape(a, b).ok_or_else(|| format!("shapes {a:?} and {b:?} do not broadcast"))
}

/// The flat offset of `index` (a multi-index of the broadcast shape) in a tensor of `shape`
/// broadcast to it (NumPy rules: aligned from the right, size-1 dimensions repeat).
#[inline]
pub fn broadcast_offset(index: &[usize], shape: &[usize]) -> usize {
    let skip = index.len() - shape.len();
    shape
        .iter()
        .zip(&index[skip..])
        .fold(0, |flat, (&s, &i)| flat * s + if s == 1 { 0 } else { i })
}

/// That `Expand` of `x` to `shape` is defined: `x` broadcasts to exactly `shape`.
pub fn expand(x: &[usize], shape: &[usize]) -> Result<(), String> {
    if broadcast_shape(x, shape).as_deref() == Some(shape) {
        Ok(())
    } else {
        Err(format!("{x:?} does not broadcast to {shape:?}"))
    }
}

/// That `SumTo` of `x` down to `shape` is defined: `shape` broadcasts to `x`.
pub fn sum_to(x: &[usize], shape: &[usize]) -> Result<(), String> {
    let ok = shape.len() <= x.len()
        && shape
            .iter()
            .zip(&x[x.len() - shape.len()..])
            .all(|(&t, &s)| t == s || t == 1);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the target {shape:?} does not broadcast to the input {x:?}"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Layout ops

/// The output shape of `Reshape` of `x` to `to`.
pub fn reshape(x: &[usize], to: &[Dim]) -> Result<Vec<usize>, String> {
    let shape = dims(to)?;
    if numel(&shape) != numel(x) {
        return Err(format!("cannot reshape {x:?} to {shape:?}"));
    }
    Ok(shape)
}

/// The output shape of `Transpose` of `x` by `perm` (output axis `i` is input axis `perm[i]`).
pub fn transpose(x: &[usize], perm: &[usize]) -> Result<Vec<usize>, String> {
    if !is_permutation(perm, x.len()) {
        return Err(format!(
            "{perm:?} is not a permutation of the axes of {x:?}"
        ));
    }
    Ok(perm.iter().map(|&p| x[p]).collect())
}

/// Whether `perm` lists each of `0..rank` exactly once.
pub fn is_permutation(perm: &[usize], rank: usize) -> bool {
    let mut seen = vec![false; rank];
    perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true))
}

/// `Slice` of `x`: `(axis, start, end)`, the range checked to lie in the axis.
pub fn slice(
    x: &[usize],
    axis: i64,
    start: &Dim,
    end: &Dim,
) -> Result<(usize, usize, usize), String> {
    let a = self::axis(x, axis)?;
    let (start, end) = (dim(start)?, dim(end)?);
    if start > end || end > x[a] {
        return Err(format!(
            "slice {start}..{end} is out of range for axis {a} of {x:?}"
        ));
    }
    Ok((a, start, end))
}

/// `Split` of `x`: `(axis, the parts' ranges along it)`, the sizes checked to be some and to add
/// up to the axis.
pub fn split(x: &[usize], axis: i64, sizes: &[Dim]) -> Result<(usize, Vec<Range<usize>>), String> {
    let a = self::axis(x, axis)?;
    let sizes = dims(sizes)?;
    let total = sizes.iter().try_fold(0usize, |s, &n| s.checked_add(n));
    if sizes.is_empty() || total != Some(x[a]) {
        return Err(format!(
            "sizes {sizes:?} do not add up to axis {a} of {x:?}"
        ));
    }
    let mut start = 0;
    let parts = sizes
        .iter()
        .map(|&n| {
            start += n;
            start - n..start
        })
        .collect();
    Ok((a, parts))
}

/// `Concat` of tensors of shapes `xs`: `(axis, output shape)`, every input checked to have the
/// first one's shape but along the axis.
pub fn concat(xs: &[&[usize]], axis: i64) -> Result<(usize, Vec<usize>), String> {
    let first = xs.first().ok_or("Concat needs at least one input")?;
    let a = self::axis(first, axis)?;
    let mut shape = first.to_vec();
    shape[a] = 0;
    for x in xs {
        let mut expected = first.to_vec();
        expected[a] = x.get(a).copied().unwrap_or(0);
        same_shape("a concatenated input", &expected, x)?;
        shape[a] = shape[a]
            .checked_add(x[a])
            .ok_or("the joined axis overflows")?;
    }
    Ok((a, shape))
}

/// `Pad` of `x`: `(axis, before, after)` (the padded size is the caller's to check).
pub fn pad(
    x: &[usize],
    axis: i64,
    before: &Dim,
    after: &Dim,
) -> Result<(usize, usize, usize), String> {
    Ok((self::axis(x, axis)?, dim(before)?, dim(after)?))
}

// ---------------------------------------------------------------------------------------------
// Compute ops

/// `Scale` by `factor`: its value (an `InvSqrt` of a zero dimension is undefined).
pub fn scale(factor: &Factor<Dim>) -> Result<f64, String> {
    match factor {
        Factor::InvSqrt(d) if d.size == 0 => Err("InvSqrt of a zero dimension".into()),
        _ => Ok(factor.value()),
    }
}

/// That `Fill` with `value` of `dtype` is defined: a finite value (`stored_finite`: still finite
/// in the evaluator's element type), an integer for an integer dtype.
pub fn fill(value: f64, dtype: DType, stored_finite: bool) -> Result<(), String> {
    if !value.is_finite() || !stored_finite || (dtype.is_int() && value.fract() != 0.0) {
        return Err(format!("{value} is not a finite {dtype} value"));
    }
    Ok(())
}

/// The shapes of a batched `MatMul` (checked): `a · b` after the optional transposes of the
/// last two axes, batch axes broadcasting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatMul<'a> {
    /// Rows of the product.
    pub m: usize,
    /// Columns of the product.
    pub n: usize,
    /// The contracted size.
    pub k: usize,
    /// The last two axes of `a` as stored (before the transpose).
    pub a_rows: usize,
    /// See [`MatMul::a_rows`].
    pub a_cols: usize,
    /// The last two axes of `b` as stored (before the transpose).
    pub b_rows: usize,
    /// See [`MatMul::b_rows`].
    pub b_cols: usize,
    /// `a`'s batch axes.
    pub batch_a: &'a [usize],
    /// `b`'s batch axes.
    pub batch_b: &'a [usize],
    /// The product's batch axes: `batch_a` and `batch_b` broadcast.
    pub batch: Vec<usize>,
}

impl MatMul<'_> {
    /// The product's shape: `[batch.., m, n]`.
    pub fn out_shape(&self) -> Vec<usize> {
        let mut shape = self.batch.clone();
        shape.extend([self.m, self.n]);
        shape
    }
}

/// The shapes of `MatMul` of `a` and `b` with transposes `ta` and `tb`.
pub fn matmul<'a>(
    a: &'a [usize],
    b: &'a [usize],
    ta: bool,
    tb: bool,
) -> Result<MatMul<'a>, String> {
    min_rank("a", a, 2)?;
    min_rank("b", b, 2)?;
    let (ra, rb) = (a.len(), b.len());
    let (a_rows, a_cols) = (a[ra - 2], a[ra - 1]);
    let (b_rows, b_cols) = (b[rb - 2], b[rb - 1]);
    let (m, k) = if ta {
        (a_cols, a_rows)
    } else {
        (a_rows, a_cols)
    };
    let (kb, n) = if tb {
        (b_cols, b_rows)
    } else {
        (b_rows, b_cols)
    };
    if k != kb {
        return Err(format!(
            "inner dimensions differ: {a:?} · {b:?} contracts {k} with {kb}"
        ));
    }
    let (batch_a, batch_b) = (&a[..ra - 2], &b[..rb - 2]);
    let batch = broadcast_shape(batch_a, batch_b)
        .ok_or_else(|| format!("batch axes of {a:?} and {b:?} do not broadcast"))?;
    Ok(MatMul {
        m,
        n,
        k,
        a_rows,
        a_cols,
        b_rows,
        b_cols,
        batch_a,
        batch_b,
        batch,
    })
}

/// `LayerNorm`/`RmsNorm` and their gradients on `x` (checked with the gradient `dy`, the
/// `weight` and the `bias` where given): `(rows, n)` of `x`'s last axis.
pub fn norm(
    x: &[usize],
    eps: f64,
    dy: Option<&[usize]>,
    weight: Option<&[usize]>,
    bias: Option<&[usize]>,
) -> Result<(usize, usize), String> {
    min_rank("the normalized tensor", x, 1)?;
    if !(eps.is_finite() && eps > 0.0) {
        return Err(format!("eps {eps} must be positive"));
    }
    if let Some(dy) = dy {
        same_shape("the gradient", x, dy)?;
    }
    let (outer, n) = rows(x);
    for (what, p) in [("the weight", weight), ("the bias", bias)] {
        if let Some(p) = p {
            same_shape(what, &[n], p)?;
        }
    }
    Ok((outer, n))
}

/// `Softmax` of `x` over its last axis: `(rows, keys, queries)`; a causal softmax needs
/// queries (axis −2) no more than keys, otherwise `queries` is 1.
pub fn softmax(x: &[usize], causal: bool) -> Result<(usize, usize, usize), String> {
    min_rank("the input", x, if causal { 2 } else { 1 })?;
    let (outer, keys) = rows(x);
    let queries = if causal { x[x.len() - 2] } else { 1 };
    if causal && queries > keys {
        return Err(format!(
            "a causal softmax needs at least as many keys as queries, found {x:?}"
        ));
    }
    Ok((outer, keys, queries))
}

/// `Rotary` of `x` (`[..., seq, heads, head_dim]`) with `base`: `(seq, heads, head_dim)`.
pub fn rotary(x: &[usize], base: f64) -> Result<(usize, usize, usize), String> {
    min_rank("the input ([..., seq, heads, head_dim])", x, 3)?;
    let r = x.len();
    let (seq, heads, head_dim) = (x[r - 3], x[r - 2], x[r - 1]);
    if !head_dim.is_multiple_of(2) {
        return Err(format!("head_dim {head_dim} is odd"));
    }
    if !(base.is_finite() && base > 0.0) {
        return Err(format!("base {base} must be positive"));
    }
    Ok((seq, heads, head_dim))
}

/// The angle per position of rotary pair `i` (of `head_dim / 2`): `base^(−2i / head_dim)`,
/// rescaled as Llama 3.1 does when `scaling` is given (Hugging Face's
/// `_compute_llama3_parameters`).
pub fn rotary_frequency(
    i: usize,
    head_dim: usize,
    base: f64,
    scaling: Option<&RopeScaling>,
) -> f64 {
    let freq = base.powf(-2.0 * i as f64 / head_dim as f64);
    let Some(s) = scaling else {
        return freq;
    };
    let context = s.original_max_position as f64;
    let wavelength = 2.0 * std::f64::consts::PI / freq;
    if wavelength < context / s.high_freq_factor {
        freq
    } else if wavelength > context / s.low_freq_factor {
        freq / s.factor
    } else {
        let smooth =
            (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// A rotary rescaling's figures are usable: factors positive, thresholds ordered.
pub fn rope_scaling(s: &RopeScaling) -> Result<(), String> {
    let ok = s.factor > 0.0
        && s.low_freq_factor > 0.0
        && s.high_freq_factor > s.low_freq_factor
        && s.original_max_position > 0;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "rope scaling {s:?}: factor and low_freq_factor must be positive, high_freq_factor \
             above low_freq_factor, original_max_position positive"
        ))
    }
}

/// `Dropout` with drop probability `p`: the scale `1/(1 − p)` of kept elements.
pub fn dropout_scale(p: f64) -> Result<f64, String> {
    if (0.0..1.0).contains(&p) {
        Ok(1.0 / (1.0 - p))
    } else {
        Err(format!("dropout probability {p} must be in [0, 1)"))
    }
}

/// An embedding table's `(rows, width)`.
pub fn embedding_table(table: &[usize]) -> Result<(usize, usize), String> {
    match *table {
        [rows, width] => Ok((rows, width)),
        _ => Err(format!("the table must be [rows, width], found {table:?}")),
    }
}

/// The real classes of a cross-entropy over `logits` (`[..., vocab]`, rank checked by the
/// caller): `classes`, or the whole vocabulary, and at least one and at most the vocabulary.
pub fn ce_classes(logits: &[usize], classes: Option<&Dim>) -> Result<usize, String> {
    let vocab = logits[logits.len() - 1];
    let real = match classes {
        Some(c) => dim(c)?,
        None => vocab,
    };
    if real == 0 || real > vocab {
        return Err(format!(
            "{real} real classes do not fit the logits {logits:?}"
        ));
    }
    Ok(real)
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1usize;
    for (st, &n) in strides.iter_mut().zip(shape).rev() {
        *st = s;
        // Wrapping: the stride past the first axis is never used, and may be past usize
        // for a shape whose element count is checked separately.
        s = s.wrapping_mul(n);
    }
    strides
}

/// The strides, one per axis of `out`, at which a contiguous tensor of `shape` is read when
/// broadcast to `out` (NumPy rules; `shape` must broadcast to `out`): 0 along repeated axes.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(shape);
    let skip = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < skip || shape[i - skip] == 1 {
                0
            } else {
                own[i - skip]
            }
        })
        .collect()
}
