//! The launch plans without a GPU: what the Rust side hands the kernels (merged axes, transpose
//! tiles, SumTo chunks, row copies, dropout counters, the row-major to column-major cuBLAS
//! mapping), run through Rust emulations of the kernels' index arithmetic (the same loops as
//! `cu/*.cu`, and cuBLAS's column-major GEMM) and compared with the IR's reference semantics
//! ([`ferrotron_ir::reference`]), over many random shapes. What only a GPU (or the CPU stand-in
//! for one) can check (the kernels' arithmetic, synchronization and launches) is
//! `runtime/backend-tests/tests/cuda_ops.rs`.

use super::elementwise::{binary_plan, dropout_plan, keep_threshold, BinaryPlan};
use super::layout::{
    concat_rows, deinterleave_rows, expand_plan, interleave_rows, pad_rows, slice_rows,
    sum_to_plan, transpose_plan, Rows, SumToPlan, TransposePlan,
};
use super::matmul::{cublas_call, plan as matmul_plan};
use super::structs::{Gather, SumToShape, Tile, MAX_DIMS};
use ferrotron_exec::kernel::Placement;
use ferrotron_exec::Tensor;
use ferrotron_ir::index;
use ferrotron_ir::op::Op;
use ferrotron_ir::reference::{self, dropout_keeps, splitmix64};
use ferrotron_ir::Dim;
use std::collections::HashMap;

const OP: &str = "test";

fn d(n: usize) -> Dim {
    Dim::new(n as u64)
}

fn ds(ns: &[usize]) -> Vec<Dim> {
    ns.iter().map(|&n| d(n)).collect()
}

fn rand(rng: &mut fastrand::Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.f32() * 4.0 - 2.0).collect(),
    }
}

fn random_shape(rng: &mut fastrand::Rng, max_rank: usize, max_size: usize) -> Vec<usize> {
    let r = rng.usize(0..=max_rank);
    (0..r)
        .map(|_| {
            if rng.u8(0..4) == 0 {
                1
            } else {
                rng.usize(1..=max_size)
            }
        })
        .collect()
}

/// A shape that broadcasts to `to`: some leading axes dropped, some axes set to 1.
fn broadcasting_to(rng: &mut fastrand::Rng, to: &[usize]) -> Vec<usize> {
    let drop = rng.usize(0..=to.len());
    to[drop..]
        .iter()
        .map(|&s| if rng.bool() { 1 } else { s })
        .collect()
}

