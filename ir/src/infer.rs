//! Shape and dtype inference: what each op produces from what it is given, or why it cannot.
//!
//! [`infer`] works on an op whose inputs are already types (`Op<TensorType>`), so it needs no graph
//! and is tested on its own; the graph builder and the verifier both call it. Errors are
//! structured ([`OpError`]) and carry the shapes involved; callers add the node's name and, for a
//! model file, its location.

use crate::op::{Factor, Op};
use crate::shape::{Dim, Shape, TensorType};
use crate::DType;
use thiserror::Error;

/// Why an op cannot be applied to the types it was given.
#[derive(Clone, Debug, PartialEq, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum OpError {
    /// An input has the wrong dtype.
    #[error("{what} must be {expected}, found {found}")]
    Dtype {
        what: &'static str,
        expected: &'static str,
        found: DType,
    },
    /// Two inputs that must agree in dtype do not.
    #[error("dtypes differ: {lhs} and {rhs}")]
    DtypeMismatch { lhs: DType, rhs: DType },
    /// An input has the wrong number of dimensions.
    #[error("{what} must have rank {expected}, found {shape}")]
    Rank {
        what: &'static str,
        expected: &'static str,
        shape: Shape,
    },
    /// Two shapes cannot be broadcast together.
    #[error("shapes {lhs} and {rhs} do not broadcast")]
    Broadcast { lhs: Shape, rhs: Shape },
    /// A matmul's contracted dimensions differ.
    #[error("matmul inner dimensions differ: {a} · {b} contracts {ka} with {kb}")]
    MatMulInner {
        a: Shape,
        b: Shape,
        ka: Dim,
        kb: Dim,
    },
    /// An input has the wrong shape.
    #[error("{what} has shape {found}, expected {expected}")]
    ShapeMismatch {
        what: &'static str,
        expected: Shape,
        found: Shape,
    },
    /// A reshape that changes the number of elements.
    #[error("cannot reshape {from} ({from_elems} elements) to {to} ({to_elems} elements)")]
    Reshape {
        from: Shape,
        to: Shape,
        from_elems: u64,
        to_elems: u64,
    },
    /// An axis outside the input's rank.
    #[error("axis {axis} is out of range for {shape} (rank {rank})", rank = shape.rank())]
    Axis { axis: i64, shape: Shape },
    /// A transpose whose `perm` is not a permutation.
    #[error("{perm:?} is not a permutation of the {rank} axes of the input")]
    Perm { perm: Vec<usize>, rank: usize },
    /// A slice outside its axis.
    #[error("slice {start}..{end} is out of range for dimension {dim} of {shape}")]
    Slice {
        start: u64,
        end: u64,
        dim: i64,
        shape: Shape,
    },
    /// Split sizes that do not add up to the axis.
    #[error(
        "split sizes {sizes:?} add up to {sum}, but dimension {dim} of {shape} has size {size}"
    )]
    Split {
        sizes: Vec<u64>,
        sum: u64,
        dim: i64,
        shape: Shape,
        size: u64,
    },
    /// A dimension that must divide evenly does not.
    #[error("dimension {dim} is not divisible by {parts}")]
    Indivisible { dim: Dim, parts: u64 },
    /// An attribute outside its valid range.
    #[error("{0}")]
    Attribute(String),
    /// A shape whose element count does not fit in 64 bits.
    #[error("shape {0} has more elements than fit in 64 bits")]
    Overflow(Shape),
}

fn numel(shape: &Shape) -> Result<u64, OpError> {
    shape
        .numel()
        .ok_or_else(|| OpError::Overflow(shape.clone()))
}

fn need_float(what: &'static str, t: &TensorType) -> Result<(), OpError> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(OpError::Dtype {
            what,
            expected: "a float type (f32, bf16, f16)",
            found: t.dtype,
        })
    }
}

fn need_int(what: &'static str, t: &TensorType) -> Result<(), OpError> {
    if t.dtype.is_int() {
        Ok(())
    } else {
        Err(OpError::Dtype {
            what,
            expected: "an integer type (i32, i64)",
            found: t.dtype,
        })
    }
}

fn same_dtype(a: &TensorType, b: &TensorType) -> Result<DType, OpError> {
    if a.dtype == b.dtype {
        Ok(a.dtype)
    } else {
        Err(OpError::DtypeMismatch {
            lhs: a.dtype,
            rhs: b.dtype,
        })
    }
}

