//! Sharding rules: for each op, which input layouts it accepts on one mesh axis and the layout of
//! what it produces. The propagation pass (still to come) asks these rules at every node and
//! inserts a [`conversion`](crate::layout::conversion) where an input's layout is not accepted;
//! the layout verifier re-asks them after partitioning.
//!
//! The rules follow from linearity and locality: a linear op (matmul in one operand, add,
//! reshape, transpose, scale, rotary) passes a partial sum through; a nonlinear one (GeLU,
//! softmax, normalization) never takes one. An op that reduces or indexes along a dimension
//! (normalization, softmax, slice, a causal mask) cannot run on that dimension split. A matmul
//! split on its contracted dimension produces a partial sum (row-parallel); split on its output
//! columns, a split result (column-parallel).

use crate::layout::Layout;
use ferrotron_ir::{Dim, MeshAxis, Op, Shape, TensorType};
use thiserror::Error;

/// A value as a rule sees it: its (full) type and its layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Sharded {
    /// The value's type in the unpartitioned graph.
    pub ty: TensorType,
    /// How it is held across the axis.
    pub layout: Layout,
}

/// Why an op cannot run on the layouts it was given.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[allow(missing_docs)]
pub enum RuleError {
    /// A partial sum reaching an op that is not linear in it.
    #[error("{op} is not linear in its input, so it cannot take a partial sum; all-reduce first")]
    PartialIntoNonlinear { op: &'static str },
    /// A reduction, normalization or index-dependent op over a split dimension.
    #[error("{op} works along dimension {dim}, which is split across ranks")]
    AlongSplitDim { op: &'static str, dim: usize },
    /// A layout that splits a dimension the value does not have.
    #[error("{op}: an input is split along dimension {dim}, but has rank {rank}")]
    SplitOutOfRange {
        op: &'static str,
        dim: usize,
        rank: usize,
    },
    /// Split inputs whose shards are cut differently: a fused weight's blocked shards (each rank
    /// holds its slice of each of q, k, v) against contiguous ones.
    #[error(
        "{op} combines shards of a fused weight cut into {blocks} blocks with shards cut otherwise"
    )]
    MismatchedBlocks { op: &'static str, blocks: u32 },
    /// Input layouts that do not combine (each would be valid on its own).
    #[error("{op} cannot combine inputs laid out as {layouts}")]
    Incompatible { op: &'static str, layouts: String },
}

fn incompatible(op: &'static str, xs: &[&Sharded]) -> RuleError {
    let layouts: Vec<String> = xs.iter().map(|x| x.layout.to_string()).collect();
    RuleError::Incompatible {
        op,
        layouts: layouts.join(" and "),
    }
}

/// The split dimension of `x` counted in the broadcast output of rank `out_rank`, or `None`
/// when `x` is not split.
fn aligned_split(x: &Sharded, out_rank: usize) -> Option<usize> {
    match x.layout {
        Layout::Split(d) => Some(d + out_rank - x.ty.shape.rank()),
        _ => None,
    }
}

/// Whether `x` broadcasts along output dimension `d` (it lacks it, or has it with size 1).
fn broadcasts_along(x: &Sharded, d: usize, out_rank: usize) -> bool {
    let offset = out_rank - x.ty.shape.rank();
    d < offset || x.ty.shape.size(d - offset) == 1
}

/// Elementwise binary ops with broadcasting. `linear_in` says which operands the op is linear in
/// when the other is fixed (add: both together; mul: either alone; div: the numerator alone).
fn elementwise(
    op: &'static str,
    a: &Sharded,
    b: &Sharded,
    out_rank: usize,
    additive: bool,
    linear_in_a: bool,
    linear_in_b: bool,
) -> Result<Layout, RuleError> {
    use Layout::*;
    match (a.layout, b.layout) {
        (Partial, Partial) if additive => Ok(Partial),
        (Partial, Replicated) if !additive && linear_in_a => Ok(Partial),
        (Replicated, Partial) if !additive && linear_in_b => Ok(Partial),
        (Partial, _) | (_, Partial) => Err(incompatible(op, &[a, b])),
        _ => {
            let (sa, sb) = (aligned_split(a, out_rank), aligned_split(b, out_rank));
            match (sa, sb) {
                (None, None) => Ok(Replicated),
                (Some(d), Some(e)) if d == e => Ok(Split(d)),
                (Some(d), None) if broadcasts_along(b, d, out_rank) => Ok(Split(d)),
                (None, Some(d)) if broadcasts_along(a, d, out_rank) => Ok(Split(d)),
                _ => Err(incompatible(op, &[a, b])),
            }
        }
    }
}

/// An op that works along one dimension of `x` (and is otherwise elementwise).
fn along(op: &'static str, x: &Sharded, dims: &[usize], linear: bool) -> Result<Layout, RuleError> {
    match x.layout {
        Layout::Partial if !linear => Err(RuleError::PartialIntoNonlinear { op }),
        Layout::Split(d) if dims.contains(&d) => Err(RuleError::AlongSplitDim { op, dim: d }),
        l => Ok(l),
    }
}

/// The dimensions `rank − k` of `x` for each `k` (the last, second-to-last, ...), skipping those
/// a too-small rank does not have: rules stay total even on ill-typed input.
fn last_dims(x: &Sharded, from_end: &[usize]) -> Vec<usize> {
    let r = x.ty.shape.rank();
    from_end.iter().filter_map(|&k| r.checked_sub(k)).collect()
}

/// Where a split of input dimension `d` lands after a row-major reshape from `from` to `to`: the
/// output dimension whose preceding elements are exactly those preceding `d`, provided the split
/// boundaries line up (the output dimension is an outer factor of `d`, or `d` is the outer factor
/// of a merged output dimension).
pub fn reshape_split(from: &[u64], to: &[u64], d: usize) -> Option<usize> {
    let before: u64 = from[..d].iter().product();
    let mut acc = 1u64;
    for (j, &size) in to.iter().enumerate() {
        if acc == before && size > 1 {
            let ok = from[d].is_multiple_of(size) || size.is_multiple_of(from[d]);
            return ok.then_some(j);
        }
        acc = acc.checked_mul(size)?;
        if acc > before {
            return None;
        }
    }
    None
}

/// The layouts an op produces (one per output) from its inputs' layouts on the tensor-parallel
/// axis.
pub fn output_layouts(op: &Op<Sharded, Dim>) -> Result<Vec<Layout>, RuleError> {
    output_layouts_on(MeshAxis::Tp, op)
}

/// The layouts an op produces (one per output) from its inputs' layouts on mesh axis `on`. A
/// collective over another axis leaves this axis's layout as it is.
pub fn output_layouts_on(on: MeshAxis, op: &Op<Sharded, Dim>) -> Result<Vec<Layout>, RuleError> {
    use Layout::*;
    let name = op.mnemonic();
    match op {
        Op::AllReduce { x, axis }
        | Op::F { x, axis }
        | Op::G { x, axis }
        | Op::AllGather { x, axis, .. }
        | Op::ReduceScatter { x, axis, .. }
        | Op::LocalSlice { x, axis, .. }
            if *axis != on =>
        {
            return Ok(vec![x.layout]);
        }
        _ => {}
    }
    for x in op.inputs() {
        if let Layout::Split(dim) = x.layout {
            let rank = x.ty.shape.rank();
            if dim >= rank {
                return Err(RuleError::SplitOutOfRange {
                    op: name,
                    dim,
                    rank,
                });
            }
        }
    }
    let one = |l| Ok(vec![l]);
    match op {
        Op::Add(a, b) | Op::Sub(a, b) => {
            let rank = a.ty.shape.rank().max(b.ty.shape.rank());
            one(elementwise(name, a, b, rank, true, true, true)?)
        }
        Op::Mul(a, b) => {
            let rank = a.ty.shape.rank().max(b.ty.shape.rank());
            one(elementwise(name, a, b, rank, false, true, true)?)
        }
        Op::Div(a, b) => {
            let rank = a.ty.shape.rank().max(b.ty.shape.rank());
            one(elementwise(name, a, b, rank, false, true, false)?)
        }
        Op::Scale { x, .. } => one(x.layout),
        Op::Gelu(x) | Op::GeluTanh(x) | Op::Silu(x) | Op::Relu(x) | Op::Dropout { x, .. } => {
            one(along(name, x, &[], false)?)
        }
        Op::LayerNorm {
            x, weight, bias, ..
        } => norm(name, x, weight.iter().chain(bias)),
        Op::RmsNorm { x, weight, .. } => norm(name, x, weight.iter()),
        Op::Softmax { x, causal } => {
            let dims = if *causal {
                last_dims(x, &[2, 1])
            } else {
                last_dims(x, &[1])
            };
            one(along(name, x, &dims, false)?)
        }
        Op::Rotary { x, .. } => {
            // Linear in x; needs the position (axis −3) and both halves of the last axis.
            one(along(name, x, &last_dims(x, &[3, 1]), true)?)
        }
        Op::Slice { x, dim: axis, .. } => {
            let a = x.ty.shape.axis(*axis).unwrap_or(usize::MAX);
            one(along(name, x, &[a], true)?)
        }
        Op::Split {
            x,
            dim: axis,
            sizes,
        } => {
            let a = x.ty.shape.axis(*axis).unwrap_or(usize::MAX);
            Ok(vec![along(name, x, &[a], true)?; sizes.len()])
        }
        Op::Concat { xs, dim: axis } => {
            let first = xs.first().map_or(Replicated, |x| x.layout);
            let a = xs
                .first()
                .and_then(|x| x.ty.shape.axis(*axis))
                .unwrap_or(usize::MAX);
            if xs.iter().any(|x| x.layout != first) {
                return Err(incompatible(name, &xs.iter().collect::<Vec<_>>()));
            }
            one(along(name, &xs[0], &[a], true)?)
        }
        Op::Transpose { x, perm } => one(match x.layout {
            Split(d) => Split(perm.iter().position(|&p| p == d).unwrap_or(d)),
            l => l,
        }),
        Op::Reshape { x, shape } => one(match x.layout {
            _ if x.ty.shape.numel() != Shape(shape.clone()).numel() => {
                return Err(incompatible(name, &[x]))
            }
            Split(d) => {
                let to: Vec<u64> = shape.iter().map(|d| d.size).collect();
                let j = reshape_split(&x.ty.shape.sizes(), &to, d)
                    .ok_or(RuleError::AlongSplitDim { op: name, dim: d })?;
                Split(j)
            }
            l => l,
        }),
        Op::Embedding { table, ids } => {
            let out_rank = ids.ty.shape.rank() + 1;
            one(match (table.layout, ids.layout) {
                (Replicated, Replicated) => Replicated,
                (Replicated, Split(d)) => Split(d),
                // Vocabulary-parallel: each rank looks up its rows, zeroes ids outside its range.
                (Split(0), Replicated) => Partial,
                (Split(1), Replicated) => Split(out_rank - 1),
                _ => return Err(incompatible(name, &[table, ids])),
            })
        }
        Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        } => one(matmul(name, a, b, *transpose_a, *transpose_b)?),
        Op::CrossEntropy {
            logits,
            targets,
            shift,
            ..
        } => one(cross_entropy(name, logits, targets, *shift)?),
        Op::CrossEntropyGrad {
            logits,
            targets,
            dloss,
            shift,
            ..
        } => {
            if dloss.layout != Replicated {
                return Err(incompatible(name, &[logits, targets, dloss]));
            }
            cross_entropy(name, logits, targets, *shift)?;
            // The gradient is laid out like the logits.
            one(logits.layout)
        }
        Op::LocalSlice { x, dim, .. } => match (x.layout, x.ty.shape.axis(*dim)) {
            (Replicated, Some(d)) => one(Split(d)),
            _ => Err(incompatible(name, &[x])),
        },
        Op::SumTo { x, shape } => {
            let offset = x.ty.shape.rank().saturating_sub(shape.len());
            let kept = |d: usize| d >= offset && shape[d - offset].size == x.ty.shape.size(d);
            let summed = |d: usize| d < offset || shape[d - offset].size == 1;
            one(match x.layout {
                Split(d) if kept(d) => Split(d - offset),
                // Summed over the split axis: each rank holds its share of the sum.
                Split(d) if summed(d) => Partial,
                Split(_) => return Err(incompatible(name, &[x])),
                l => l,
            })
        }
        Op::Fill { .. } => one(Replicated),
        Op::Expand { x, shape } => {
            // Broadcasting is linear; a split must sit on an axis that is not repeated.
            let offset = shape.len().saturating_sub(x.ty.shape.rank());
            one(match x.layout {
                Split(d) if shape.get(d + offset).map(|s| s.size) == Some(x.ty.shape.size(d)) => {
                    Split(d + offset)
                }
                Split(d) => return Err(RuleError::AlongSplitDim { op: name, dim: d }),
                l => l,
            })
        }
        Op::Pad { x, dim: axis, .. } => {
            let a = x.ty.shape.axis(*axis).unwrap_or(usize::MAX);
            one(along(name, x, &[a], true)?)
        }
        Op::ActGrad { x, dy, .. } => {
            // Nonlinear in x, linear in dy.
            let rank = x.ty.shape.rank();
            one(elementwise(name, x, dy, rank, false, false, true)?)
        }
        Op::DropoutGrad { dy, forward, .. } => {
            // The mask must be the forward's: the same layout (a replicated mask is the same on
            // every rank, so a partial gradient passes through it).
            let rank = dy.ty.shape.rank();
            match (dy.layout, forward.layout) {
                (Partial, Replicated) => one(Partial),
                (a, b) if a == b => one(elementwise(name, dy, forward, rank, false, true, false)?),
                _ => Err(incompatible(name, &[dy, forward])),
            }
        }
        Op::SoftmaxGrad { y, dy } => {
            let last = last_dims(y, &[1]);
            along(name, y, &last, false)?;
            let rank = y.ty.shape.rank();
            one(elementwise(name, y, dy, rank, false, false, true)?)
        }
        Op::LayerNormGrad { x, weight, dy, .. } | Op::RmsNormGrad { x, weight, dy, .. } => {
            let n = op.num_outputs();
            if weight.as_ref().is_some_and(|w| w.layout != Replicated) {
                return Err(incompatible(name, &[x, weight.as_ref().unwrap_or(x)]));
            }
            let last = last_dims(x, &[1]);
            along(name, x, &last, false)?;
            let rank = x.ty.shape.rank();
            let dx = elementwise(name, x, dy, rank, false, false, true)?;
            // The parameter gradients sum over every position: split positions give partial sums.
            let dparam = match dx {
                Split(_) => Partial,
                l => l,
            };
            let mut out = vec![dx];
            out.extend(std::iter::repeat_n(dparam, n - 1));
            Ok(out)
        }
        Op::EmbeddingGrad { table, ids, dy } => {
            let forward = output_layouts_on(
                on,
                &Op::Embedding {
                    table: table.clone(),
                    ids: ids.clone(),
                },
            )?[0];
            one(match (forward, dy.layout, table.layout) {
                // Vocabulary-parallel: each rank scatters into its own rows.
                (Partial, Replicated, Split(0)) => Split(0),
                (Split(d), Split(e), Split(1)) if d == e => Split(1),
                // Positions split (data parallel): each rank's rows are a partial sum.
                (Split(d), Split(e), Replicated) if d == e => Partial,
                (Replicated, l @ (Replicated | Partial), Replicated) => l,
                _ => return Err(incompatible(name, &[table, ids, dy])),
            })
        }
        Op::AllReduce { x, .. } | Op::G { x, .. } => match x.layout {
            Partial => one(Replicated),
            _ => Err(incompatible(name, &[x])),
        },
        Op::F { x, .. } => match x.layout {
            Replicated => one(Replicated),
            _ => Err(incompatible(name, &[x])),
        },
        Op::AllGather { x, dim, .. } => match x.layout {
            Split(d) if Some(d) == x.ty.shape.axis(*dim) => one(Replicated),
            _ => Err(incompatible(name, &[x])),
        },
        Op::ReduceScatter { x, dim, .. } => match (x.layout, x.ty.shape.axis(*dim)) {
            (Partial, Some(d)) => one(Split(d)),
            _ => Err(incompatible(name, &[x])),
        },
    }
}

/// Cross-entropy (and its gradient's) layouts: replicated, vocabulary-parallel (logits split on
/// the class axis: only per-token scalars are all-reduced), or split over a batch axis (each rank
/// averages over the global token count, so its loss is a partial sum).
fn cross_entropy(
    name: &'static str,
    logits: &Sharded,
    targets: &Sharded,
    shift: bool,
) -> Result<Layout, RuleError> {
    use Layout::*;
    let r = logits.ty.shape.rank();
    let class_axis = r.saturating_sub(1);
    Ok(match (logits.layout, targets.layout) {
        (Replicated, Replicated) => Replicated,
        (Split(d), Replicated) if d == class_axis => Replicated,
        // Shifted targets cross the sequence axis, so only earlier axes may be split.
        (Split(d), Split(e)) if d == e && d < class_axis && !(shift && d + 2 == r) => Partial,
        (Partial, _) => return Err(RuleError::PartialIntoNonlinear { op: name }),
        _ => return Err(incompatible(name, &[logits, targets])),
    })
}

fn norm<'a>(
    name: &'static str,
    x: &Sharded,
    params: impl Iterator<Item = &'a Sharded>,
) -> Result<Vec<Layout>, RuleError> {
    let out = along(name, x, &last_dims(x, &[1]), false)?;
    for p in params {
        if p.layout != Layout::Replicated {
            return Err(incompatible(name, &[x, p]));
        }
    }
    Ok(vec![out])
}

