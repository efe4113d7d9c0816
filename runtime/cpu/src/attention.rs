//! Fused scaled dot-product attention on the CPU, forward and backward, in the manner of
//! FlashAttention-2: the executor's `Fused::Attention` and `Fused::AttentionGrad` steps
//! (`runtime/exec/src/fuse.rs`) run here through `Backend::attention(_grad)` in place of the
//! unfused `MatMul → Scale → Softmax → Dropout → MatMul` chain and its gradients.
//!
//! The `[..., queries, keys]` scores are never held: work goes a tile of [`BQ`] query rows by
//! [`BK`] keys at a time through per-thread scratch buffers, the tile products through `gemm`
//! (one thread each, inside the parallel loop). The forward keeps an online softmax (running
//! row max and sum, the partial output rescaled when the max grows) and saves each row's
//! log-sum-exp; the backward recomputes the probabilities from it, tile by tile.
//!
//! Dropout drops exactly the elements the `Dropout` kernel would on the probabilities tensor at
//! the same [`Placement`] (their counters come from [`dropout_row_starts`]), so a fused run and
//! an unfused one agree to `f32` rounding.
//!
//! The operands and results are heads first (`[..., heads, seq, d]`) or, with
//! [`AttentionSpec::seq_first`], sequence first (`[..., seq, heads, d]`, the projections' layout):
//! either way a batch entry's rows are read in place, at the offset and row stride
//! [`AttentionDims::rows_of`] gives (the tile products take a row stride). The log-sum-exps are
//! `[..., heads, queries]` and the dropout mask that of the probabilities
//! `[..., heads, queries, keys]` in both layouts.
//!
//! Work is split into fixed items — (batch entry, query block) in the forward, batch entries in
//! the backward, where each owns its rows of `dq`, `dk` and `dv` — and each item's arithmetic is
//! the same whichever thread runs it: results are bit-identical on any number of threads.
//!
//! The result buffers are cut into chunks, one per outer index (the leading axes before the
//! heads, whose rows of every head form one chunk in either layout), each behind a lock. Heads
//! first, an outer index is a single batch entry: a backward item sums its gradients in its
//! chunk in place. Sequence first, an entry's rows lie between the other heads' rows, so an item
//! sums them in its thread's scratch and copies them to its rows, holding the lock only to copy.
//! (A forward item always normalises its block out of the scratch into its rows.) No two items
//! write the same rows, so the order in which they take a lock changes nothing.

use super::kernels::dropout_row_starts;
use super::layout::{buffer, numel, output, Result};
use super::math::{self, exp};
use super::par::par_ranges;
use ferrotron_exec::kernel::{
    attention_dims, invalid, AttentionDims, AttentionSaved, AttentionSpec, KernelError, OrInvalid,
    Placement,
};
use ferrotron_exec::Tensor;
use ferrotron_ir::index;
use gemm::Parallelism;
use std::sync::{Mutex, MutexGuard};

/// Query rows per tile (also [`keep_column`]'s block).
const BQ: usize = 64;
/// Keys per tile (also the dropout mask's block: [`keep_factors`]).
const BK: usize = 64;