fn axis_of(shape: &Shape, axis: i64) -> Result<usize, OpError> {
    shape.axis(axis).ok_or_else(|| OpError::Axis {
        axis,
        shape: shape.clone(),
    })
}

fn min_rank(
    what: &'static str,
    expected: &'static str,
    t: &TensorType,
    rank: usize,
) -> Result<(), OpError> {
    if t.shape.rank() >= rank {
        Ok(())
    } else {
        Err(OpError::Rank {
            what,
            expected,
            shape: t.shape.clone(),
        })
    }
}

/// NumPy broadcasting: dimensions aligned from the right must be equal or 1.
pub fn broadcast(lhs: &Shape, rhs: &Shape) -> Result<Shape, OpError> {
    let rank = lhs.rank().max(rhs.rank());
    let pick = |s: &Shape, i: usize| -> Dim {
        let offset = rank - s.rank();
        if i < offset {
            Dim::new(1)
        } else {
            s.0[i - offset].clone()
        }
    };
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let (a, b) = (pick(lhs, i), pick(rhs, i));
        dims.push(if a.size == b.size {
            if a.name.is_some() {
                a
            } else {
                b
            }
        } else if a.size == 1 {
            b
        } else if b.size == 1 {
            a
        } else {
            return Err(OpError::Broadcast {
                lhs: lhs.clone(),
                rhs: rhs.clone(),
            });
        });
    }
    Ok(Shape(dims))
}

fn norm_param(what: &'static str, p: Option<&TensorType>, x: &TensorType) -> Result<(), OpError> {
    let Some(p) = p else { return Ok(()) };
    let last = x.shape.last().cloned().unwrap_or(Dim::new(1));
    let expected = Shape(vec![last]);
    if p.shape != expected {
        return Err(OpError::ShapeMismatch {
            what,
            expected,
            found: p.shape.clone(),
        });
    }
    same_dtype(x, p).map(|_| ())
}

fn one(t: TensorType) -> Result<Vec<TensorType>, OpError> {
    Ok(vec![t])
}