/// Matmul: `a [..., m, k] · b [..., k, n]` after the optional transposes.
fn matmul(
    name: &'static str,
    a: &Sharded,
    b: &Sharded,
    ta: bool,
    tb: bool,
) -> Result<Layout, RuleError> {
    use Layout::*;
    let (ra, rb) = (a.ty.shape.rank(), b.ty.shape.rank());
    if ra < 2 || rb < 2 {
        return Err(incompatible(name, &[a, b]));
    }
    let out_rank = ra.max(rb);
    // Each operand's split, as a role: contracted (k), free (m of a / n of b), or a batch axis
    // numbered in the output.
    #[derive(PartialEq, Clone, Copy)]
    enum Role {
        K,
        Free,
        Batch(usize),
    }
    let role = |d: usize, rank: usize, transposed: bool, is_a: bool| -> Role {
        let (row, col) = (rank - 2, rank - 1);
        let k_axis = match (is_a, transposed) {
            (true, false) | (false, true) => col,
            (true, true) | (false, false) => row,
        };
        if d == k_axis {
            Role::K
        } else if d == row || d == col {
            Role::Free
        } else {
            Role::Batch(d + out_rank - rank)
        }
    };
    match (a.layout, b.layout) {
        (Replicated, Replicated) => Ok(Replicated),
        (Partial, Replicated) | (Replicated, Partial) => Ok(Partial),
        (Partial, _) | (_, Partial) => Err(incompatible(name, &[a, b])),
        (Split(da), Split(db)) => match (role(da, ra, ta, true), role(db, rb, tb, false)) {
            (Role::K, Role::K) => Ok(Partial),
            (Role::Batch(i), Role::Batch(j)) if i == j => Ok(Split(i)),
            _ => Err(incompatible(name, &[a, b])),
        },
        (Split(da), Replicated) => match role(da, ra, ta, true) {
            Role::Free => Ok(Split(out_rank - 2)),
            Role::Batch(i) if broadcasts_along(b, i, out_rank) => Ok(Split(i)),
            _ => Err(incompatible(name, &[a, b])),
        },
        (Replicated, Split(db)) => match role(db, rb, tb, false) {
            Role::Free => Ok(Split(out_rank - 1)),
            Role::Batch(i) if broadcasts_along(a, i, out_rank) => Ok(Split(i)),
            _ => Err(incompatible(name, &[a, b])),
        },
    }
}