/// The forward: the output (`q`'s layout with width `dv`: `[..., queries, dv]` heads first,
/// `[..., queries, heads, dv]` sequence first) and the row log-sum-exps `[..., heads, queries]`.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
    at: &Placement,
    threads: usize,
) -> Result<(Tensor, Tensor), KernelError> {
    const OP: &str = "Attention";
    let dims = attention_dims(OP, &q.shape, &k.shape, &v.shape, spec)?;
    for t in [q, k, v] {
        index::check_len(&t.shape, t.data.len()).or_invalid(OP)?;
    }
    let mask = Mask::new(OP, &dims, spec, at, &q.shape)?;
    let AttentionDims {
        batch,
        queries,
        keys,
        d,
        dv,
        ..
    } = dims;
    let (out_shape, lse_shape) = result_shapes(&dims, spec, &q.shape);
    // Every row of every item is written (`Tile::write`): no zeros needed.
    let mut out = output(numel(OP, &out_shape)?);
    let mut lse = output(numel(OP, &lse_shape)?);
    if out.is_empty() && lse.is_empty() {
        // Nothing to compute (and `batch` may be any size: no items are made for it).
        return Ok((
            Tensor {
                shape: out_shape,
                data: out,
            },
            Tensor {
                shape: lse_shape,
                data: lse,
            },
        ));
    }
    // Each outer index's chunks of the results, for the items of its entries to write in.
    let blocks = queries.div_ceil(BQ);
    let outers = batch / dims.heads;
    let chunks: Vec<_> = parts(&mut out, queries * dims.heads * dv, outers)
        .zip(parts(&mut lse, dims.heads * queries, outers))
        .map(Mutex::new)
        .collect();
    // Multiply-adds, scaled as `matmul.rs` scales them against an elementwise op's element.
    let work = batch
        .saturating_mul(queries)
        .saturating_mul(keys)
        .saturating_mul(d + dv)
        / 16;
    par_ranges(
        threads.max(1),
        batch * blocks,
        work,
        #[inline(always)]
        |items| {
            let mut tile = Tile::new(&dims, mask.dropout.is_some());
            for it in items {
                let (b, rows) = (it / blocks, block_rows(it % blocks, queries));
                let operands = Operands::of(&dims, b, q, k, v);
                forward_block(
                    &dims,
                    &mask,
                    spec.factor as f32,
                    &operands,
                    (b, rows.clone()),
                    &mut tile,
                );
                let mut chunk = lock(&chunks[b / dims.heads]);
                let (o, l) = &mut *chunk;
                tile.write(&dims, (b, rows), (o, l));
            }
        },
    );
    drop(chunks);
    Ok((
        Tensor {
            shape: out_shape,
            data: out,
        },
        Tensor {
            shape: lse_shape,
            data: lse,
        },
    ))
}