/// The types an op produces (one per output), or why the op is ill-typed.
pub fn infer(op: &Op<TensorType, Dim>) -> Result<Vec<TensorType>, OpError> {
    match op {
        Op::Embedding { table, ids } => {
            need_float("the embedding table", table)?;
            need_int("the embedding ids", ids)?;
            if table.shape.rank() != 2 {
                return Err(OpError::Rank {
                    what: "the embedding table",
                    expected: "2 ([rows, width])",
                    shape: table.shape.clone(),
                });
            }
            let mut dims = ids.shape.0.clone();
            dims.push(table.shape.0[1].clone());
            let out = Shape(dims);
            numel(&out)?;
            one(TensorType::new(table.dtype, out))
        }
        Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        } => {
            need_float("matmul's a", a)?;
            need_float("matmul's b", b)?;
            let dtype = same_dtype(a, b)?;
            min_rank("matmul's a", "at least 2", a, 2)?;
            min_rank("matmul's b", "at least 2", b, 2)?;
            let (ra, rb) = (a.shape.rank(), b.shape.rank());
            let (m, ka) = if *transpose_a {
                (&a.shape.0[ra - 1], &a.shape.0[ra - 2])
            } else {
                (&a.shape.0[ra - 2], &a.shape.0[ra - 1])
            };
            let (kb, n) = if *transpose_b {
                (&b.shape.0[rb - 1], &b.shape.0[rb - 2])
            } else {
                (&b.shape.0[rb - 2], &b.shape.0[rb - 1])
            };
            if ka.size != kb.size {
                return Err(OpError::MatMulInner {
                    a: a.shape.clone(),
                    b: b.shape.clone(),
                    ka: ka.clone(),
                    kb: kb.clone(),
                });
            }
            let batch_a = Shape(a.shape.0[..ra - 2].to_vec());
            let batch_b = Shape(b.shape.0[..rb - 2].to_vec());
            let mut out = broadcast(&batch_a, &batch_b).map_err(|_| OpError::Broadcast {
                lhs: a.shape.clone(),
                rhs: b.shape.clone(),
            })?;
            out.0.push(m.clone());
            out.0.push(n.clone());
            numel(&out)?;
            one(TensorType::new(dtype, out))
        }
        Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Div(a, b) => {
            need_float("an arithmetic operand", a)?;
            let dtype = same_dtype(a, b)?;
            let out = broadcast(&a.shape, &b.shape)?;
            numel(&out)?;
            one(TensorType::new(dtype, out))
        }
        Op::Scale { x, factor } => {
            need_float("the scaled tensor", x)?;
            if let Factor::InvSqrt(d) = factor {
                if d.size == 0 {
                    return Err(OpError::Attribute("InvSqrt of a zero dimension".into()));
                }
            }
            if let Factor::Const(c) = factor {
                if !c.is_finite() {
                    return Err(OpError::Attribute(format!(
                        "scale factor {c} is not finite"
                    )));
                }
            }
            one(x.clone())
        }
        Op::Gelu(x) | Op::GeluTanh(x) | Op::Silu(x) | Op::Relu(x) => {
            need_float("an activation's input", x)?;
            one(x.clone())
        }
        Op::LayerNorm {
            x,
            weight,
            bias,
            eps,
        } => {
            need_float("the normalized tensor", x)?;
            min_rank("the normalized tensor", "at least 1", x, 1)?;
            positive_eps(*eps)?;
            norm_param("the norm weight", weight.as_ref(), x)?;
            norm_param("the norm bias", bias.as_ref(), x)?;
            one(x.clone())
        }
        Op::RmsNorm { x, weight, eps } => {
            need_float("the normalized tensor", x)?;
            min_rank("the normalized tensor", "at least 1", x, 1)?;
            positive_eps(*eps)?;
            norm_param("the norm weight", weight.as_ref(), x)?;
            one(x.clone())
        }
        Op::Softmax { x, causal } => {
            need_float("softmax's input", x)?;
            if *causal {
                min_rank(
                    "a causal softmax's input",
                    "at least 2 ([..., queries, keys])",
                    x,
                    2,
                )?;
                let r = x.shape.rank();
                if x.shape.size(r - 2) > x.shape.size(r - 1) {
                    return Err(OpError::Attribute(format!(
                        "a causal softmax needs at least as many keys as queries, found {}",
                        x.shape
                    )));
                }
            } else {
                min_rank("softmax's input", "at least 1", x, 1)?;
            }
            one(x.clone())
        }
        Op::Reshape { x, shape } => {
            let to = Shape(shape.clone());
            let (from_elems, to_elems) = (numel(&x.shape)?, numel(&to)?);
            if from_elems != to_elems {
                return Err(OpError::Reshape {
                    from: x.shape.clone(),
                    to,
                    from_elems,
                    to_elems,
                });
            }
            one(TensorType::new(x.dtype, to))
        }
        Op::Transpose { x, perm } => {
            let rank = x.shape.rank();
            if !crate::index::is_permutation(perm, rank) {
                return Err(OpError::Perm {
                    perm: perm.clone(),
                    rank,
                });
            }
            let dims = perm.iter().map(|&p| x.shape.0[p].clone()).collect();
            one(TensorType::new(x.dtype, Shape(dims)))
        }
        Op::Slice {
            x,
            dim: axis,
            start,
            end,
        } => {
            let a = axis_of(&x.shape, *axis)?;
            if start.size > end.size || end.size > x.shape.size(a) {
                return Err(OpError::Slice {
                    start: start.size,
                    end: end.size,
                    dim: *axis,
                    shape: x.shape.clone(),
                });
            }
            let mut out = x.shape.clone();
            out.0[a] = if start.size == 0 {
                end.clone()
            } else {
                Dim::new(end.size - start.size)
            };
            one(TensorType::new(x.dtype, out))
        }
        Op::Split {
            x,
            dim: axis,
            sizes,
        } => {
            let a = axis_of(&x.shape, *axis)?;
            let sum = sizes.iter().try_fold(0u64, |s, d| s.checked_add(d.size));
            let size = x.shape.size(a);
            if sizes.is_empty() || sum != Some(size) {
                return Err(OpError::Split {
                    sizes: sizes.iter().map(|d| d.size).collect(),
                    sum: sum.unwrap_or(u64::MAX),
                    dim: *axis,
                    shape: x.shape.clone(),
                    size,
                });
            }
            Ok(sizes
                .iter()
                .map(|d| {
                    let mut out = x.shape.clone();
                    out.0[a] = d.clone();
                    TensorType::new(x.dtype, out)
                })
                .collect())
        }
        Op::Concat { xs, dim: axis } => {
            let first = xs
                .first()
                .ok_or_else(|| OpError::Attribute("Concat needs at least one input".into()))?;
            let a = axis_of(&first.shape, *axis)?;
            let mut total = 0u64;
            for x in xs {
                same_dtype(first, x)?;
                let mut expected = first.shape.clone();
                if x.shape.rank() == expected.rank() {
                    expected.0[a] = x.shape.0[a].clone();
                }
                if x.shape != expected {
                    return Err(OpError::ShapeMismatch {
                        what: "a concatenated input",
                        expected,
                        found: x.shape.clone(),
                    });
                }
                total = total
                    .checked_add(x.shape.size(a))
                    .ok_or_else(|| OpError::Overflow(x.shape.clone()))?;
            }
            let mut out = first.shape.clone();
            out.0[a] = Dim::new(total);
            numel(&out)?;
            one(TensorType::new(first.dtype, out))
        }
        Op::Rotary { x, base, .. } => {
            need_float("rotary's input", x)?;
            min_rank(
                "rotary's input",
                "at least 3 ([..., seq, heads, head_dim])",
                x,
                3,
            )?;
            let head_dim = x.shape.last().cloned().unwrap_or(Dim::new(0));
            if head_dim.size % 2 != 0 {
                return Err(OpError::Indivisible {
                    dim: head_dim,
                    parts: 2,
                });
            }
            if !(base.is_finite() && *base > 0.0) {
                return Err(OpError::Attribute(format!(
                    "rotary base {base} must be positive"
                )));
            }
            one(x.clone())
        }
        Op::Dropout { x, p } => {
            need_float("dropout's input", x)?;
            if !(0.0..1.0).contains(p) {
                return Err(OpError::Attribute(format!(
                    "dropout probability {p} must be in [0, 1)"
                )));
            }
            one(x.clone())
        }
        Op::CrossEntropy {
            logits,
            targets,
            shift,
            classes,
        } => {
            cross_entropy_inputs(logits, targets, *shift, classes.as_ref())?;
            one(TensorType::new(logits.dtype, Shape::scalar()))
        }
        Op::CrossEntropyGrad {
            logits,
            targets,
            dloss,
            shift,
            classes,
        } => {
            cross_entropy_inputs(logits, targets, *shift, classes.as_ref())?;
            same_dtype(logits, dloss)?;
            if dloss.shape.rank() != 0 {
                return Err(OpError::Rank {
                    what: "the loss gradient",
                    expected: "0 (a scalar)",
                    shape: dloss.shape.clone(),
                });
            }
            one(logits.clone())
        }
        Op::LocalSlice { x, dim, parts, .. } => {
            let a = axis_of(&x.shape, *dim)?;
            let d = &x.shape.0[a];
            if *parts == 0 || d.size % parts != 0 {
                return Err(OpError::Indivisible {
                    dim: d.clone(),
                    parts: *parts,
                });
            }
            let mut out = x.shape.clone();
            out.0[a] = Dim::new(d.size / parts);
            one(TensorType::new(x.dtype, out))
        }
        Op::SumTo { x, shape } => {
            need_float("a summed tensor", x)?;
            let to = Shape(shape.clone());
            // `to` must broadcast to `x`: summing is broadcasting's adjoint.
            if broadcast(&to, &x.shape).ok().as_ref() != Some(&x.shape) {
                return Err(OpError::ShapeMismatch {
                    what: "SumTo's target (it must broadcast to the input)",
                    expected: x.shape.clone(),
                    found: to,
                });
            }
            one(TensorType::new(x.dtype, to))
        }
        Op::Expand { x, shape } => {
            let to = Shape(shape.clone());
            if broadcast(&x.shape, &to).ok().as_ref() != Some(&to) {
                return Err(OpError::ShapeMismatch {
                    what: "Expand's input (it must broadcast to the target)",
                    expected: to,
                    found: x.shape.clone(),
                });
            }
            numel(&to)?;
            one(TensorType::new(x.dtype, to))
        }
        Op::Fill {
            shape,
            value,
            dtype,
        } => {
            if !value.is_finite() {
                return Err(OpError::Attribute(format!(
                    "fill value {value} is not finite"
                )));
            }
            let out = Shape(shape.clone());
            numel(&out)?;
            one(TensorType::new(*dtype, out))
        }
        Op::Pad {
            x,
            dim: axis,
            before,
            after,
        } => {
            let a = axis_of(&x.shape, *axis)?;
            let mut out = x.shape.clone();
            let size = x
                .shape
                .size(a)
                .checked_add(before.size)
                .and_then(|s| s.checked_add(after.size));
            out.0[a] = Dim::new(size.ok_or_else(|| OpError::Overflow(x.shape.clone()))?);
            numel(&out)?;
            one(TensorType::new(x.dtype, out))
        }
        Op::ActGrad { x, dy, .. }
        | Op::SoftmaxGrad { y: x, dy }
        | Op::DropoutGrad { dy, forward: x, .. } => {
            need_float("a gradient", dy)?;
            same_dtype(x, dy)?;
            if x.shape != dy.shape {
                return Err(OpError::ShapeMismatch {
                    what: "the gradient",
                    expected: x.shape.clone(),
                    found: dy.shape.clone(),
                });
            }
            one(dy.clone())
        }
        Op::LayerNormGrad { x, weight, dy, eps } | Op::RmsNormGrad { x, weight, dy, eps } => {
            need_float("the normalized tensor", x)?;
            min_rank("the normalized tensor", "at least 1", x, 1)?;
            positive_eps(*eps)?;
            norm_param("the norm weight", weight.as_ref(), x)?;
            same_dtype(x, dy)?;
            if x.shape != dy.shape {
                return Err(OpError::ShapeMismatch {
                    what: "the gradient",
                    expected: x.shape.clone(),
                    found: dy.shape.clone(),
                });
            }
            let last = x.shape.last().cloned().unwrap_or(Dim::new(1));
            let param = TensorType::new(x.dtype, Shape(vec![last]));
            let n = if matches!(op, Op::LayerNormGrad { .. }) {
                2
            } else {
                1
            };
            let mut out = vec![x.clone()];
            out.extend(std::iter::repeat_n(param, n));
            Ok(out)
        }
        Op::EmbeddingGrad { table, ids, dy } => {
            let forward = infer(&Op::Embedding {
                table: table.clone(),
                ids: ids.clone(),
            })?;
            same_dtype(table, dy)?;
            if forward[0].shape != dy.shape {
                return Err(OpError::ShapeMismatch {
                    what: "the embedding gradient",
                    expected: forward[0].shape.clone(),
                    found: dy.shape.clone(),
                });
            }
            one(table.clone())
        }
        Op::AllReduce { x, .. } | Op::F { x, .. } | Op::G { x, .. } => one(x.clone()),
        Op::AllGather { x, dim, parts, .. } => {
            let a = axis_of(&x.shape, *dim)?;
            let mut out = x.shape.clone();
            let size = out.0[a]
                .size
                .checked_mul(*parts)
                .ok_or_else(|| OpError::Overflow(x.shape.clone()))?;
            out.0[a] = Dim::new(size);
            numel(&out)?;
            one(TensorType::new(x.dtype, out))
        }
        Op::ReduceScatter { x, dim, parts, .. } => {
            let a = axis_of(&x.shape, *dim)?;
            let d = &x.shape.0[a];
            if *parts == 0 || d.size % parts != 0 {
                return Err(OpError::Indivisible {
                    dim: d.clone(),
                    parts: *parts,
                });
            }
            let mut out = x.shape.clone();
            out.0[a] = Dim::new(d.size / parts);
            one(TensorType::new(x.dtype, out))
        }
    }
}

