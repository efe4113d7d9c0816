//! Every op's local computation in `f32`, forward and backward, agreeing with the reference
//! evaluator ([`ferrotron_ir::reference`]) to a few `f32` ulps (`runtime/cpu/tests/kernels.rs`
//! checks every op to 1e-5 relative).
//!
//! [`eval`] takes one op on this rank's tensors and returns its outputs. What depends on the
//! rank's place in the full tensors (a vocabulary-parallel table's first row, a dropout shard's
//! offsets, how many token shards a mean spans) comes in a [`Placement`]. Collectives and
//! `LocalSlice` are the rank program's ([`KernelError::NotLocal`]); a vocabulary-parallel
//! cross-entropy is computed in phases around the rank program's reductions: [`ce_row_max`],
//! then [`ce_row_sums`] with the group's max, then the loss
//! ([`ferrotron_exec::kernel::ce_loss`]) or [`ce_grad`] with the group's sums.
//!
//! Numerics: reductions (row statistics of norms and softmax, the sums of `SumTo`, the
//! parameter gradients of norms, embedding-gradient rows, the loss) accumulate in `f64`; norms
//! normalize in `f64`; exact GeLU is evaluated in `f64` (`Φ` to 2e-7 relative); softmax,
//! cross-entropy, GeluTanh and SiLU use a vectorizable `f32` `exp` accurate to ~1 ulp
//! (`math.rs`); everything is stored as `f32`. Inputs are validated (shapes, axes, ids, targets) and every failure is a
//! [`KernelError`], never a panic.
//!
//! Performance: matmuls go through `gemm` (see `matmul.rs`); elementwise ops have fast paths
//! for equal shapes and for an operand repeated along leading axes (a bias); norms, softmax,
//! cross-entropy and dropout run row by row in loops that vectorize, compiled for AVX-512 or
//! AVX2 when the CPU has them (`par.rs`); large tensors are split by rows over the threads the
//! backend was given ([`crate::Cpu::threads`]).

use super::layout::{
    broadcast_strides, copied, expand, for_each_offset, is_trailing, numel, output, sum_to,
    transpose, zeros, Result,
};
use super::math::{self, exp, sum_map, sum_zip};
use super::matmul::matmul;
use super::par::{par_chunks, par_chunks_work};
use ferrotron_exec::fuse::Fused;
use ferrotron_exec::kernel::{
    ce_rows_of, check_bias, check_targets_shape, checked_index as index, invalid, mean_count,
    table_of, CeRows, KernelError, OrInvalid, Placement, RowStats, VocabShard,
};
use ferrotron_exec::Tensor;
use ferrotron_ir::index::{self, around, rows as rows_of};
use ferrotron_ir::op::{Activation, Op, RopeScaling};
use ferrotron_ir::Dim;
use std::ops::Deref;

/// A kernel's context: where the rank's tensors sit in the full ones, and the threads it may
/// use (0 and 1: this thread only; more: `gemm`'s rayon parallelism for matmuls, scoped threads
/// over rows for large elementwise and row-wise ops).
struct Local<'a> {
    at: &'a Placement,
    threads: usize,
}

impl Deref for Local<'_> {
    type Target = Placement;

    fn deref(&self) -> &Placement {
        self.at
    }
}