/// The backward: `(dq, dk, dv)`.
pub fn backward(
    saved: AttentionSaved<&Tensor>,
    spec: &AttentionSpec,
    at: &Placement,
    threads: usize,
) -> Result<(Tensor, Tensor, Tensor), KernelError> {
    const OP: &str = "AttentionGrad";
    let AttentionSaved {
        q,
        k,
        v,
        out,
        lse,
        dout,
    } = saved;
    let dims = attention_dims(OP, &q.shape, &k.shape, &v.shape, spec)?;
    for t in [q, k, v, out, lse, dout] {
        index::check_len(&t.shape, t.data.len()).or_invalid(OP)?;
    }
    let (out_shape, lse_shape) = result_shapes(&dims, spec, &q.shape);
    for (what, t, want) in [
        ("the output", out, &out_shape),
        ("its gradient", dout, &out_shape),
    ] {
        if t.shape != *want {
            return Err(invalid(
                OP,
                format!(
                    "{what} is {:?}, but q {:?} and v {:?} make a {want:?} output",
                    t.shape, q.shape, v.shape
                ),
            ));
        }
    }
    if lse.shape != lse_shape {
        return Err(invalid(
            OP,
            format!(
                "the log-sum-exps are {:?}, but q {:?} makes {lse_shape:?} of them",
                lse.shape, q.shape
            ),
        ));
    }
    let mask = Mask::new(OP, &dims, spec, at, &q.shape)?;
    let AttentionDims {
        batch,
        queries,
        keys,
        d,
        dv,
        ..
    } = dims;
    let mut dq = buffer(q.data.len());
    let mut dk = buffer(k.data.len());
    let mut dvs = buffer(v.data.len());
    if dq.is_empty() && dk.is_empty() && dvs.is_empty() {
        // Nothing to compute (and `batch` may be any size: no slots are made for it).
        let zeros = |t: &Tensor| Tensor {
            shape: t.shape.clone(),
            data: Vec::new().into(),
        };
        return Ok((zeros(q), zeros(k), zeros(v)));
    }
    // Each outer index's chunks of the gradients (as in the forward).
    let (heads, outers) = (dims.heads, batch / dims.heads);
    let chunks: Vec<_> = parts(&mut dq, queries * heads * d, outers)
        .zip(parts(&mut dk, keys * heads * d, outers))
        .zip(parts(&mut dvs, keys * heads * dv, outers))
        .map(|((dq, dk), dv)| Mutex::new(Grads { dq, dk, dv }))
        .collect();
    let work = batch
        .saturating_mul(queries)
        .saturating_mul(keys)
        .saturating_mul(2 * (d + dv))
        / 16;
    par_ranges(
        threads.max(1),
        batch,
        work,
        #[inline(always)]
        |items| {
            let mut tile = GradTile::new(&dims, mask.dropout.is_some());
            for b in items {
                let saved = SavedRows {
                    operands: Operands::of(&dims, b, q, k, v),
                    out: Rows::of(&dims, b, out, queries, dv),
                    dout: Rows::of(&dims, b, dout, queries, dv),
                    lse: &lse.data[b * queries..(b + 1) * queries],
                };
                backward_entry(
                    &dims,
                    &mask,
                    spec.factor as f32,
                    &saved,
                    b,
                    &chunks[b / heads],
                    &mut tile,
                );
            }
        },
    );
    drop(chunks);
    Ok((
        Tensor {
            shape: q.shape.clone(),
            data: dq,
        },
        Tensor {
            shape: k.shape.clone(),
            data: dk,
        },
        Tensor {
            shape: v.shape.clone(),
            data: dvs,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Masks

/// Which scores count: causality, and the dropout mask of the probabilities.
struct Mask {
    causal: bool,
    dropout: Option<Dropout>,
}

/// A dropout mask on the probabilities `[..., heads, queries, keys]`.
struct Dropout {
    /// The counter of each probability row's first element (`batch · queries` rows, entry
    /// `b`'s row `i` at `b · queries + i`).
    row_starts: Vec<u64>,
    /// Kept iff `splitmix64(counter) >= threshold`.
    threshold: u64,
    /// `1/(1 − p)`, in `f32` as `Dropout` applies it.
    scale: f32,
}

impl Mask {
    fn new(
        op: &'static str,
        dims: &AttentionDims,
        spec: &AttentionSpec,
        at: &Placement,
        q_shape: &[usize],
    ) -> Result<Mask> {
        let dropout = if spec.dropout > 0.0 {
            let probs = dims.probs_shape(q_shape, spec.seq_first);
            Some(Dropout {
                row_starts: dropout_row_starts(op, &probs, at)?,
                threshold: ferrotron_ir::reference::keep_threshold(spec.dropout),
                scale: index::dropout_scale(spec.dropout).or_invalid(op)? as f32,
            })
        } else {
            None
        };
        Ok(Mask {
            causal: spec.causal,
            dropout,
        })
    }
}

/// `out[j]` = the dropout scale where the probability at counter `start + j` is kept, else 0:
/// kept probabilities and their gradients are multiplied by it. As `math::dropout_row`, the
/// draws go through an integer buffer of their own so that the loop vectorizes.
#[inline(always)]
fn keep_factors(out: &mut [f32], start: u64, drop: &Dropout) {
    let mut keep = [0u64; BK];
    for (kp, j) in keep.iter_mut().zip(0u64..) {
        *kp = (math::splitmix64(start.wrapping_add(j)) >= drop.threshold) as u64;
    }
    for (o, &kp) in out.iter_mut().zip(&keep) {
        *o = if kp != 0 { drop.scale } else { 0.0 };
    }
}

/// [`keep_factors`] down a column of the scores: `out[r]` for the probability at counter
/// `starts[r] + offset`.
#[inline(always)]
fn keep_column(out: &mut [f32], starts: &[u64], offset: u64, drop: &Dropout) {
    let mut keep = [0u64; BQ];
    for (kp, &start) in keep.iter_mut().zip(starts) {
        *kp = (math::splitmix64(start.wrapping_add(offset)) >= drop.threshold) as u64;
    }
    for (o, &kp) in out.iter_mut().zip(&keep) {
        *o = if kp != 0 { drop.scale } else { 0.0 };
    }
}

/// A result slot's lock. A poisoned one (a panic on another thread) is taken as is: that panic
/// is re-raised when the threads are joined.
fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// `buf` cut into `count` consecutive parts of `len` elements (which may be 0).
fn parts<T>(buf: &mut [T], len: usize, count: usize) -> impl Iterator<Item = &mut [T]> {
    let mut rest = buf;
    (0..count).map(move |_| {
        let (part, next) = std::mem::take(&mut rest).split_at_mut(len);
        rest = next;
        part
    })
}

/// The shapes of the output (`q`'s with width `dv`) and of the log-sum-exps
/// (`[..., heads, queries]`, the probabilities' without the keys).
fn result_shapes(
    dims: &AttentionDims,
    spec: &AttentionSpec,
    q: &[usize],
) -> (Vec<usize>, Vec<usize>) {
    let out = [&q[..q.len() - 1], &[dims.dv]].concat();
    let mut lse = dims.probs_shape(q, spec.seq_first);
    lse.pop();
    (out, lse)
}

/// Where batch entry `b`'s rows of a result of `rows` rows of `width` per entry lie in its
/// outer index's chunk (the rows of all its heads, `rows · heads · width` elements):
/// `(offset of row 0, distance between rows)`, as [`AttentionDims::rows_of`] in the buffer.
fn rows_in_chunk(dims: &AttentionDims, b: usize, rows: usize, width: usize) -> (usize, usize) {
    let (offset, stride) = dims.rows_of(b, rows, width);
    (offset - b / dims.heads * rows * dims.heads * width, stride)
}

/// The rows of query block `block`.
fn block_rows(block: usize, queries: usize) -> std::ops::Range<usize> {
    block * BQ..((block + 1) * BQ).min(queries)
}

/// How many of keys `j0..j1` row `i` sees.
#[inline(always)]
fn visible_in(dims: &AttentionDims, causal: bool, i: usize, j0: usize, j1: usize) -> usize {
    dims.visible(i, causal).min(j1).saturating_sub(j0)
}

// ---------------------------------------------------------------------------------------------
// Forward

/// One batch entry's rows of an operand: row `i` is `data[i · stride..][..width]` (heads first
/// `stride` is `width`; sequence first, the other heads' rows lie between).
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
    width: usize,
}

impl<'a> Rows<'a> {
    /// Batch entry `b`'s rows of `t`, `rows` rows of `width`.
    fn of(dims: &AttentionDims, b: usize, t: &'a Tensor, rows: usize, width: usize) -> Self {
        let (offset, stride) = dims.rows_of(b, rows, width);
        let data = if rows == 0 || width == 0 {
            &[]
        } else {
            &t.data[offset..offset + (rows - 1) * stride + width]
        };
        Rows {
            data,
            stride,
            width,
        }
    }

    /// Rows `r0..r1` (at least one), for a [`Mat`] of row stride `self.stride`.
    #[inline(always)]
    fn block(&self, r0: usize, r1: usize) -> &'a [f32] {
        &self.data[r0 * self.stride..(r1 - 1) * self.stride + self.width]
    }

    /// Row `i`.
    #[inline(always)]
    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.width]
    }
}

