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
//! Work is split into fixed items — (batch entry, query block) in the forward, batch entries in
//! the backward, where each owns its rows of `dq`, `dk` and `dv` — and each item's arithmetic is
//! the same whichever thread runs it: results are bit-identical on any number of threads.

use super::kernels::dropout_row_starts;
use super::layout::{buffer, numel, Result};
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

/// The forward: the output `[..., queries, dv]` and the row log-sum-exps `[..., queries]`.
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
    } = dims;
    let lead = &q.shape[..q.shape.len() - 2];
    let out_shape = [lead, &[queries, dv]].concat();
    let lse_shape = [lead, &[queries]].concat();
    let mut out = buffer(numel(OP, &out_shape)?);
    let mut lse = buffer(numel(OP, &lse_shape)?);
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
    // Each item's rows of the results, handed to whichever thread runs it (the locks are never
    // contended: the ranges `par_ranges` deals out are disjoint).
    let blocks = queries.div_ceil(BQ);
    let mut slots = Vec::with_capacity(batch * blocks);
    let (mut o_rest, mut l_rest) = (&mut out[..], &mut lse[..]);
    for _ in 0..batch {
        for block in 0..blocks {
            let n = block_rows(block, queries).len();
            let (o, o_next) = std::mem::take(&mut o_rest).split_at_mut(n * dv);
            let (l, l_next) = std::mem::take(&mut l_rest).split_at_mut(n);
            (o_rest, l_rest) = (o_next, l_next);
            slots.push(Mutex::new((o, l)));
        }
    }
    // Multiply-adds, scaled as `matmul.rs` scales them against an elementwise op's element.
    let work = batch
        .saturating_mul(queries)
        .saturating_mul(keys)
        .saturating_mul(d + dv)
        / 16;
    par_ranges(
        threads.max(1),
        slots.len(),
        work,
        #[inline(always)]
        |items| {
            let mut tile = Tile::new(mask.dropout.is_some());
            for it in items {
                let (b, rows) = (it / blocks, block_rows(it % blocks, queries));
                let operands = Operands::of(&dims, b, q, k, v);
                let mut slot = lock(&slots[it]);
                let (o, l) = &mut *slot;
                forward_block(
                    &dims,
                    &mask,
                    spec.factor as f32,
                    &operands,
                    (b, rows),
                    &mut tile,
                    (o, l),
                );
            }
        },
    );
    drop(slots);
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
    let lead = &q.shape[..q.shape.len() - 2];
    let out_shape = [lead, &[dims.queries, dims.dv]].concat();
    let lse_shape = [lead, &[dims.queries]].concat();
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
                "the log-sum-exps are {:?}, but q {:?} has {lse_shape:?} rows",
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
    } = dims;
    let mut dq = buffer(q.data.len());
    let mut dk = buffer(k.data.len());
    let mut dvs = buffer(v.data.len());
    if dq.is_empty() && dk.is_empty() && dvs.is_empty() {
        // Nothing to compute (and `batch` may be any size: no slots are made for it).
        let zeros = |t: &Tensor| Tensor {
            shape: t.shape.clone(),
            data: Vec::new(),
        };
        return Ok((zeros(q), zeros(k), zeros(v)));
    }
    // Each batch entry's gradients, for whichever thread runs it (as in the forward).
    let slots: Vec<_> = parts(&mut dq, queries * d, batch)
        .zip(parts(&mut dk, keys * d, batch))
        .zip(parts(&mut dvs, keys * dv, batch))
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
                    out: &out.data[b * queries * dv..(b + 1) * queries * dv],
                    dout: &dout.data[b * queries * dv..(b + 1) * queries * dv],
                    lse: &lse.data[b * queries..(b + 1) * queries],
                };
                let mut grads = lock(&slots[b]);
                backward_entry(
                    &dims,
                    &mask,
                    spec.factor as f32,
                    &saved,
                    b,
                    &mut grads,
                    &mut tile,
                );
            }
        },
    );
    drop(slots);
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

/// A dropout mask on the probabilities `[..., queries, keys]`.
struct Dropout {
    /// The counter of each probability row's first element (`batch · queries` rows).
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
            let probs = [&q_shape[..q_shape.len() - 2], &[dims.queries, dims.keys]].concat();
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
fn parts(buf: &mut [f32], len: usize, count: usize) -> impl Iterator<Item = &mut [f32]> {
    let mut rest = buf;
    (0..count).map(move |_| {
        let (part, next) = std::mem::take(&mut rest).split_at_mut(len);
        rest = next;
        part
    })
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

/// One batch entry's operands.
struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
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
            q: &q.data[b * queries * d..(b + 1) * queries * d],
            k: &k.data[b * keys * d..(b + 1) * keys * d],
            v: &v.data[b * keys * dv..(b + 1) * keys * dv],
        }
    }
}