fn positive_eps(eps: f64) -> Result<(), OpError> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(OpError::Attribute(format!("eps {eps} must be positive")))
    }
}

fn cross_entropy_inputs(
    logits: &TensorType,
    targets: &TensorType,
    shift: bool,
    classes: Option<&Dim>,
) -> Result<(), OpError> {
    need_float("the logits", logits)?;
    need_int("the targets", targets)?;
    min_rank("the logits", "at least 2 ([..., seq, vocab])", logits, 2)?;
    let r = logits.shape.rank();
    let expected = Shape(logits.shape.0[..r - 1].to_vec());
    if targets.shape != expected {
        return Err(OpError::ShapeMismatch {
            what: "the targets",
            expected,
            found: targets.shape.clone(),
        });
    }
    if shift && logits.shape.size(r - 2) < 2 {
        return Err(OpError::Attribute(format!(
            "next-token cross-entropy needs a sequence of at least 2, found logits {}",
            logits.shape
        )));
    }
    // `classes` counts the whole class axis, which a vocabulary-parallel plan splits across
    // ranks, so it is not bounded by the local logits.
    if classes.is_some_and(|c| c.size == 0) {
        return Err(OpError::Attribute(format!(
            "zero real classes for the logits {}",
            logits.shape
        )));
    }
    Ok(())
}