/// One batch entry's operands.
struct Operands<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
}

impl<'a> Operands<'a> {
    fn of(dims: &AttentionDims, b: usize, q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        let AttentionDims {
            queries,
            keys,
            d,
            dv,
            ..
        } = *dims;
        Operands {
            q: Rows::of(dims, b, q, queries, d),
            k: Rows::of(dims, b, k, keys, d),
            v: Rows::of(dims, b, v, keys, dv),
        }
    }
}

/// A forward item's scratch: the scores tile, a query block's running statistics and its
/// output, unnormalised while the keys are swept.
///
/// The tile is column-major (a key's scores of the block's rows side by side), so that the
/// softmax's row statistics are elementwise operations over columns, vectorized across rows,
/// instead of a horizontal reduction per short row.
struct Tile {
    /// Scores, then probabilities, `[BK, BQ]` (column stride: the block's row count).
    s: Vec<f32>,
    /// Dropout factors of one column.
    keep: Vec<f32>,
    /// Running max of each row's scaled scores.
    m: Vec<f32>,
    /// Running `Σ e^(s − m)` of each row.
    l: Vec<f64>,
    /// Per row, this tile's largest score.
    tile_max: Vec<f32>,
    /// Per row, what the exponentials subtract: the new running max (0 while it is −∞).
    shift: Vec<f32>,
    /// Per row, `e^(old max − new max)`: the factor on the sum and output so far.
    alpha: Vec<f32>,
    /// Per row, this tile's `Σ e^(s − shift)`.
    sum: Vec<f32>,
    /// The block's output rows `[BQ, dv]`, unnormalised.
    o: Vec<f32>,
}