/// A forward item's scratch: the scores tile and a query block's running statistics (its
/// output, unnormalised while the keys are swept, accumulates in place).
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
}

impl Tile {
    fn new(dropout: bool) -> Tile {
        Tile {
            s: vec![0.0; BQ * BK],
            keep: vec![0.0; if dropout { BQ } else { 0 }],
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
            tile_max: vec![0.0; BQ],
            shift: vec![0.0; BQ],
            alpha: vec![0.0; BQ],
            sum: vec![0.0; BQ],
        }
    }
}

/// The output rows `rows` of batch entry `b` and their log-sum-exps, into `out` and `lse`.
#[inline(always)]
fn forward_block(
    dims: &AttentionDims,
    mask: &Mask,
    factor: f32,
    x: &Operands,
    (b, rows): (usize, std::ops::Range<usize>),
    tile: &mut Tile,
    (out, lse): (&mut [f32], &mut [f32]),
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
    } = tile;
    let (m, l) = (&mut m[..mq], &mut l[..mq]);
    let (tile_max, shift, alpha, sum) = (
        &mut tile_max[..mq],
        &mut shift[..mq],
        &mut alpha[..mq],
        &mut sum[..mq],
    );
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let qt = &x.q[i0 * d..(i0 + mq) * d];
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
            Mat::rows(&x.k[j0 * d..j1 * d], d),
            Mat::cols(qt, d),
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
            Mat::rows(&x.v[j0 * dv..j1 * dv], dv),
            (mq, dv, nk),
            1.0,
        );
    }
    for (r, (&m, &l)) in m.iter().zip(&*l).enumerate() {
        let inv = if l > 0.0 { (1.0 / l) as f32 } else { 0.0 };
        for o in &mut out[r * dv..(r + 1) * dv] {
            *o *= inv;
        }
        lse[r] = (m as f64 + l.ln()) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward

/// What the backward reads of one batch entry.
struct SavedRows<'a> {
    operands: Operands<'a>,
    out: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

/// One batch entry's gradients, written by the item that owns it.
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
        }
    }
}

/// Batch entry `b`'s gradients: key blocks outermost, so that each block's `dk` and `dv` rows
/// are summed over the query blocks in place; `dq` gathers every key block's share.
#[inline(always)]
fn backward_entry(
    dims: &AttentionDims,
    mask: &Mask,
    factor: f32,
    x: &SavedRows,
    b: usize,
    g: &mut Grads,
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
        let row = i * dv..(i + 1) * dv;
        *delta = math::sum_zip(&x.dout[row.clone()], &x.out[row], |a, b| {
            a as f64 * b as f64
        }) as f32;
    }
    for j0 in (0..keys).step_by(BK) {
        let j1 = (j0 + BK).min(keys);
        let nk = j1 - j0;
        let (kt, vt) = (&k[j0 * d..j1 * d], &v[j0 * dv..j1 * dv]);
        let dk = &mut g.dk[j0 * d..j1 * d];
        let dvt = &mut g.dv[j0 * dv..j1 * dv];
        // The first query row that sees key j0.
        let first = if mask.causal {
            (j0 + queries).saturating_sub(keys)
        } else {
            0
        };
        for i0 in (first..queries).step_by(BQ) {
            let i1 = (i0 + BQ).min(queries);
            let mq = i1 - i0;
            let (qt, dot) = (&q[i0 * d..i1 * d], &x.dout[i0 * dv..i1 * dv]);
            let p = &mut tile.p[..mq * nk];
            gemm_tile(
                p,
                false,
                Mat::rows(qt, d),
                Mat::cols(kt, d),
                (mq, nk, d),
                factor,
            );
            let ds = &mut tile.ds[..mq * nk];
            // dZ = dout · vᵀ
            gemm_tile(
                ds,
                false,
                Mat::rows(dot, dv),
                Mat::cols(vt, dv),
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
                Mat::rows(dot, dv),
                (nk, dv, mq),
                1.0,
            );
            // dq += factor · dS · k
            gemm_tile(
                &mut g.dq[i0 * d..i1 * d],
                true,
                Mat::rows(ds, nk),
                Mat::rows(kt, d),
                (mq, d, nk),
                factor,
            );
            // dk += factor · dSᵀ · q
            gemm_tile(
                dk,
                true,
                Mat::cols(ds, nk),
                Mat::rows(qt, d),
                (nk, d, mq),
                factor,
            );
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