impl Local<'_> {
    fn n_threads(&self) -> usize {
        self.threads.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn check_tensor(op: &'static str, t: &Tensor) -> Result<()> {
    index::check_len(&t.shape, t.data.len()).or_invalid(op)
}

/// A tensor of `x`'s shape whose elements are `f(x)`, split over threads.
fn map(x: &Tensor, threads: usize, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
    let mut data = output(x.data.len());
    par_chunks(
        threads,
        &mut data,
        1,
        #[inline(always)]
        |first, chunk| {
            for (o, &v) in chunk.iter_mut().zip(&x.data[first..]) {
                *o = f(v);
            }
        },
    );
    Tensor {
        shape: x.shape.clone(),
        data,
    }
}

/// `acc + x` written over `acc` (one shape), split over threads: `Add`'s sums, without a new
/// buffer.
pub(crate) fn add_into(mut acc: Tensor, x: &Tensor, threads: usize) -> Result<Tensor> {
    if acc.shape != x.shape {
        return Err(invalid(
            "Add",
            format!(
                "adding in place needs one shape, got {:?} and {:?}",
                acc.shape, x.shape
            ),
        ));
    }
    par_chunks(
        threads,
        &mut acc.data,
        1,
        #[inline(always)]
        |first, chunk| {
            for (o, &y) in chunk.iter_mut().zip(&x.data[first..]) {
                *o += y;
            }
        },
    );
    Ok(acc)
}

/// `f(a, b)` elementwise over two tensors of one shape, split over threads.
fn zip_map(
    shape: &[usize],
    a: &[f32],
    b: &[f32],
    threads: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Tensor {
    let mut data = output(a.len());
    par_chunks(
        threads,
        &mut data,
        1,
        #[inline(always)]
        |first, chunk| {
            for ((o, &x), &y) in chunk.iter_mut().zip(&a[first..]).zip(&b[first..]) {
                *o = f(x, y);
            }
        },
    );
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

/// `$body` with `$f` bound to activation `$act`'s function and `$vjp` to its vector-Jacobian
/// product (`math.rs`), one copy per activation, so each loop is compiled for its function.
macro_rules! per_activation {
    ($act:expr, $f:ident, $vjp:ident => $body:expr) => {
        match $act {
            Activation::Gelu => {
                let ($f, $vjp) = (math::gelu, math::gelu_vjp);
                $body
            }
            Activation::GeluTanh => {
                let ($f, $vjp) = (math::gelu_tanh, math::gelu_tanh_vjp);
                $body
            }
            Activation::Silu => {
                let ($f, $vjp) = (math::silu, math::silu_vjp);
                $body
            }
            Activation::Relu => {
                let ($f, $vjp) = (math::relu, math::relu_vjp);
                $body
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The dispatcher

/// Evaluates one op's local computation; one tensor per output.
///
/// Collectives (`F`, `G`, `AllReduce`, `AllGather`, `ReduceScatter`) and `LocalSlice` are the
/// rank program's: they return [`KernelError::NotLocal`]. Every other op is computed here, with
/// the rank-dependent facts in `at`, on up to `threads` threads.
pub fn eval(
    op: &Op<&Tensor, Dim>,
    at: &Placement,
    threads: usize,
) -> Result<Vec<Tensor>, KernelError> {
    let local = &Local { at, threads };
    let name = op.mnemonic();
    for t in op.inputs() {
        check_tensor(name, t)?;
    }
    let th = local.n_threads();
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Embedding { table, ids } => one(embedding(name, table, ids, local)?),
        Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        } => one(matmul(a, b, *transpose_a, *transpose_b, th)?),
        Op::Add(a, b) => one(binary(name, a, b, th, |x, y| x + y)?),
        Op::Sub(a, b) => one(binary(name, a, b, th, |x, y| x - y)?),
        Op::Mul(a, b) => one(binary(name, a, b, th, |x, y| x * y)?),
        Op::Div(a, b) => one(binary(name, a, b, th, |x, y| x / y)?),
        Op::Scale { x, factor } => {
            let f = index::scale(factor).or_invalid(name)?;
            one(map(x, th, |v| (v as f64 * f) as f32))
        }
        Op::Gelu(x) => one(map(x, th, math::gelu)),
        Op::GeluTanh(x) => one(map(x, th, math::gelu_tanh)),
        Op::Silu(x) => one(map(x, th, math::silu)),
        Op::Relu(x) => one(map(x, th, math::relu)),
        Op::LayerNorm {
            x,
            weight,
            bias,
            eps,
        } => one(norm_forward(name, x, *weight, *bias, *eps, true, th)?),
        Op::RmsNorm { x, weight, eps } => {
            one(norm_forward(name, x, *weight, None, *eps, false, th)?)
        }
        Op::Softmax { x, causal } => one(softmax(name, x, *causal, None, th)?),
        Op::Reshape { x, shape } => one(Tensor {
            shape: index::reshape(&x.shape, shape).or_invalid(name)?,
            data: copied(&x.data),
        }),
        Op::Transpose { x, perm } => one(transpose(name, x, perm, th)?),
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
        } => one(rotary(name, x, (*base, scaling.as_ref()), *inverse, local)?),
        Op::Dropout { x, p } => one(dropout(name, x, *p, local)?),
        Op::DropoutGrad { dy, forward, p } => {
            index::same_shape("the gradient", &forward.shape, &dy.shape).or_invalid(name)?;
            one(dropout(name, dy, *p, local)?)
        }
        Op::CrossEntropy {
            logits,
            targets,
            shift,
            classes,
        } => {
            let shard = whole(name, logits, classes.as_ref(), *shift, local)?;
            let max = row_max(name, logits, &shard, th)?;
            let (sum, target) = row_sums(name, logits, &max, targets, &shard, th)?;
            let stats = RowStats { max, sum, target };
            let loss = ferrotron_exec::kernel::ce_loss(&stats, &logits.shape, &shard)?;
            one(Tensor {
                shape: Vec::new(),
                data: vec![loss].into(),
            })
        }
        Op::CrossEntropyGrad {
            logits,
            targets,
            dloss,
            shift,
            classes,
        } => {
            let shard = whole(name, logits, classes.as_ref(), *shift, local)?;
            index::same_shape("the loss gradient", &[], &dloss.shape).or_invalid(name)?;
            let max = row_max(name, logits, &shard, th)?;
            let (sum, _) = row_sums(name, logits, &max, targets, &shard, th)?;
            let grad = grad(
                name,
                GradInto::New(logits),
                targets,
                (&max, &sum),
                &shard,
                dloss.data[0],
                th,
            )?;
            one(grad)
        }
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::F { .. }
        | Op::G { .. }
        | Op::LocalSlice { .. } => Err(KernelError::NotLocal { op: name }),
        Op::SumTo { x, shape } => one(sum_to(name, x, &index::dims(shape).or_invalid(name)?, th)?),
        Op::Expand { x, shape } => one(expand(name, x, &index::dims(shape).or_invalid(name)?, th)?),
        Op::Fill {
            shape,
            value,
            dtype,
        } => {
            let v = *value as f32;
            index::fill(*value, *dtype, v.is_finite()).or_invalid(name)?;
            let shape = index::dims(shape).or_invalid(name)?;
            let mut data = output(numel(name, &shape)?);
            data.fill(v);
            one(Tensor { shape, data })
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
                .ok_or_else(|| invalid(name, "the padded size overflows"))?;
            let mut out = zeros(name, shape)?;
            let (outer, n, inner) = around(&x.shape, a);
            let m = out.shape[a];
            for o in 0..outer {
                let src = &x.data[o * n * inner..(o + 1) * n * inner];
                let dst = (o * m + before) * inner;
                out.data[dst..dst + n * inner].copy_from_slice(src);
            }
            one(out)
        }
        Op::ActGrad { act: a, x, dy } => {
            index::same_shape("the gradient", &x.shape, &dy.shape).or_invalid(name)?;
            let shape = &x.shape;
            let (x, dy) = (&x.data, &dy.data);
            one(per_activation!(a, _f, vjp => zip_map(shape, x, dy, th, vjp)))
        }
        Op::LayerNormGrad { x, weight, dy, eps } => norm_grad(name, x, *weight, dy, *eps, true, th),
        Op::RmsNormGrad { x, weight, dy, eps } => norm_grad(name, x, *weight, dy, *eps, false, th),
        Op::SoftmaxGrad { y, dy } => one(softmax_grad(name, y, dy, None, th)?),
        Op::EmbeddingGrad { table, ids, dy } => one(embedding_grad(name, table, ids, dy, local)?),
    }
}

// ---------------------------------------------------------------------------------------------
// Fused ops

/// Evaluates a fused op (see [`ferrotron_exec::fuse`]) on up to `threads` threads: the unfused
/// pair's arithmetic in the same order, the intermediate rounded to `f32` as it would have been
/// stored, so the result is bit-identical to running the two ops, in one pass over memory.
pub fn eval_fused(op: &Fused<&Tensor>, threads: usize) -> Result<Tensor> {
    let name = op.mnemonic();
    for t in op.inputs() {
        check_tensor(name, t)?;
    }
    let th = threads.max(1);
    match op {
        Fused::BiasAct { act, x, bias } => {
            check_bias(name, &x.shape, &bias.shape)?;
            Ok(per_activation!(act, f, _vjp => bias_map(x, bias, th, f)))
        }
        Fused::BiasActGrad { act, x, bias, dy } => {
            check_bias(name, &x.shape, &bias.shape)?;
            index::same_shape("the gradient", &x.shape, &dy.shape).or_invalid(name)?;
            Ok(per_activation!(act, _f, vjp => bias_zip(x, bias, dy, th, vjp)))
        }
        Fused::ScaledSoftmax { x, factor, causal } => softmax(name, x, *causal, Some(*factor), th),
        Fused::ScaledSoftmaxGrad { y, dy, factor } => softmax_grad(name, y, dy, Some(*factor), th),
        // Its table's rows are this rank's by a placement: `Backend::embedding_grad_add`.
        Fused::EmbeddingGradAdd { .. } => Err(invalid(
            name,
            "runs through Backend::embedding_grad_add, which places the table",
        )),
        // Two or three outputs and a placed dropout mask: `Backend::attention(_grad)`.
        Fused::Attention { .. } | Fused::AttentionGrad { .. } => Err(invalid(
            name,
            "runs through Backend::attention and Backend::attention_grad",
        )),
        // A loop over chunks of rows with the group's reductions between: the executor's.
        Fused::OutputLoss { .. } => Err(invalid(name, "runs as the executor's loop of chunks")),
        // Its dropout's mask is placed: `Backend::bias_dropout_add`.
        Fused::BiasDropoutAdd { .. } => Err(invalid(
            name,
            "runs through Backend::bias_dropout_add, which places the mask",
        )),
    }
}

/// `f(x + bias)` row by row (the sum rounded to `f32`, as `Add` stores it).
fn bias_map(x: &Tensor, bias: &Tensor, threads: usize, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
    let n = bias.data.len();
    let mut data = output(x.data.len());
    if n > 0 {
        par_chunks(
            threads,
            &mut data,
            n,
            #[inline(always)]
            |first, chunk| {
                let xs = &x.data[first * n..first * n + chunk.len()];
                for (o, xr) in chunk.chunks_exact_mut(n).zip(xs.chunks_exact(n)) {
                    for ((o, &v), &b) in o.iter_mut().zip(xr).zip(&bias.data) {
                        *o = f(v + b);
                    }
                }
            },
        );
    }
    Tensor {
        shape: x.shape.clone(),
        data,
    }
}

/// `f(x + bias, dy)` row by row.
fn bias_zip(
    x: &Tensor,
    bias: &Tensor,
    dy: &Tensor,
    threads: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Tensor {
    let n = bias.data.len();
    let mut data = output(x.data.len());
    if n > 0 {
        par_chunks(
            threads,
            &mut data,
            n,
            #[inline(always)]
            |first, chunk| {
                let range = first * n..first * n + chunk.len();
                let (xs, gs) = (&x.data[range.clone()], &dy.data[range]);
                for ((o, xr), gr) in chunk
                    .chunks_exact_mut(n)
                    .zip(xs.chunks_exact(n))
                    .zip(gs.chunks_exact(n))
                {
                    for (((o, &v), &b), &g) in o.iter_mut().zip(xr).zip(&bias.data).zip(gr) {
                        *o = f(v + b, g);
                    }
                }
            },
        );
    }
    Tensor {
        shape: x.shape.clone(),
        data,
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

/// `f(a, b)` with NumPy broadcasting: equal shapes and an operand repeated along leading axes
/// (a bias, a scalar) take fast paths; anything else runs row by row with strides.
fn binary(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    threads: usize,
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> Result<Tensor> {
    let shape = index::binary(&a.shape, &b.shape).or_invalid(name)?;
    let n = numel(name, &shape)?;
    if a.data.len() == n && b.data.len() == n && a.shape.len() == b.shape.len() {
        // Equal shapes (broadcasting leaves nothing to repeat).
        return Ok(zip_map(&shape, &a.data, &b.data, threads, f));
    }
    let mut out = output(n);
    if n == 0 {
        return Ok(Tensor { shape, data: out });
    }
    if a.data.len() == n && is_trailing(&b.shape, &shape) {
        repeat_rows(&mut out, &a.data, &b.data, threads, f);
    } else if b.data.len() == n && is_trailing(&a.shape, &shape) {
        repeat_rows(&mut out, &b.data, &a.data, threads, move |y, x| f(x, y));
    } else {
        let r = shape.len();
        let sa = broadcast_strides(&a.shape, &shape);
        let sb = broadcast_strides(&b.shape, &shape);
        let (last, la, lb) = (shape[r - 1], sa[r - 1], sb[r - 1]);
        let mut rows = out.chunks_exact_mut(last);
        for_each_offset(&shape[..r - 1], [&sa[..r - 1], &sb[..r - 1]], |[oa, ob]| {
            let row = rows.next().expect("one row per outer index");
            for (j, o) in row.iter_mut().enumerate() {
                *o = f(a.data[oa + j * la], b.data[ob + j * lb]);
            }
        });
    }
    Ok(Tensor { shape, data: out })
}

/// `out[i] = f(full[i], small[i % small.len()])`.
fn repeat_rows(
    out: &mut [f32],
    full: &[f32],
    small: &[f32],
    threads: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    let n = small.len();
    if n == 1 {
        let s = small[0];
        par_chunks(
            threads,
            out,
            1,
            #[inline(always)]
            |first, chunk| {
                for (o, &x) in chunk.iter_mut().zip(&full[first..]) {
                    *o = f(x, s);
                }
            },
        );
        return;
    }
    par_chunks(
        threads,
        out,
        n,
        #[inline(always)]
        |first, chunk| {
            let full = &full[first * n..];
            for (o, x) in chunk.chunks_exact_mut(n).zip(full.chunks_exact(n)) {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(small) {
                    *o = f(x, y);
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Norms and softmax

/// The shape of an optional tensor.
fn shape_of(t: Option<&Tensor>) -> Option<&[usize]> {
    t.map(|t| &t.shape[..])
}

/// `(mean, 1/σ)` of one row in `f64`: `σ = √(var + eps)` around the mean (LayerNorm,
/// `centered`) or `√(mean(x²) + eps)` (RMSNorm, mean 0).
fn row_stats(row: &[f32], eps: f64, centered: bool) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = if centered {
        sum_map(row, |v| v as f64) / n
    } else {
        0.0
    };
    let var = sum_map(row, |v| {
        let d = v as f64 - mean;
        d * d
    }) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn norm_forward(
    name: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    centered: bool,
    threads: usize,
) -> Result<Tensor> {
    let (_, n) =
        index::norm(&x.shape, eps, None, shape_of(weight), shape_of(bias)).or_invalid(name)?;
    let mut out = output(x.data.len());
    par_chunks(
        threads,
        &mut out,
        n,
        #[inline(always)]
        |first, chunk| {
            for (i, o) in chunk.chunks_exact_mut(n).enumerate() {
                let r = first + i;
                let row = &x.data[r * n..(r + 1) * n];
                let (mean, inv) = row_stats(row, eps, centered);
                match (weight, bias) {
                    (Some(w), Some(b)) => {
                        for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(&w.data).zip(&b.data) {
                            *o = ((v as f64 - mean) * inv * w as f64 + b as f64) as f32;
                        }
                    }
                    (Some(w), None) => {
                        for ((o, &v), &w) in o.iter_mut().zip(row).zip(&w.data) {
                            *o = ((v as f64 - mean) * inv * w as f64) as f32;
                        }
                    }
                    (None, Some(b)) => {
                        for ((o, &v), &b) in o.iter_mut().zip(row).zip(&b.data) {
                            *o = ((v as f64 - mean) * inv + b as f64) as f32;
                        }
                    }
                    (None, None) => {
                        for (o, &v) in o.iter_mut().zip(row) {
                            *o = ((v as f64 - mean) * inv) as f32;
                        }
                    }
                }
            }
        },
    );
    Ok(Tensor {
        shape: x.shape.clone(),
        data: out,
    })
}

/// LayerNorm's (`centered`) or RMSNorm's VJP: `dx`, `dweight = Σ dy·x̂` and, for LayerNorm,
/// `dbias = Σ dy`, the sums over every leading position (in `f64`, per thread, then combined).
fn norm_grad(
    name: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    dy: &Tensor,
    eps: f64,
    centered: bool,
    threads: usize,
) -> Result<Vec<Tensor>> {
    let (_, n) =
        index::norm(&x.shape, eps, Some(&dy.shape), shape_of(weight), None).or_invalid(name)?;
    let mut dx = output(x.data.len());
    let partials = par_chunks(
        threads,
        &mut dx,
        n,
        #[inline(always)]
        |first, chunk| {
            let mut dw = vec![0f64; n];
            let mut db = vec![0f64; if centered { n } else { 0 }];
            let mut xhat = vec![0f64; n];
            let mut g = vec![0f64; n];
            for (i, dx) in chunk.chunks_exact_mut(n).enumerate() {
                let r = first + i;
                let row = &x.data[r * n..(r + 1) * n];
                let dys = &dy.data[r * n..(r + 1) * n];
                let (mean, inv) = row_stats(row, eps, centered);
                for (xh, &v) in xhat.iter_mut().zip(row) {
                    *xh = (v as f64 - mean) * inv;
                }
                match weight {
                    Some(w) => {
                        for ((g, &d), &w) in g.iter_mut().zip(dys).zip(&w.data) {
                            *g = d as f64 * w as f64;
                        }
                    }
                    None => {
                        for (g, &d) in g.iter_mut().zip(dys) {
                            *g = d as f64;
                        }
                    }
                }
                let mean_g = if centered {
                    math::sum_f64(&g) / n as f64
                } else {
                    0.0
                };
                let mean_gx = math::dot_f64(&g, &xhat) / n as f64;
                for ((dx, &g), &xh) in dx.iter_mut().zip(&g).zip(&xhat) {
                    *dx = (inv * (g - mean_g - xh * mean_gx)) as f32;
                }
                for ((dw, &d), &xh) in dw.iter_mut().zip(dys).zip(&xhat) {
                    *dw += d as f64 * xh;
                }
                for (db, &d) in db.iter_mut().zip(dys) {
                    *db += d as f64;
                }
            }
            (dw, db)
        },
    );
    let mut dw = vec![0f64; n];
    let mut db = vec![0f64; n];
    for (pw, pb) in partials {
        for (a, v) in dw.iter_mut().zip(pw) {
            *a += v;
        }
        for (a, v) in db.iter_mut().zip(pb) {
            *a += v;
        }
    }
    let to_tensor = |v: Vec<f64>| {
        let mut data = output(n);
        for (d, v) in data.iter_mut().zip(v) {
            *d = v as f32;
        }
        Tensor {
            shape: vec![n],
            data,
        }
    };
    let dx = Tensor {
        shape: x.shape.clone(),
        data: dx,
    };
    Ok(if centered {
        vec![dx, to_tensor(dw), to_tensor(db)]
    } else {
        vec![dx, to_tensor(dw)]
    })
}

/// Softmax over the last axis; `causal`: query `i` (axis −2) sees keys `0..=i + keys − queries`,
/// the rest are 0. With `factor`, of `x · factor` (each product rounded to `f32`, as `Scale`
/// stores it).
fn softmax(
    name: &'static str,
    x: &Tensor,
    causal: bool,
    factor: Option<f64>,
    threads: usize,
) -> Result<Tensor> {
    let (_, keys, queries) = index::softmax(&x.shape, causal).or_invalid(name)?;
    let mut out = output(x.data.len());
    par_chunks(
        threads,
        &mut out,
        keys,
        #[inline(always)]
        |first, chunk| {
            let mut scaled = Vec::new();
            for (i, o) in chunk.chunks_exact_mut(keys).enumerate() {
                let r = first + i;
                let visible = if causal {
                    r % queries + (keys - queries) + 1
                } else {
                    keys
                };
                let mut row = &x.data[r * keys..r * keys + visible];
                if let Some(f) = factor {
                    scaled.clear();
                    scaled.extend(row.iter().map(|&v| (v as f64 * f) as f32));
                    row = &scaled;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (o, masked) = o.split_at_mut(visible);
                let inv = (1.0 / math::exp_shifted(o, row, max)) as f32;
                for o in o.iter_mut() {
                    *o *= inv;
                }
                masked.fill(0.0);
            }
        },
    );
    Ok(Tensor {
        shape: x.shape.clone(),
        data: out,
    })
}

/// Softmax's VJP from its output, `y · (dy − Σ dy·y)` per row; with `factor`, that times
/// `factor` (the result rounded to `f32` first, as `SoftmaxGrad` stores it).
fn softmax_grad(
    name: &'static str,
    y: &Tensor,
    dy: &Tensor,
    factor: Option<f64>,
    threads: usize,
) -> Result<Tensor> {
    index::min_rank("the softmax output", &y.shape, 1).or_invalid(name)?;
    index::same_shape("the gradient", &y.shape, &dy.shape).or_invalid(name)?;
    let (_, n) = rows_of(&y.shape);
    let mut out = output(y.data.len());
    par_chunks(
        threads,
        &mut out,
        n,
        #[inline(always)]
        |first, chunk| {
            for (i, o) in chunk.chunks_exact_mut(n).enumerate() {
                let r = first + i;
                let (ys, gs) = (&y.data[r * n..(r + 1) * n], &dy.data[r * n..(r + 1) * n]);
                let dot = sum_zip(ys, gs, |y, g| y as f64 * g as f64);
                for (o, (&y, &g)) in o.iter_mut().zip(ys.iter().zip(gs)) {
                    *o = (y as f64 * (g as f64 - dot)) as f32;
                }
                if let Some(f) = factor {
                    for o in o.iter_mut() {
                        *o = (*o as f64 * f) as f32;
                    }
                }
            }
        },
    );
    Ok(Tensor {
        shape: y.shape.clone(),
        data: out,
    })
}

// ---------------------------------------------------------------------------------------------
// Copies

/// `x[start..end]` along axis `a` (bounds already checked).
fn slice_axis(x: &Tensor, a: usize, start: usize, end: usize) -> Tensor {
    let (outer, n, inner) = around(&x.shape, a);
    let mut shape = x.shape.clone();
    shape[a] = end - start;
    let chunk = (end - start) * inner;
    let mut data = output(outer * chunk);
    for (o, dst) in data.chunks_exact_mut(chunk.max(1)).enumerate().take(outer) {
        dst.copy_from_slice(&x.data[(o * n + start) * inner..(o * n + end) * inner]);
    }
    Tensor { shape, data }
}

fn concat(name: &'static str, xs: &[&Tensor], ax: i64) -> Result<Tensor> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
    let (a, shape) = index::concat(&shapes, ax).or_invalid(name)?;
    let n = numel(name, &shape)?;
    let mut data = output(n);
    let (outer, _, inner) = around(&xs[0].shape, a);
    let mut k = 0;
    for o in 0..outer {
        for x in xs {
            let chunk = x.shape[a] * inner;
            data[k..k + chunk].copy_from_slice(&x.data[o * chunk..(o + 1) * chunk]);
            k += chunk;
        }
    }
    Ok(Tensor { shape, data })
}

// ---------------------------------------------------------------------------------------------
// Embedding

fn embedding(name: &'static str, table: &Tensor, ids: &Tensor, local: &Local) -> Result<Tensor> {
    let t = table_of(name, &table.shape, local)?;
    let rows: Vec<Option<usize>> = ids
        .data
        .iter()
        .enumerate()
        .map(|(k, &id)| t.local_row(name, id, k))
        .collect::<Result<_>>()?;
    let mut shape = ids.shape.clone();
    shape.push(t.width);
    let mut out = zeros(name, shape)?;
    let w = t.width;
    par_chunks(
        local.n_threads(),
        &mut out.data,
        w,
        #[inline(always)]
        |first, chunk| {
            for (o, row) in chunk.chunks_exact_mut(w).zip(&rows[first..]) {
                if let Some(row) = row {
                    o.copy_from_slice(&table.data[row * w..(row + 1) * w]);
                }
            }
        },
    );
    Ok(out)
}

fn embedding_grad(
    name: &'static str,
    table: &Tensor,
    ids: &Tensor,
    dy: &Tensor,
    local: &Local,
) -> Result<Tensor> {
    let mut out = zeros(name, table.shape.clone())?;
    scatter_rows(name, (table, ids, dy), local, &mut out.data, |o, s| *o = s)?;
    Ok(out)
}

/// `acc + EmbeddingGrad { table, ids, dy }` in `acc`'s buffer: each row some id looks up gets
/// that row's sum added, rounded as the unfused pair rounds it (the sum to `f32`, then the
/// addition); the other rows are untouched (where the unfused sum would add `+0.0`: the same
/// values, a `-0.0` kept).
pub fn embedding_grad_add(
    mut acc: Tensor,
    (table, ids, dy): (&Tensor, &Tensor, &Tensor),
    at: &Placement,
    threads: usize,
) -> Result<Tensor> {
    const NAME: &str = "EmbeddingGradAdd";
    for t in [&acc, table, ids, dy] {
        check_tensor(NAME, t)?;
    }
    index::same_shape("the sum", &table.shape, &acc.shape).or_invalid(NAME)?;
    let local = &Local { at, threads };
    scatter_rows(NAME, (table, ids, dy), local, &mut acc.data, |o, s| *o += s)?;
    Ok(acc)
}

/// The embedding's gradient row by row into `out` (the table's shape): for each local row some
/// id looks up, the sum of `dy` over those ids (in `f64`, rounded to `f32` once) combined into
/// the row by `put`.
fn scatter_rows(
    name: &'static str,
    (table, ids, dy): (&Tensor, &Tensor, &Tensor),
    local: &Local,
    out: &mut [f32],
    put: impl Fn(&mut f32, f32),
) -> Result<()> {
    let t = table_of(name, &table.shape, local)?;
    let w = t.width;
    let mut expected = ids.shape.clone();
    expected.push(w);
    index::same_shape("the output gradient", &expected, &dy.shape).or_invalid(name)?;
    // (local row, position) of every id this rank holds, grouped by row: each row's sum is
    // accumulated in f64 and written once.
    let mut hits = Vec::with_capacity(ids.data.len());
    for (k, &id) in ids.data.iter().enumerate() {
        if let Some(row) = t.local_row(name, id, k)? {
            hits.push((row, k));
        }
    }
    hits.sort_unstable();
    let mut acc = vec![0f64; w];
    for group in hits.chunk_by(|a, b| a.0 == b.0) {
        acc.fill(0.0);
        for &(_, k) in group {
            for (a, &g) in acc.iter_mut().zip(&dy.data[k * w..(k + 1) * w]) {
                *a += g as f64;
            }
        }
        let row = group[0].0;
        for (o, &a) in out[row * w..(row + 1) * w].iter_mut().zip(&acc) {
            put(o, a as f32);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rotary and dropout

fn rotary(
    name: &'static str,
    x: &Tensor,
    (base, scaling): (f64, Option<&RopeScaling>),
    inverse: bool,
    local: &Local,
) -> Result<Tensor> {
    let (seq, heads, head_dim) = index::rotary(&x.shape, base).or_invalid(name)?;
    if let Some(s) = scaling {
        index::rope_scaling(s).or_invalid(name)?;
    }
    let r = x.rank();
    let first_pos = match &local.offsets {
        None => 0,
        Some(o) if o.len() == r => o[r - 3],
        Some(o) => {
            return Err(invalid(
                name,
                format!("offsets {o:?} do not fit the shape {:?}", x.shape),
            ))
        }
    };
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    // (cos, sin) per (position, pair), computed in f64 as the reference does.
    let mut table = Vec::with_capacity(seq * half);
    for pos in 0..seq {
        let p = (first_pos + pos) as f64;
        for i in 0..half {
            let theta = sign * p * index::rotary_frequency(i, head_dim, base, scaling);
            let (s, c) = theta.sin_cos();
            table.push((c as f32, s as f32));
        }
    }
    let slab = heads * head_dim;
    let mut out = output(x.data.len());
    par_chunks(
        local.n_threads(),
        &mut out,
        slab,
        #[inline(always)]
        |first, chunk| {
            for (i, o) in chunk.chunks_exact_mut(slab).enumerate() {
                let row = first + i;
                let cs = &table[(row % seq) * half..(row % seq + 1) * half];
                let src = &x.data[row * slab..(row + 1) * slab];
                for (o, src) in o.chunks_exact_mut(head_dim).zip(src.chunks_exact(head_dim)) {
                    let (o1, o2) = o.split_at_mut(half);
                    let (x1, x2) = src.split_at(half);
                    for ((((o1, o2), &x1), &x2), &(c, s)) in
                        o1.iter_mut().zip(o2).zip(x1).zip(x2).zip(cs)
                    {
                        *o1 = x1 * c - x2 * s;
                        *o2 = x2 * c + x1 * s;
                    }
                }
            }
        },
    );
    Ok(Tensor {
        shape: x.shape.clone(),
        data: out,
    })
}

/// `x` through the dropout mask of its place in the full tensor, kept elements scaled by
/// `1/(1 − p)` (Dropout on its input, DropoutGrad on the gradient).
fn dropout(name: &'static str, x: &Tensor, p: f64, local: &Local) -> Result<Tensor> {
    let scale = index::dropout_scale(p).or_invalid(name)? as f32;
    let row_starts = dropout_row_starts(name, &x.shape, local.at)?;
    // Keep iff splitmix64(i) / 2^64 >= p, as `dropout_keeps` decides, tested on the integer.
    let threshold = ferrotron_ir::reference::keep_threshold(p);
    let (_, last) = rows_of(&x.shape);
    let mut out = output(x.data.len());
    par_chunks(
        local.n_threads(),
        &mut out,
        last,
        #[inline(always)]
        |first, chunk| {
            for (i, o) in chunk.chunks_exact_mut(last).enumerate() {
                let row = first + i;
                let src = &x.data[row * last..(row + 1) * last];
                math::dropout_row(o, src, row_starts[row], threshold, scale);
            }
        },
    );
    Ok(Tensor {
        shape: x.shape.clone(),
        data: out,
    })
}

/// `residual + dropout(x + bias)` in one pass ([`ferrotron_exec::fuse::Fused::BiasDropoutAdd`]):
/// the mask the unfused `Dropout` of `x + bias` draws at `at`, the values the three ops give.
pub fn bias_dropout_add(
    (x, bias, residual): (&Tensor, &Tensor, &Tensor),
    p: f64,
    at: &Placement,
    threads: usize,
) -> Result<Tensor> {
    const NAME: &str = "BiasDropoutAdd";
    for t in [x, bias, residual] {
        check_tensor(NAME, t)?;
    }
    check_bias(NAME, &x.shape, &bias.shape)?;
    index::same_shape("the residual", &x.shape, &residual.shape).or_invalid(NAME)?;
    let scale = index::dropout_scale(p).or_invalid(NAME)? as f32;
    let row_starts = dropout_row_starts(NAME, &x.shape, at)?;
    let threshold = ferrotron_ir::reference::keep_threshold(p);
    let (_, last) = rows_of(&x.shape);
    let mut out = output(x.data.len());
    if last > 0 {
        par_chunks(
            threads.max(1),
            &mut out,
            last,
            #[inline(always)]
            |first, chunk| {
                for (i, o) in chunk.chunks_exact_mut(last).enumerate() {
                    let row = first + i;
                    let span = row * last..(row + 1) * last;
                    let rows = (&x.data[span.clone()], &bias.data[..], &residual.data[span]);
                    math::bias_dropout_add_row(o, rows, row_starts[row], threshold, scale);
                }
            },
        );
    }
    Ok(Tensor {
        shape: x.shape.clone(),
        data: out,
    })
}

/// The dropout counter of the first element of each row (along the last axis) of a tensor of
/// `shape` placed in the full tensor as `at` says: element `j` of row `r` is kept iff
/// `splitmix64(starts[r] + j) >= keep_threshold(p)` (wrapping). `Dropout` draws its mask from
/// these, and so does the fused attention, so the two drop the same elements.
pub(crate) fn dropout_row_starts(
    name: &'static str,
    shape: &[usize],
    at: &Placement,
) -> Result<Vec<u64>> {
    let r = shape.len();
    let (full, offsets) = match (&at.full_shape, &at.offsets) {
        (None, None) => (shape.to_vec(), vec![0; r]),
        (Some(f), None) => (f.clone(), vec![0; r]),
        (Some(f), Some(o)) => (f.clone(), o.clone()),
        (None, Some(_)) => return Err(invalid(name, "shard offsets without the full shape")),
    };
    let fits = full.len() == r
        && offsets.len() == r
        && (0..r).all(|i| {
            offsets[i]
                .checked_add(shape[i])
                .is_some_and(|end| end <= full[i])
        });
    if !fits || numel(name, &full).is_err() {
        return Err(invalid(
            name,
            format!(
                "a shard of shape {shape:?} at offsets {offsets:?} does not fit the full shape {full:?}"
            ),
        ));
    }
    let seed = at.dropout_seed.wrapping_mul(1 << 40);
    let strides = contiguous_strides_u64(&full);
    let (rows, _) = rows_of(shape);
    let base: u64 = offsets
        .iter()
        .zip(&strides)
        .map(|(&o, &s)| o as u64 * s)
        .sum();
    let mut row_starts = Vec::with_capacity(rows);
    let outer_strides: Vec<usize> = strides[..r.saturating_sub(1)]
        .iter()
        .map(|&s| s as usize)
        .collect();
    for_each_offset(&shape[..r.saturating_sub(1)], [&outer_strides], |[o]| {
        row_starts.push((base + o as u64).wrapping_add(seed))
    });
    Ok(row_starts)
}

fn contiguous_strides_u64(shape: &[usize]) -> Vec<u64> {
    let mut strides = vec![0u64; shape.len()];
    let mut s = 1u64;
    for (st, &n) in strides.iter_mut().zip(shape).rev() {
        *st = s;
        s = s.wrapping_mul(n as u64);
    }
    strides
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// The shard of an unpartitioned cross-entropy: every class, `classes` of them real.
fn whole(
    name: &'static str,
    logits: &Tensor,
    classes: Option<&Dim>,
    shift: bool,
    local: &Local,
) -> Result<VocabShard> {
    index::min_rank("the logits ([..., seq, vocab])", &logits.shape, 2).or_invalid(name)?;
    Ok(VocabShard {
        class_offset: 0,
        real_classes: index::ce_classes(&logits.shape, classes).or_invalid(name)?,
        shift,
        token_parts: local.n_token_parts(),
        window: None,
    })
}

fn row_max(
    name: &'static str,
    logits: &Tensor,
    shard: &VocabShard,
    threads: usize,
) -> Result<Vec<f32>> {
    check_tensor(name, logits)?;
    let CeRows { rows, .. } = ce_rows_of(name, &logits.shape, shard)?;
    let vocab = logits.shape[logits.rank() - 1];
    let nr = shard.local_real(vocab);
    let mut max = vec![f32::NEG_INFINITY; rows];
    if vocab == 0 {
        return Ok(max);
    }
    let work = logits.data.len();
    par_chunks_work(
        threads,
        &mut max,
        1,
        work,
        #[inline(always)]
        |first, chunk| {
            for (i, m) in chunk.iter_mut().enumerate() {
                let r = first + i;
                let row = &logits.data[r * vocab..r * vocab + nr];
                *m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            }
        },
    );
    Ok(max)
}

fn row_sums(
    name: &'static str,
    logits: &Tensor,
    max: &[f32],
    targets: &Tensor,
    shard: &VocabShard,
    threads: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let VocabShard {
        class_offset,
        real_classes,
        shift,
        ..
    } = *shard;
    check_tensor(name, logits)?;
    check_tensor(name, targets)?;
    let at = ce_rows_of(name, &logits.shape, shard)?;
    let rows = at.rows;
    let r = logits.rank();
    check_targets_shape(name, &targets.shape, &logits.shape, &at, shard)?;
    if max.len() != rows {
        return Err(invalid(
            name,
            format!("{} row maxima for {rows} rows", max.len()),
        ));
    }
    let vocab = logits.shape[r - 1];
    let nr = shard.local_real(vocab);
    // The global target of every predicting row, checked.
    let mut target = vec![None; rows];
    for (row, t) in target.iter_mut().enumerate() {
        if let Some(i) = at.target_of(row, shift) {
            *t = Some(index(name, "target", targets.data[i], i, real_classes)?);
        }
    }
    let mut sums = vec![0f32; rows];
    let mut tl = vec![0f32; rows];
    if vocab > 0 {
        let work = logits.data.len();
        par_chunks_work(
            threads,
            &mut sums,
            1,
            work,
            #[inline(always)]
            |first, chunk| {
                for (i, s) in chunk.iter_mut().enumerate() {
                    let row = first + i;
                    let m = max[row];
                    let l = &logits.data[row * vocab..row * vocab + nr];
                    *s = math::sum_exp_shifted(l, m) as f32;
                }
            },
        );
    }
    for (row, (tl, t)) in tl.iter_mut().zip(&target).enumerate() {
        if let Some(c) = t {
            if let Some(j) = c.checked_sub(class_offset).filter(|&j| j < nr) {
                *tl = logits.data[row * vocab + j];
            }
        }
    }
    Ok((sums, tl))
}

/// Where a cross-entropy's logits gradient is written.
enum GradInto<'a> {
    /// A new tensor; the logits are read.
    New(&'a Tensor),
    /// Over the logits themselves (each element read, then written).
    Logits(Tensor),
}

fn grad(
    name: &'static str,
    into: GradInto,
    targets: &Tensor,
    (max, sum): (&[f32], &[f32]),
    shard: &VocabShard,
    dloss: f32,
    threads: usize,
) -> Result<Tensor> {
    let logits = match &into {
        GradInto::New(t) => *t,
        GradInto::Logits(t) => t,
    };
    let VocabShard {
        class_offset,
        real_classes,
        shift,
        token_parts,
        ..
    } = *shard;
    check_tensor(name, logits)?;
    check_tensor(name, targets)?;
    let at = ce_rows_of(name, &logits.shape, shard)?;
    let rows = at.rows;
    let r = logits.rank();
    check_targets_shape(name, &targets.shape, &logits.shape, &at, shard)?;
    if max.len() != rows || sum.len() != rows {
        return Err(invalid(
            name,
            format!(
                "{} maxima and {} sums for {rows} rows",
                max.len(),
                sum.len()
            ),
        ));
    }
    let count = mean_count(name, (at.total, at.seq), shift, token_parts, &logits.shape)?;
    let vocab = logits.shape[r - 1];
    let nr = shard.local_real(vocab);
    let mut target = vec![None; rows];
    for (row, t) in target.iter_mut().enumerate() {
        if let Some(i) = at.target_of(row, shift) {
            let c = index(name, "target", targets.data[i], i, real_classes)?;
            // The local column of the target, or usize::MAX when another rank holds it.
            *t = Some(
                c.checked_sub(class_offset)
                    .filter(|&j| j < nr)
                    .unwrap_or(usize::MAX),
            );
        }
    }
    let scale = (dloss as f64 / (count as f64 * token_parts as f64)) as f32;
    // The output, and the logits when they are another tensor (else the output holds them).
    let (mut out, read) = match into {
        GradInto::New(t) => (zeros(name, t.shape.clone())?, Some(&t.data)),
        GradInto::Logits(t) => (t, None),
    };
    if vocab == 0 {
        return Ok(out);
    }
    par_chunks(
        threads,
        &mut out.data,
        vocab,
        #[inline(always)]
        |first, chunk| {
            for (i, o) in chunk.chunks_exact_mut(vocab).enumerate() {
                let row = first + i;
                let Some(t) = target[row] else {
                    if read.is_none() {
                        o.fill(0.0);
                    }
                    continue;
                };
                let (m, inv) = (max[row], 1.0 / sum[row]);
                let held = t != usize::MAX;
                // The target's logit, read before it is overwritten.
                let lt = match read {
                    Some(logits) => {
                        let l = &logits[row * vocab..row * vocab + nr];
                        for (o, &v) in o[..nr].iter_mut().zip(l) {
                            *o = scale * (exp(v - m) * inv);
                        }
                        if held {
                            l[t]
                        } else {
                            0.0
                        }
                    }
                    None => {
                        let lt = if held { o[t] } else { 0.0 };
                        for o in &mut o[..nr] {
                            *o = scale * (exp(*o - m) * inv);
                        }
                        o[nr..].fill(0.0);
                        lt
                    }
                };
                if held {
                    let p = exp(lt - m) * inv;
                    o[t] = scale * (p - 1.0);
                }
            }
        },
    );
    Ok(out)
}

/// Per row (every position of the logits' leading dimensions), the max over this rank's real
/// classes (a row with no real local class gives −∞), on up to `threads` threads.
pub fn ce_row_max(
    logits: &Tensor,
    shard: &VocabShard,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    row_max("CrossEntropy", logits, shard, threads.max(1))
}

/// Per row, the sum over this rank's real classes of `exp(logit − max[row])`, and the logit of
/// the row's target if this rank holds that class (else 0). Targets must be integers in
/// `0..real_classes`.
pub fn ce_row_sums(
    logits: &Tensor,
    max: &[f32],
    targets: &Tensor,
    shard: &VocabShard,
    threads: usize,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    row_sums("CrossEntropy", logits, max, targets, shard, threads.max(1))
}

/// The local logits' gradient: `(softmax − onehot(target)) · dloss / (predicting rows ×
/// token_parts)`, zero for padded classes and non-predicting rows, from the group-reduced
/// statistics.
pub fn ce_grad(
    logits: &Tensor,
    targets: &Tensor,
    stats: &RowStats,
    shard: &VocabShard,
    dloss: f32,
    threads: usize,
) -> Result<Tensor, KernelError> {
    grad(
        "CrossEntropyGrad",
        GradInto::New(logits),
        targets,
        (&stats.max, &stats.sum),
        shard,
        dloss,
        threads.max(1),
    )
}

/// [`ce_grad`] written over the logits' own buffer: the same values, to the bit.
pub fn ce_grad_in_place(
    logits: Tensor,
    targets: &Tensor,
    stats: &RowStats,
    shard: &VocabShard,
    dloss: f32,
    threads: usize,
) -> Result<Tensor, KernelError> {
    grad(
        "CrossEntropyGrad",
        GradInto::Logits(logits),
        targets,
        (&stats.max, &stats.sum),
        shard,
        dloss,
        threads.max(1),
    )
}