impl Tile {
    fn new(dims: &AttentionDims, dropout: bool) -> Tile {
        Tile {
            s: vec![0.0; BQ * BK],
            keep: vec![0.0; if dropout { BQ } else { 0 }],
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
            tile_max: vec![0.0; BQ],
            shift: vec![0.0; BQ],
            alpha: vec![0.0; BQ],
            sum: vec![0.0; BQ],
            o: vec![0.0; BQ * dims.dv],
        }
    }
}

/// The output rows `rows` of batch entry `b`, unnormalised, and their running statistics, into
/// `tile` (for [`Tile::write`]).
#[inline(always)]
fn forward_block(
    dims: &AttentionDims,
    mask: &Mask,
    factor: f32,
    x: &Operands,
    (b, rows): (usize, std::ops::Range<usize>),
    tile: &mut Tile,
) {
    let AttentionDims {
        queries,
        keys,
        d,
        dv,
        ..
    } = *dims;
    let (i0, mq) = (rows.start, rows.len());
    let Tile {
        s,
        keep,
        m,
        l,
        tile_max,
        shift,
        alpha,
        sum,
        o,
        ..
    } = tile;
    let out = &mut o[..mq * dv];
    let (m, l) = (&mut m[..mq], &mut l[..mq]);
    let (tile_max, shift, alpha, sum) = (
        &mut tile_max[..mq],
        &mut shift[..mq],
        &mut alpha[..mq],
        &mut sum[..mq],
    );
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let qt = x.q.block(i0, i0 + mq);
    // The keys the block's last row sees: later ones are masked for every row.
    let kend = if mq == 0 {
        0
    } else {
        dims.visible(i0 + mq - 1, mask.causal)
    };
    if kend == 0 {
        out.fill(0.0);
    }
    for j0 in (0..kend).step_by(BK) {
        let j1 = (j0 + BK).min(kend);
        let nk = j1 - j0;
        let s = &mut s[..mq * nk];
        // sᵀ = factor · k qᵀ: the scores, column-major.
        gemm_tile(
            s,
            false,
            Mat::rows(x.k.block(j0, j1), x.k.stride),
            Mat::cols(qt, x.q.stride),
            (nk, mq, d),
            factor,
        );
        // Causal: key `j0 + c` is seen by rows `first(c)..` of the block.
        let first = |c: usize| {
            if mask.causal {
                (j0 + c + queries).saturating_sub(keys + i0).min(mq)
            } else {
                0
            }
        };
        tile_max.fill(f32::NEG_INFINITY);
        // Whole columns, the masked rows selected away: a loop of full vectors.
        for (c, col) in s.chunks_exact(mq).enumerate() {
            let r0 = first(c);
            for (r, (t, &v)) in tile_max.iter_mut().zip(col).enumerate() {
                *t = t.max(if r >= r0 { v } else { f32::NEG_INFINITY });
            }
        }
        for (((m, t), sh), a) in m
            .iter_mut()
            .zip(&*tile_max)
            .zip(shift.iter_mut())
            .zip(alpha.iter_mut())
        {
            let m_new = m.max(*t);
            // All scores −∞: shift by 0, so that the exponentials are 0 rather than NaN.
            *sh = if m_new == f32::NEG_INFINITY {
                0.0
            } else {
                m_new
            };
            *a = exp(*m - *sh);
            *m = m_new;
        }
        sum.fill(0.0);
        for (c, col) in s.chunks_exact_mut(mq).enumerate() {
            // Exponentials of whole columns (the masked rows' are finite, `exp` saturates),
            // then the masked rows zeroed: a loop of full vectors, as above.
            for (p, &sh) in col.iter_mut().zip(&*shift) {
                *p = exp(*p - sh);
            }
            col[..first(c)].fill(0.0);
            // In `f32`: at most BK terms, each at most 1.
            for (sum, &p) in sum.iter_mut().zip(&*col) {
                *sum += p;
            }
            if let Some(drop) = &mask.dropout {
                let base = b * queries + i0;
                let keep = &mut keep[..mq];
                keep_column(
                    keep,
                    &drop.row_starts[base..base + mq],
                    (j0 + c) as u64,
                    drop,
                );
                for (p, &f) in col.iter_mut().zip(keep.iter()) {
                    *p *= f;
                }
            }
        }
        for ((l, &a), &t) in l.iter_mut().zip(&*alpha).zip(&*sum) {
            *l = *l * a as f64 + t as f64;
        }
        // The first tile writes `out` (whatever it held) rather than adding to it.
        if j0 > 0 {
            for (o, &a) in out.chunks_exact_mut(dv.max(1)).zip(&*alpha) {
                if a != 1.0 {
                    for o in o {
                        *o *= a;
                    }
                }
            }
        }
        // out += dropout(p) · v
        gemm_tile(
            out,
            j0 > 0,
            Mat::cols(s, mq),
            Mat::rows(x.v.block(j0, j1), x.v.stride),
            (mq, dv, nk),
            1.0,
        );
    }
}