/// The op's first output as the reference evaluator computes it (in `f64`, rounded to `f32`:
/// exact for the data movement, and for one `+ − × ÷` per element the correctly rounded `f32`
/// result).
fn one(op: &Op<&Tensor, Dim>) -> Tensor {
    let wide: HashMap<*const Tensor, reference::Tensor> = op
        .inputs()
        .into_iter()
        .map(|&t| {
            let data = t.data.iter().map(|&x| f64::from(x)).collect();
            (
                t as *const Tensor,
                reference::Tensor::new(t.shape.clone(), data),
            )
        })
        .collect();
    let op = op
        .try_map::<&reference::Tensor, Dim, (), _, _>(
            |t| Ok(&wide[&(*t as *const Tensor)]),
            |d| Ok(d.clone()),
        )
        .unwrap();
    let out = reference::eval_op(&op).unwrap().remove(0);
    Tensor {
        shape: out.shape,
        data: out.data.iter().map(|&x| x as f32).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// The kernels' index arithmetic, as in cu/common.cuh and cu/*.cu

fn ft_offset(mut idx: i64, rank: i32, size: &[i64; MAX_DIMS], stride: &[i64; MAX_DIMS]) -> i64 {
    if rank == 1 {
        return idx * stride[0];
    }
    let mut off = 0;
    for dd in (0..MAX_DIMS).rev() {
        if (dd as i32) < rank {
            let q = idx / size[dd];
            off += (idx - q * size[dd]) * stride[dd];
            idx = q;
        }
    }
    off
}

/// layout.cu's `gather`.
fn gather(x: &[f32], g: &Gather, n: usize) -> Vec<f32> {
    (0..n as i64)
        .map(|i| x[ft_offset(i, g.rank, &g.size, &g.stride) as usize])
        .collect()
}

/// layout.cu's `transpose_tiled` (every (z, a, b) the tiles cover); unwritten elements stay NaN.
fn tiled(x: &[f32], t: &Tile, n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    for z in 0..t.n_other {
        let s0 = ft_offset(z, t.rank_o, &t.size_o, &t.src_o);
        let d0 = ft_offset(z, t.rank_o, &t.size_o, &t.dst_o);
        for a in 0..t.na {
            for b in 0..t.nb {
                out[(d0 + a * t.sa_dst + b) as usize] = x[(s0 + b * t.sb_src + a) as usize];
            }
        }
    }
    out
}

/// layout.cu's `copy_rows`.
fn copy_rows(dst: &mut [f32], src: &[f32], r: Rows) {
    for o in 0..r.outer {
        for j in 0..r.len {
            dst[o * r.dst_ld + r.dst_off + j] = src[o * r.src_ld + r.src_off + j];
        }
    }
}

/// layout.cu's `sum_to_partial` then `sum_partials` (the lanes' order aside: f32 sums per
/// chunk, chunks added in order).
fn sum_to(x: &[f32], s: &SumToShape, chunks: usize, groups: usize) -> Vec<f32> {
    let lanes = if s.inner_reduced != 0 { 8 } else { 32 };
    assert!(
        groups * lanes >= s.out_n as usize,
        "the groups cover the outputs"
    );
    assert_eq!(chunks as i64, (s.red_n + s.chunk - 1) / s.chunk);
    (0..s.out_n)
        .map(|o| {
            let ko = ft_offset(o, s.rank_k, &s.size_k, &s.stride_k);
            let mut total = 0f32;
            for c in 0..chunks as i64 {
                let mut part = 0f32;
                for r in c * s.chunk..((c + 1) * s.chunk).min(s.red_n) {
                    part += x[(ko + ft_offset(r, s.rank_r, &s.size_r, &s.stride_r)) as usize];
                }
                total += part;
            }
            total
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = (1e-5 * (g.abs() + w.abs())).max(1e-5 * scale);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The plans

#[test]
fn transpose_plans_move_every_element_where_the_reference_does() {
    let mut rng = fastrand::Rng::with_seed(1);
    let (mut gathers, mut tiles) = (0, 0);
    for _ in 0..3000 {
        let shape = random_shape(&mut rng, 5, 5);
        let mut perm: Vec<usize> = (0..shape.len()).collect();
        rng.shuffle(&mut perm);
        let x = rand(&mut rng, &shape);
        let want = one(&Op::Transpose {
            x: &x,
            perm: perm.clone(),
        });
        let (out_shape, plan) = transpose_plan(OP, &shape, &perm).unwrap();
        assert_eq!(out_shape, want.shape);
        let n = want.data.len();
        let got = match plan {
            TransposePlan::Share => x.data.clone(),
            TransposePlan::Gather(g) => {
                gathers += 1;
                gather(&x.data, &g, n).into()
            }
            TransposePlan::Tiled(t) => {
                tiles += 1;
                tiled(&x.data, &t, n).into()
            }
        };
        assert_eq!(got, want.data, "{shape:?} by {perm:?}");
    }
    assert!(
        gathers > 100 && tiles > 100,
        "{gathers} gathers, {tiles} tiled"
    );
}

#[test]
fn expand_plans_repeat_as_the_reference() {
    let mut rng = fastrand::Rng::with_seed(2);
    for _ in 0..2000 {
        let to = random_shape(&mut rng, 5, 4);
        let from = broadcasting_to(&mut rng, &to);
        let x = rand(&mut rng, &from);
        let want = one(&Op::Expand {
            x: &x,
            shape: ds(&to),
        });
        let got = match expand_plan(OP, &from, &to).unwrap() {
            None => x.data.clone(),
            Some(g) => gather(&x.data, &g, want.data.len()).into(),
        };
        assert_eq!(got, want.data, "{from:?} to {to:?}");
    }
}

#[test]
fn binary_plans_broadcast_as_the_reference() {
    let mut rng = fastrand::Rng::with_seed(3);
    let (mut repeats, mut strided) = (0, 0);
    for _ in 0..3000 {
        let out = random_shape(&mut rng, 5, 4);
        let (sa, sb) = (
            broadcasting_to(&mut rng, &out),
            broadcasting_to(&mut rng, &out),
        );
        let (a, b) = (rand(&mut rng, &sa), rand(&mut rng, &sb));
        let want = one(&Op::Sub(&a, &b));
        let shape = index::binary(&sa, &sb).unwrap();
        let n = want.data.len();
        if n == 0 {
            continue;
        }
        let got: Vec<f32> = match binary_plan(OP, &sa, &sb, &shape).unwrap() {
            BinaryPlan::Repeat { na, nb } => {
                repeats += 1;
                (0..n)
                    .map(|i| {
                        let ia = if na == n { i } else { i % na };
                        let ib = if nb == n { i } else { i % nb };
                        a.data[ia] - b.data[ib]
                    })
                    .collect()
            }
            BinaryPlan::Strided(s) => {
                strided += 1;
                (0..n as i64)
                    .map(|i| {
                        let oa = ft_offset(i, s.rank, &s.size, &s.sa);
                        let ob = ft_offset(i, s.rank, &s.size, &s.sb);
                        a.data[oa as usize] - b.data[ob as usize]
                    })
                    .collect()
            }
        };
        assert_eq!(got, want.data, "{sa:?} − {sb:?}");
    }
    assert!(
        repeats > 100 && strided > 100,
        "{repeats} repeats, {strided} strided"
    );
}

#[test]
fn sum_to_plans_cover_every_element_once() {
    let mut rng = fastrand::Rng::with_seed(4);
    let mut multi_chunk = 0;
    let mut cases: Vec<(Vec<usize>, Vec<usize>)> = (0..1500)
        .map(|_| {
            let from = random_shape(&mut rng, 5, 5);
            let to = broadcasting_to(&mut rng, &from);
            (from, to)
        })
        .collect();
    // Long reductions, over leading and over trailing axes (several chunks).
    cases.extend([
        (vec![300, 7], vec![7]),
        (vec![3, 700], vec![3, 1]),
        (vec![2, 900, 4], vec![1, 1, 4]),
        (vec![70, 3, 40], vec![3, 1]),
        (vec![5000], vec![]),
        (vec![600, 2, 3], vec![2, 1]),
    ]);
    for (from, to) in cases {
        let x = rand(&mut rng, &from);
        let want = one(&Op::SumTo {
            x: &x,
            shape: ds(&to),
        });
        let got = match sum_to_plan(OP, &from, &to).unwrap() {
            SumToPlan::Zeros => vec![0.0; want.data.len()],
            SumToPlan::Share => x.data.to_vec(),
            SumToPlan::Reduce { s, chunks, groups } => {
                multi_chunk += usize::from(chunks > 1);
                sum_to(&x.data, &s, chunks, groups)
            }
        };
        assert_close(&format!("{from:?} to {to:?}"), &got, &want.data);
    }
    assert!(multi_chunk >= 6, "{multi_chunk} multi-chunk cases");
}

#[test]
fn row_copies_slice_join_pad_and_interleave_as_the_reference() {
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..1000 {
        let mut shape = random_shape(&mut rng, 4, 5);
        if shape.is_empty() {
            shape.push(3);
        }
        let a = rng.usize(0..shape.len());
        let x = rand(&mut rng, &shape);
        // Slice
        let start = rng.usize(0..=shape[a]);
        let end = rng.usize(start..=shape[a]);
        let want = one(&Op::Slice {
            x: &x,
            dim: a as i64,
            start: d(start),
            end: d(end),
        });
        let mut got = vec![f32::NAN; want.data.len()];
        copy_rows(&mut got, &x.data, slice_rows(&shape, a, start, end));
        assert_eq!(got, want.data, "slice {shape:?} axis {a} {start}..{end}");
        // Concat with two more tensors of other sizes along `a`
        let mut shapes = vec![shape.clone()];
        for _ in 0..2 {
            let mut s = shape.clone();
            s[a] = rng.usize(0..4);
            shapes.push(s);
        }
        let xs: Vec<Tensor> = shapes.iter().map(|s| rand(&mut rng, s)).collect();
        let refs: Vec<&Tensor> = xs.iter().collect();
        let want = one(&Op::Concat {
            xs: refs,
            dim: a as i64,
        });
        let shape_refs: Vec<&[usize]> = shapes.iter().map(|s| &s[..]).collect();
        let mut got = vec![f32::NAN; want.data.len()];
        for (x, r) in xs.iter().zip(concat_rows(&want.shape, a, &shape_refs)) {
            copy_rows(&mut got, &x.data, r);
        }
        assert_eq!(got, want.data, "concat {shapes:?} axis {a}");
        // Pad
        let (before, after) = (rng.usize(0..3), rng.usize(0..3));
        let want = one(&Op::Pad {
            x: &x,
            dim: a as i64,
            before: d(before),
            after: d(after),
        });
        let mut got = vec![0.0; want.data.len()];
        copy_rows(
            &mut got,
            &x.data,
            pad_rows(&shape, a, before, want.shape[a]),
        );
        assert_eq!(got, want.data, "pad {shape:?} axis {a} {before}+{after}");
        // Interleave and deinterleave over `members`
        let members = rng.usize(1..4);
        let parts: Vec<Tensor> = (0..members).map(|_| rand(&mut rng, &shape)).collect();
        let flat: Vec<f32> = parts.iter().flat_map(|p| p.data.clone()).collect();
        let refs: Vec<&Tensor> = parts.iter().collect();
        let joined = one(&Op::Concat {
            xs: refs,
            dim: a as i64,
        });
        let mut got = vec![f32::NAN; flat.len()];
        for r in interleave_rows(&shape, a, members) {
            copy_rows(&mut got, &flat, r);
        }
        assert_eq!(
            got, joined.data,
            "interleave {shape:?} axis {a} × {members}"
        );
        let mut back = vec![f32::NAN; flat.len()];
        for r in deinterleave_rows(&joined.shape, a, members) {
            copy_rows(&mut back, &joined.data, r);
        }
        assert_eq!(
            back, flat,
            "deinterleave {:?} axis {a} × {members}",
            joined.shape
        );
    }
}

#[test]
fn dropout_plans_draw_the_reference_masks_on_any_shard() {
    let mut rng = fastrand::Rng::with_seed(6);
    for _ in 0..1500 {
        let full: Vec<usize> = (0..rng.usize(1..5)).map(|_| rng.usize(1..7)).collect();
        let offsets: Vec<usize> = full.iter().map(|&f| rng.usize(0..f)).collect();
        let shape: Vec<usize> = full
            .iter()
            .zip(&offsets)
            .map(|(&f, &o)| rng.usize(1..=f - o))
            .collect();
        let seed = rng.u64(..);
        let local = Placement {
            full_shape: Some(full.clone()),
            offsets: Some(offsets.clone()),
            dropout_seed: seed,
            ..Placement::default()
        };
        let p = 0.4;
        let x = rand(&mut rng, &shape);
        let (s, first) = dropout_plan(OP, &shape, &local).unwrap();
        let (threshold, scale) = (keep_threshold(p), (1.0 / (1.0 - p)) as f32);
        // Element `idx` of the shard is element `idx + offsets` of the full tensor, kept by the
        // reference's mask at its flat index there (shifted by the seed).
        let mut want = Vec::with_capacity(x.data.len());
        let mut idx = vec![0usize; shape.len()];
        for &v in &x.data {
            let flat = idx
                .iter()
                .zip(&offsets)
                .zip(&full)
                .fold(0u64, |f, ((&i, &o), &n)| f * n as u64 + (i + o) as u64);
            let keeps = dropout_keeps(flat.wrapping_add(seed.wrapping_mul(1 << 40)), p);
            want.push(if keeps { v * scale } else { 0.0 });
            for a in (0..idx.len()).rev() {
                idx[a] += 1;
                if idx[a] < shape[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        let got: Vec<f32> = (0..x.data.len() as i64)
            .map(|i| {
                let at = first.wrapping_add(ft_offset(i, s.rank, &s.size, &s.stride) as u64);
                let v = x.data[i as usize];
                if splitmix64(at) >= threshold {
                    v * scale
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(got, want, "{shape:?} at {offsets:?} of {full:?}");
    }
}

#[test]
fn matmul_plans_are_the_products_cublas_computes_column_major() {
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut folds, mut loops) = (0, 0);
    for _ in 0..1500 {
        let batch = random_shape(&mut rng, 3, 3);
        let (ba, bb) = (
            broadcasting_to(&mut rng, &batch),
            broadcasting_to(&mut rng, &batch),
        );
        let (m, n, k) = (rng.usize(1..6), rng.usize(1..6), rng.usize(1..6));
        let (ta, tb) = (rng.bool(), rng.bool());
        let mut sa = ba.clone();
        sa.extend(if ta { [k, m] } else { [m, k] });
        let mut sb = bb.clone();
        sb.extend(if tb { [n, k] } else { [k, n] });
        let (a, b) = (rand(&mut rng, &sa), rand(&mut rng, &sb));
        let want = one(&Op::MatMul {
            a: &a,
            b: &b,
            transpose_a: ta,
            transpose_b: tb,
        });
        let mm = index::matmul(&sa, &sb, ta, tb).unwrap();
        let (call, batches) = matmul_plan(&mm, ta, tb).unwrap();
        if call.n as usize != mm.m {
            folds += 1;
        }
        loops += usize::from(batches.len() > 1);
        // cuBLAS: C(i, j) = Σ_l op(A)(i, l) · op(B)(l, j), column-major, with A our b, B our a.
        let mut got = vec![f32::NAN; want.data.len()];
        for batch in &batches {
            let c = cublas_call(&call, batch);
            for q in 0..c.count as i64 {
                let oa = c.offsets.0 as i64 + q * c.strides.0;
                let ob = c.offsets.1 as i64 + q * c.strides.1;
                let oc = c.offsets.2 as i64 + q * c.strides.2;
                for i in 0..c.m as i64 {
                    for j in 0..c.n as i64 {
                        let mut acc = 0f64;
                        for l in 0..c.k as i64 {
                            let av = if c.trans_a {
                                b.data[(oa + l + i * c.lda as i64) as usize]
                            } else {
                                b.data[(oa + i + l * c.lda as i64) as usize]
                            };
                            let bv = if c.trans_b {
                                a.data[(ob + j + l * c.ldb as i64) as usize]
                            } else {
                                a.data[(ob + l + j * c.ldb as i64) as usize]
                            };
                            acc += av as f64 * bv as f64;
                        }
                        got[(oc + i + j * c.ldc as i64) as usize] = acc as f32;
                    }
                }
            }
        }
        assert_close(
            &format!(
                "{sa:?}{} · {sb:?}{}",
                if ta { "ᵀ" } else { "" },
                if tb { "ᵀ" } else { "" }
            ),
            &got,
            &want.data,
        );
    }
    assert!(
        folds > 50 && loops > 20,
        "{folds} folds, {loops} looped batches"
    );
}