impl Tile {
    /// The block [`forward_block`] left here, normalised, and its log-sum-exps, into the chunks
    /// of `b`'s outer index of the output and the log-sum-exps.
    #[inline(always)]
    fn write(
        &self,
        dims: &AttentionDims,
        (b, rows): (usize, std::ops::Range<usize>),
        (out, lse): (&mut [f32], &mut [f32]),
    ) {
        let (queries, dv, mq) = (dims.queries, dims.dv, rows.len());
        let (offset, stride) = rows_in_chunk(dims, b, queries, dv);
        let lse = &mut lse[b % dims.heads * queries + rows.start..][..mq];
        let stats = self.m[..mq].iter().zip(&self.l[..mq]).zip(lse);
        for (r, ((&m, &l), lse)) in stats.enumerate() {
            let inv = if l > 0.0 { (1.0 / l) as f32 } else { 0.0 };
            let dst = &mut out[offset + (rows.start + r) * stride..][..dv];
            for (dst, &o) in dst.iter_mut().zip(&self.o[r * dv..(r + 1) * dv]) {
                *dst = o * inv;
            }
            *lse = (m as f64 + l.ln()) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward

/// What the backward reads of one batch entry.
struct SavedRows<'a> {
    operands: Operands<'a>,
    out: Rows<'a>,
    dout: Rows<'a>,
    lse: &'a [f32],
}

/// An outer index's chunks of the gradients, where the items of its entries write their rows.
struct Grads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// A backward item's scratch.
struct GradTile {
    /// Probabilities `[BQ, BK]`.
    p: Vec<f32>,
    /// The probabilities after dropout (unused without it: they are `p`).
    z: Vec<f32>,
    /// `dZ = dout · vᵀ`, then `dS`.
    ds: Vec<f32>,
    /// Dropout factors of one row.
    keep: Vec<f32>,
    /// `D_i = dout_i · out_i` of the entry's rows.
    delta: Vec<f32>,
    /// The entry's `dq` `[queries, d]`, summed over the key blocks.
    dq: Vec<f32>,
    /// A key block's `dk` `[BK, d]` and `dv` `[BK, dv]`, summed over the query blocks.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl GradTile {
    fn new(dims: &AttentionDims, dropout: bool) -> GradTile {
        let z = if dropout { BQ * BK } else { 0 };
        GradTile {
            p: vec![0.0; BQ * BK],
            z: vec![0.0; z],
            ds: vec![0.0; BQ * BK],
            keep: vec![0.0; if dropout { BK } else { 0 }],
            delta: vec![0.0; dims.queries],
            dq: vec![0.0; dims.queries * dims.d],
            dk: vec![0.0; BK * dims.d],
            dv: vec![0.0; BK * dims.dv],
        }
    }
}

/// Batch entry `b`'s gradients, into its rows of `chunk`: key blocks outermost, so that each
/// block's `dk` and `dv` rows are summed over the query blocks in the scratch, then copied out;
/// `dq` gathers every key block's share, copied out at the end.
#[inline(always)]
fn backward_entry(
    dims: &AttentionDims,
    mask: &Mask,
    factor: f32,
    x: &SavedRows,
    b: usize,
    chunk: &Mutex<Grads>,
    tile: &mut GradTile,
) {
    let AttentionDims {
        queries,
        keys,
        d,
        dv,
        ..
    } = *dims;
    let Operands { q, k, v } = x.operands;
    // D_i = Σ_j P_ij dP_ij = dout_i · out_i: dropout included, as out holds the dropped sum.
    for (i, delta) in tile.delta.iter_mut().enumerate() {
        *delta = math::sum_zip(x.dout.row(i), x.out.row(i), |a, b| a as f64 * b as f64) as f32;
    }
    // Heads first, the chunk is the entry's alone: the gradients are summed in it in place, its
    // lock held throughout (and never waited for). Sequence first, the other heads' entries share
    // it: they are summed in the scratch and copied out, the lock held only to copy.
    let shared = dims.heads > 1;
    let mut own = (!shared).then(|| lock(chunk));
    let (dq_sum, mut in_place) = match own.as_deref_mut() {
        Some(Grads { dq, dk, dv }) => (&mut **dq, Some((&mut **dk, &mut **dv))),
        None => {
            tile.dq.fill(0.0);
            (&mut tile.dq[..], None)
        }
    };
    for j0 in (0..keys).step_by(BK) {
        let j1 = (j0 + BK).min(keys);
        let nk = j1 - j0;
        let (kt, vt) = (k.block(j0, j1), v.block(j0, j1));
        let (dk, dvt): (&mut [f32], &mut [f32]) = match &mut in_place {
            Some((dk, dvs)) => (&mut dk[j0 * d..j1 * d], &mut dvs[j0 * dv..j1 * dv]),
            None => {
                let (dk, dvt) = (&mut tile.dk[..nk * d], &mut tile.dv[..nk * dv]);
                dk.fill(0.0);
                dvt.fill(0.0);
                (dk, dvt)
            }
        };
        // The first query row that sees key j0.
        let first = if mask.causal {
            (j0 + queries).saturating_sub(keys)
        } else {
            0
        };
        for i0 in (first..queries).step_by(BQ) {
            let i1 = (i0 + BQ).min(queries);
            let mq = i1 - i0;
            let (qt, dot) = (q.block(i0, i1), x.dout.block(i0, i1));
            let p = &mut tile.p[..mq * nk];
            gemm_tile(
                p,
                false,
                Mat::rows(qt, q.stride),
                Mat::cols(kt, k.stride),
                (mq, nk, d),
                factor,
            );
            let ds = &mut tile.ds[..mq * nk];
            // dZ = dout · vᵀ
            gemm_tile(
                ds,
                false,
                Mat::rows(dot, x.dout.stride),
                Mat::cols(vt, v.stride),
                (mq, nk, dv),
                1.0,
            );
            for r in 0..mq {
                let i = i0 + r;
                let vis = visible_in(dims, mask.causal, i, j0, j1);
                let (lse, delta) = (x.lse[i], tile.delta[i]);
                let p = &mut p[r * nk..(r + 1) * nk];
                let ds = &mut ds[r * nk..(r + 1) * nk];
                let (p_seen, p_masked) = p.split_at_mut(vis);
                for s in p_seen.iter_mut() {
                    *s = exp(*s - lse);
                }
                p_masked.fill(0.0);
                match &mask.dropout {
                    None => {
                        for (ds, &p) in ds.iter_mut().zip(p.iter()) {
                            *ds = p * (*ds - delta);
                        }
                    }
                    Some(drop) => {
                        let keep = &mut tile.keep[..nk];
                        keep_factors(
                            keep,
                            drop.row_starts[b * queries + i].wrapping_add(j0 as u64),
                            drop,
                        );
                        let z = &mut tile.z[r * nk..(r + 1) * nk];
                        for (((z, ds), &p), &f) in z
                            .iter_mut()
                            .zip(ds.iter_mut())
                            .zip(p.iter())
                            .zip(keep.iter())
                        {
                            *z = p * f;
                            *ds = p * (*ds * f - delta);
                        }
                    }
                }
            }
            let z: &[f32] = if mask.dropout.is_some() {
                &tile.z[..mq * nk]
            } else {
                p
            };
            // dv += Zᵀ · dout
            gemm_tile(
                dvt,
                true,
                Mat::cols(z, nk),
                Mat::rows(dot, x.dout.stride),
                (nk, dv, mq),
                1.0,
            );
            // dq += factor · dS · k
            gemm_tile(
                &mut dq_sum[i0 * d..i1 * d],
                true,
                Mat::rows(ds, nk),
                Mat::rows(kt, k.stride),
                (mq, d, nk),
                factor,
            );
            // dk += factor · dSᵀ · q
            gemm_tile(
                dk,
                true,
                Mat::cols(ds, nk),
                Mat::rows(qt, q.stride),
                (nk, d, mq),
                factor,
            );
        }
        if shared {
            let mut g = lock(chunk);
            let rows = rows_in_chunk(dims, b, keys, d);
            copy_rows(g.dk, rows, j0, dk, d);
            let rows = rows_in_chunk(dims, b, keys, dv);
            copy_rows(g.dv, rows, j0, dvt, dv);
        }
    }
    if shared {
        let rows = rows_in_chunk(dims, b, queries, d);
        copy_rows(lock(chunk).dq, rows, 0, dq_sum, d);
    }
}

/// `src`'s rows of `width` into rows `first..` of `dst`, at `(offset of row 0, distance between
/// rows)`.
#[inline(always)]
fn copy_rows(
    dst: &mut [f32],
    (offset, stride): (usize, usize),
    first: usize,
    src: &[f32],
    width: usize,
) {
    if width > 0 {
        for (i, src) in (first..).zip(src.chunks_exact(width)) {
            dst[offset + i * stride..][..width].copy_from_slice(src);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tile products

/// A matrix operand: element `(i, l)` at `data[i * rs + l * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major rows of `width` elements.
    fn rows(data: &'a [f32], width: usize) -> Self {
        Mat {
            data,
            rs: width,
            cs: 1,
        }
    }

    /// The transpose of row-major rows of `width` elements.
    fn cols(data: &'a [f32], width: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: width,
        }
    }
}

/// `dst[m × n] (+)= beta · a[m × k] · b[k × n]` (`dst` row-major and contiguous; added to when
/// `accumulate`), on this thread.
#[inline(always)]
fn gemm_tile(
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    (m, n, k): (usize, usize, usize),
    beta: f32,
) {
    assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // The last elements read, so the unsafe call below stays inside the slices.
    assert!((m - 1) * a.rs + (k - 1) * a.cs < a.data.len());
    assert!((k - 1) * b.rs + (n - 1) * b.cs < b.data.len());
    // SAFETY: every element read or written lies within its slice (checked above; strides and
    // sizes are non-negative), and `dst` aliases neither input (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
