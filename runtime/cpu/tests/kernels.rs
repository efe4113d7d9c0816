//! The CPU kernels against the reference evaluator: every op `eval` supports, on random inputs
//! (fixed seeds) of several shapes, converted to `f64` and evaluated by
//! `ferrotron_ir::reference::eval_op`; the largest relative error must stay within 1e-5 (with a
//! floor for elements near zero, where a relative error measures only cancellation). Then the
//! rank-dependent ops on emulated shards, the vocabulary-parallel cross-entropy's phases, and the
//! error cases.

use ferrotron_cpu::kernels;
use ferrotron_exec::kernel::{ce_loss, KernelError, Placement, RowStats, RowWindow, VocabShard};
use ferrotron_exec::Tensor;
use ferrotron_ir::op::{Activation, Factor, MeshAxis, Op};
use ferrotron_ir::reference::{self, dropout_keeps, Tensor as T64};
use ferrotron_ir::{DType, Dim};

/// A kernel's context as these tests set it: where the shard sits, and the threads.
#[derive(Clone, Debug, Default)]
struct KernelCtx {
    vocab_offset: usize,
    vocab_rows: Option<usize>,
    full_shape: Option<Vec<usize>>,
    offsets: Option<Vec<usize>>,
    dropout_seed: u64,
    token_parts: usize,
    threads: usize,
}

fn eval(op: &Op<&Tensor, Dim>, l: &KernelCtx) -> Result<Vec<Tensor>, KernelError> {
    let at = Placement {
        vocab_offset: l.vocab_offset,
        vocab_rows: l.vocab_rows,
        full_shape: l.full_shape.clone(),
        offsets: l.offsets.clone(),
        dropout_seed: l.dropout_seed,
        token_parts: l.token_parts,
    };
    kernels::eval(op, &at, l.threads)
}

/// The shard of the classes from `class_offset`, `real` of them real.
fn shard(class_offset: usize, real_classes: usize, shift: bool, token_parts: usize) -> VocabShard {
    VocabShard {
        class_offset,
        real_classes,
        shift,
        token_parts,
        window: None,
    }
}

const RTOL: f64 = 1e-5;

/// Elements smaller than this fraction of the output's largest are compared absolutely.
const FLOOR: f64 = 1e-3;

fn d(n: usize) -> Dim {
    Dim::new(n as u64)
}

fn ds(ns: &[usize]) -> Vec<Dim> {
    ns.iter().map(|&n| d(n)).collect()
}

fn uniform(rng: &mut fastrand::Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| lo + (hi - lo) * rng.f32()).collect(),
    }
}

fn rand(rng: &mut fastrand::Rng, shape: &[usize]) -> Tensor {
    uniform(rng, shape, -2.0, 2.0)
}

fn ints(rng: &mut fastrand::Rng, shape: &[usize], bound: usize) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.usize(0..bound) as f32).collect(),
    }
}

/// The same tensor in `f64` (a malformed one stays malformed, for the error cases).
fn to64(t: &Tensor) -> T64 {
    T64 {
        shape: t.shape.clone(),
        data: t.data.iter().map(|&v| v as f64).collect(),
    }
}

fn local(threads: usize) -> KernelCtx {
    KernelCtx {
        threads,
        ..KernelCtx::default()
    }
}

/// The reference evaluator on the same op with its inputs converted to `f64`.
fn reference(op: &Op<&Tensor, Dim>) -> Result<Vec<T64>, reference::EvalError> {
    let inputs: Vec<T64> = op.inputs().into_iter().map(|t| to64(t)).collect();
    let mut it = inputs.iter();
    let op64 = op
        .try_map::<&T64, Dim, (), _, _>(|_| Ok(it.next().unwrap()), |d| Ok(d.clone()))
        .unwrap();
    reference::eval_op(&op64)
}

/// The largest `|got − want| / max(|want|, floor · max|want|)`.
fn rel_err(got: &Tensor, want: &T64, floor: f64) -> f64 {
    assert_eq!(got.shape, want.shape, "shapes differ");
    let floor = (floor * want.max_abs()).max(1e-30);
    got.data
        .iter()
        .zip(&want.data)
        .map(|(&g, &w)| {
            if (g as f64).is_nan() && w.is_nan() || g as f64 == w {
                0.0
            } else {
                let e = (g as f64 - w).abs() / w.abs().max(floor);
                if e.is_nan() {
                    f64::INFINITY
                } else {
                    e
                }
            }
        })
        .fold(0.0, f64::max)
}

fn assert_close(got: &Tensor, want: &T64, floor: f64, what: &str) {
    let e = rel_err(got, want, floor);
    assert!(
        e <= RTOL,
        "{what}: relative error {e:e}\n  got  {:?}\n  want {:?}",
        &got.data[..got.data.len().min(16)],
        &want.data[..want.data.len().min(16)]
    );
}

/// Runs `op` through the kernels and the reference and compares every output.
fn check_with(op: Op<&Tensor, Dim>, l: &KernelCtx, floor: f64) -> Vec<Tensor> {
    let what = format!("{} {:?}", op.mnemonic(), shapes(&op));
    let got = eval(&op, l).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = reference(&op).unwrap_or_else(|e| panic!("{what}: reference: {e}"));
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, floor, &format!("{what} output {i}"));
    }
    got
}

fn check(op: Op<&Tensor, Dim>) -> Vec<Tensor> {
    check_with(op, &KernelCtx::default(), FLOOR)
}

/// Each op on one thread and on two (the parallel paths).
fn check_threads(op: Op<&Tensor, Dim>, floor: f64) -> Vec<Tensor> {
    let one = check_with(op.clone(), &local(1), floor);
    let two = check_with(op, &local(2), floor);
    for (a, b) in one.iter().zip(&two) {
        assert_close(a, &to64(b), floor, "one thread vs two");
    }
    one
}

fn shapes(op: &Op<&Tensor, Dim>) -> Vec<Vec<usize>> {
    op.inputs().iter().map(|t| t.shape.clone()).collect()
}

fn eval1(op: Op<&Tensor, Dim>, l: &KernelCtx) -> Tensor {
    let mut out = eval(&op, l).unwrap_or_else(|e| panic!("{}: {e}", op.mnemonic()));
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Matmul

#[test]
fn matmul_shapes_transposes_and_broadcasting() {
    let mut rng = fastrand::Rng::with_seed(1);
    // (a's shape, b's shape, transpose_a, transpose_b)
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[5, 7], &[7, 3], false, false),
        (&[7, 5], &[7, 3], true, false),
        (&[5, 7], &[3, 7], false, true),
        (&[7, 5], &[3, 7], true, true),
        (&[1, 9], &[9, 1], false, false),
        (&[2, 3, 4, 5], &[5, 6], false, false),
        (&[2, 3, 5, 4], &[5, 6], true, false),
        (&[2, 3, 4, 5], &[6, 5], false, true),
        (&[2, 1, 4, 5], &[3, 5, 6], false, false),
        (&[4, 5], &[2, 5, 6], false, false),
        (&[3, 4, 5], &[1, 6, 5], false, true),
        (&[2, 3, 5, 4], &[2, 3, 6, 5], true, true),
        (&[1, 3, 4, 5], &[2, 1, 5, 6], false, false),
        (&[0, 4, 5], &[5, 6], false, false),
        (&[3, 0], &[0, 4], false, false),
        (&[3, 4], &[4, 0], false, false),
    ];
    for &(sa, sb, ta, tb) in cases {
        let (a, b) = (rand(&mut rng, sa), rand(&mut rng, sb));
        check_threads(
            Op::MatMul {
                a: &a,
                b: &b,
                transpose_a: ta,
                transpose_b: tb,
            },
            0.05,
        );
    }
}

#[test]
fn matmul_large_enough_for_threads() {
    let mut rng = fastrand::Rng::with_seed(2);
    // One product big enough for gemm's rayon parallelism; a batch big enough to be shared out.
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[96, 150], &[150, 120], false, false),
        (&[150, 96], &[120, 150], true, true),
        (&[2, 96, 64], &[64, 300], false, false),
        (&[4, 128, 32], &[4, 128, 32], false, true),
        (&[6, 100, 40], &[6, 40, 120], false, false),
    ];
    for &(sa, sb, ta, tb) in cases {
        let (a, b) = (rand(&mut rng, sa), rand(&mut rng, sb));
        check_threads(
            Op::MatMul {
                a: &a,
                b: &b,
                transpose_a: ta,
                transpose_b: tb,
            },
            0.05,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

#[test]
fn binary_ops_with_broadcasting() {
    let mut rng = fastrand::Rng::with_seed(3);
    let pairs: &[(&[usize], &[usize])] = &[
        (&[4, 5], &[4, 5]),
        (&[2, 3, 6], &[6]),
        (&[6], &[2, 3, 6]),
        (&[2, 3, 6], &[1, 3, 6]),
        (&[2, 3, 6], &[]),
        (&[], &[2, 3]),
        (&[1], &[3, 4]),
        (&[4, 1, 6], &[5, 1]),
        (&[3, 1], &[1, 4]),
        (&[2, 3, 4], &[2, 3, 1]),
        (&[2, 1, 4], &[2, 3, 4]),
        (&[], &[]),
        (&[0, 3], &[3]),
        (&[300, 256], &[256]),
        (&[256], &[300, 256]),
        (&[300, 256], &[300, 256]),
        (&[300, 256], &[]),
    ];
    for &(sa, sb) in pairs {
        let a = rand(&mut rng, sa);
        // Divisors away from zero.
        let b = Tensor {
            shape: sb.to_vec(),
            data: rand(&mut rng, sb)
                .data
                .iter()
                .map(|&v| v.signum() * (0.5 + v.abs()))
                .collect(),
        };
        for op in [
            Op::Add(&a, &b),
            Op::Sub(&a, &b),
            Op::Mul(&a, &b),
            Op::Div(&a, &b),
        ] {
            check_threads(op, FLOOR);
        }
    }
}

#[test]
fn scale_and_activations() {
    let mut rng = fastrand::Rng::with_seed(4);
    for shape in [&[3, 7][..], &[100, 700], &[]] {
        let x = uniform(&mut rng, shape, -9.0, 9.0);
        for factor in [Factor::Const(-0.37), Factor::InvSqrt(d(64))] {
            check_threads(Op::Scale { x: &x, factor }, FLOOR);
        }
        check_threads(Op::Gelu(&x), FLOOR);
        check_threads(Op::GeluTanh(&x), FLOOR);
        check_threads(Op::Silu(&x), FLOOR);
        check_threads(Op::Relu(&x), FLOOR);
        let dy = rand(&mut rng, shape);
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            // GeluTanh's and SiLU's derivatives are computed in f32: where they cross zero
            // (x ≈ −0.75 and −1.28) two terms cancel, so their error there is ~1e-7 of the
            // gradient's scale; like every backward op, compared with a 1% floor.
            check_threads(
                Op::ActGrad {
                    act,
                    x: &x,
                    dy: &dy,
                },
                1e-2,
            );
        }
    }
    // The left tails keep their relative accuracy (GeluTanh's reference, 0.5·x·(1 + tanh u),
    // cancels to 0 from x ≈ −6 on, so its tail is checked against the reference only where
    // the reference is still accurate).
    let x = Tensor {
        shape: vec![6],
        data: vec![-3.0, -5.0, -7.5, -9.0, -12.0, -20.0].into(),
    };
    check_with(Op::Gelu(&x), &KernelCtx::default(), 0.0);
    check_with(Op::Silu(&x), &KernelCtx::default(), 0.0);
    let x = Tensor {
        shape: vec![3],
        data: vec![-2.0, -3.0, -4.0].into(),
    };
    check_with(Op::GeluTanh(&x), &KernelCtx::default(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Norms and softmax

#[test]
fn norms_with_and_without_affine() {
    let mut rng = fastrand::Rng::with_seed(5);
    for shape in [&[2, 3, 8][..], &[5], &[300, 257], &[4, 1]] {
        let n = *shape.last().unwrap();
        // Off-centre rows, so that the mean matters.
        let x = uniform(&mut rng, shape, 1.0, 5.0);
        let (w, b) = (rand(&mut rng, &[n]), rand(&mut rng, &[n]));
        let dy = rand(&mut rng, shape);
        for eps in [1e-5, 1e-2] {
            for (weight, bias) in [
                (Some(&w), Some(&b)),
                (Some(&w), None),
                (None, Some(&b)),
                (None, None),
            ] {
                check_threads(
                    Op::LayerNorm {
                        x: &x,
                        weight,
                        bias,
                        eps,
                    },
                    FLOOR,
                );
            }
            for weight in [Some(&w), None] {
                check_threads(Op::RmsNorm { x: &x, weight, eps }, FLOOR);
                // Gradients sum over rows and cancel: compare with a larger floor.
                let grads = check_threads(
                    Op::LayerNormGrad {
                        x: &x,
                        weight,
                        dy: &dy,
                        eps,
                    },
                    1e-2,
                );
                assert_eq!(grads.len(), 3);
                let grads = check_threads(
                    Op::RmsNormGrad {
                        x: &x,
                        weight,
                        dy: &dy,
                        eps,
                    },
                    1e-2,
                );
                assert_eq!(grads.len(), 2);
            }
        }
    }
}

#[test]
fn softmax_plain_and_causal_and_its_grad() {
    let mut rng = fastrand::Rng::with_seed(6);
    for (shape, causal) in [
        (&[2, 3, 5, 5][..], true),
        (&[2, 3, 5, 5], false),
        (&[3, 4, 7], true),
        (&[6], false),
        (&[1, 1], true),
        (&[4, 64, 256], true),
        (&[256, 300], false),
    ] {
        let x = uniform(&mut rng, shape, -6.0, 6.0);
        let y = check_threads(Op::Softmax { x: &x, causal }, 0.0).remove(0);
        let dy = rand(&mut rng, shape);
        check_threads(Op::SoftmaxGrad { y: &y, dy: &dy }, 1e-2);
    }
}

// ---------------------------------------------------------------------------------------------
// Shape ops

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..n {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn transposes_of_every_permutation() {
    let mut rng = fastrand::Rng::with_seed(7);
    for shape in [
        &[2, 3, 4, 5][..],
        &[2, 1, 3, 1],
        &[3, 70, 50],
        &[40, 1, 33],
        &[64, 96],
        &[5],
        &[],
        &[2, 0, 3],
    ] {
        let x = rand(&mut rng, shape);
        for perm in permutations(shape.len()) {
            check_threads(Op::Transpose { x: &x, perm }, 0.0);
        }
    }
    // Big enough for the threads: attention's head transposes, a tiled 2-D one.
    let x = rand(&mut rng, &[4, 64, 12, 32]);
    check_threads(
        Op::Transpose {
            x: &x,
            perm: vec![0, 2, 1, 3],
        },
        0.0,
    );
    check_threads(
        Op::Transpose {
            x: &x,
            perm: vec![0, 2, 3, 1],
        },
        0.0,
    );
}

#[test]
fn reshape_slice_split_concat_pad() {
    let mut rng = fastrand::Rng::with_seed(8);
    let x = rand(&mut rng, &[2, 3, 4]);
    check(Op::Reshape {
        x: &x,
        shape: ds(&[6, 4]),
    });
    check(Op::Reshape {
        x: &x,
        shape: ds(&[24]),
    });
    for (axis, start, end) in [(0, 0, 1), (1, 1, 3), (-1, 2, 4), (2, 2, 2), (-3, 0, 2)] {
        check(Op::Slice {
            x: &x,
            dim: axis,
            start: d(start),
            end: d(end),
        });
    }
    for (axis, sizes) in [
        (1, vec![1, 2]),
        (-1, vec![1, 1, 2]),
        (0, vec![2]),
        (2, vec![0, 4]),
    ] {
        let parts = check(Op::Split {
            x: &x,
            dim: axis,
            sizes: ds(&sizes),
        });
        assert_eq!(parts.len(), sizes.len());
        let joined = check(Op::Concat {
            xs: parts.iter().collect(),
            dim: axis,
        });
        assert_eq!(joined[0], x);
    }
    let y = rand(&mut rng, &[2, 5, 4]);
    check(Op::Concat {
        xs: vec![&x, &y, &x],
        dim: -2,
    });
    for (axis, before, after) in [(0, 1, 0), (1, 2, 3), (-1, 0, 2), (2, 0, 0)] {
        check(Op::Pad {
            x: &x,
            dim: axis,
            before: d(before),
            after: d(after),
        });
    }
}

#[test]
fn sum_to_and_expand() {
    let mut rng = fastrand::Rng::with_seed(9);
    let x = rand(&mut rng, &[2, 3, 4]);
    for target in [
        &[3, 1][..],
        &[4],
        &[1, 4],
        &[2, 3, 4],
        &[],
        &[1, 1, 1],
        &[2, 1, 4],
        &[2, 3, 1],
        &[1, 3, 4],
    ] {
        let s = check(Op::SumTo {
            x: &x,
            shape: ds(target),
        });
        check(Op::Expand {
            x: &s[0],
            shape: ds(&[2, 3, 4]),
        });
    }
    // Large: the bias gradient of a [tokens, hidden] activation, on threads.
    let big = rand(&mut rng, &[512, 300]);
    check_threads(
        Op::SumTo {
            x: &big,
            shape: ds(&[300]),
        },
        1e-2,
    );
    check_threads(
        Op::SumTo {
            x: &big,
            shape: ds(&[512, 1]),
        },
        1e-2,
    );
    let small = rand(&mut rng, &[300]);
    check_threads(
        Op::Expand {
            x: &small,
            shape: ds(&[512, 300]),
        },
        0.0,
    );
    // Llama's repeat_kv: [b, s, kv, 1, d] → [b, s, kv, group, d].
    let kv = rand(&mut rng, &[2, 3, 2, 1, 4]);
    check(Op::Expand {
        x: &kv,
        shape: ds(&[2, 3, 2, 3, 4]),
    });
    let scalar = rand(&mut rng, &[]);
    check(Op::Expand {
        x: &scalar,
        shape: ds(&[2, 2]),
    });
}

#[test]
fn fill() {
    for (shape, value, dtype) in [
        (vec![2, 3], 0.5, DType::F32),
        (vec![], -2.0, DType::F32),
        (vec![4], 7.0, DType::I64),
    ] {
        check(Op::Fill {
            shape: ds(&shape),
            value,
            dtype,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary, dropout, embedding

#[test]
fn rotary_and_its_inverse() {
    let mut rng = fastrand::Rng::with_seed(10);
    for shape in [
        &[2, 5, 3, 8][..],
        &[5, 2, 4],
        &[1, 2, 7, 3, 16],
        &[64, 12, 64],
    ] {
        let x = rand(&mut rng, shape);
        // Llama 3.1's rescaling with a context short enough that every band is met.
        let llama3 = ferrotron_ir::RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 64,
        };
        for (base, scaling) in [(10000.0, None), (500.0, None), (500000.0, Some(llama3))] {
            let y = check_threads(
                Op::Rotary {
                    x: &x,
                    base,
                    inverse: false,
                    scaling,
                },
                1e-2,
            )
            .remove(0);
            let back = check_threads(
                Op::Rotary {
                    x: &y,
                    base,
                    inverse: true,
                    scaling,
                },
                1e-2,
            )
            .remove(0);
            assert!(rel_err(&back, &to64(&x), 1e-2) < 1e-5);
        }
    }
    // A shard along the sequence rotates by its global positions.
    let x = rand(&mut rng, &[2, 8, 3, 4]);
    let full = eval1(
        Op::Rotary {
            x: &x,
            base: 10000.0,
            inverse: false,
            scaling: None,
        },
        &KernelCtx::default(),
    );
    let shard = eval1(
        Op::Slice {
            x: &x,
            dim: 1,
            start: d(4),
            end: d(8),
        },
        &KernelCtx::default(),
    );
    let l = KernelCtx {
        full_shape: Some(vec![2, 8, 3, 4]),
        offsets: Some(vec![0, 4, 0, 0]),
        ..KernelCtx::default()
    };
    let got = eval1(
        Op::Rotary {
            x: &shard,
            base: 10000.0,
            inverse: false,
            scaling: None,
        },
        &l,
    );
    let want = eval1(
        Op::Slice {
            x: &full,
            dim: 1,
            start: d(4),
            end: d(8),
        },
        &KernelCtx::default(),
    );
    assert_eq!(got, want);
}

/// The part of `full` at `offsets` with `shape`.
fn sub_block(full: &Tensor, offsets: &[usize], shape: &[usize]) -> Tensor {
    let mut t = full.clone();
    for (a, (&o, &n)) in offsets.iter().zip(shape).enumerate() {
        t = eval1(
            Op::Slice {
                x: &t,
                dim: a as i64,
                start: d(o),
                end: d(o + n),
            },
            &KernelCtx::default(),
        );
    }
    t
}

#[test]
fn dropout_masks_follow_the_full_tensor() {
    let mut rng = fastrand::Rng::with_seed(11);
    let full_shape = [6, 8, 10];
    let x = rand(&mut rng, &full_shape);
    let dy = rand(&mut rng, &full_shape);
    for p in [0.0, 0.1, 0.5] {
        // Unsharded, seed 0: the reference's masks.
        let y = check_threads(Op::Dropout { x: &x, p }, 0.0).remove(0);
        check_threads(
            Op::DropoutGrad {
                dy: &dy,
                forward: &y,
                p,
            },
            0.0,
        );
        for seed in [0, 7] {
            let whole = KernelCtx {
                dropout_seed: seed,
                ..KernelCtx::default()
            };
            let y = eval1(Op::Dropout { x: &x, p }, &whole);
            let g = eval1(
                Op::DropoutGrad {
                    dy: &dy,
                    forward: &y,
                    p,
                },
                &whole,
            );
            // The mask by index, with the seed's offset.
            for (i, &v) in y.data.iter().enumerate() {
                let idx = (i as u64).wrapping_add(seed.wrapping_mul(1 << 40));
                assert_eq!(v != 0.0, dropout_keeps(idx, p) && x.data[i] != 0.0);
            }
            // Shards along any axis (tp on the last, dp on the first, sequence on the middle).
            for (offsets, shape) in [
                ([0, 0, 5], [6, 8, 5]),
                ([3, 0, 0], [3, 8, 10]),
                ([0, 4, 0], [6, 4, 10]),
                ([3, 2, 5], [3, 2, 5]),
            ] {
                let l = KernelCtx {
                    full_shape: Some(full_shape.to_vec()),
                    offsets: Some(offsets.to_vec()),
                    dropout_seed: seed,
                    threads: 2,
                    ..KernelCtx::default()
                };
                let xs = sub_block(&x, &offsets, &shape);
                let ys = eval1(Op::Dropout { x: &xs, p }, &l);
                assert_eq!(ys, sub_block(&y, &offsets, &shape));
                let gs = eval1(
                    Op::DropoutGrad {
                        dy: &sub_block(&dy, &offsets, &shape),
                        forward: &ys,
                        p,
                    },
                    &l,
                );
                assert_eq!(gs, sub_block(&g, &offsets, &shape));
            }
        }
    }
    // A big one on threads.
    let big = rand(&mut rng, &[300, 400]);
    check_threads(Op::Dropout { x: &big, p: 0.3 }, 0.0);
}

#[test]
fn embedding_and_its_grad() {
    let mut rng = fastrand::Rng::with_seed(12);
    let table = rand(&mut rng, &[7, 4]);
    for ids_shape in [&[2, 3][..], &[5], &[], &[200, 100]] {
        let ids = ints(&mut rng, ids_shape, 7);
        check_threads(
            Op::Embedding {
                table: &table,
                ids: &ids,
            },
            0.0,
        );
        let mut dy_shape = ids_shape.to_vec();
        dy_shape.push(4);
        let dy = rand(&mut rng, &dy_shape);
        check_threads(
            Op::EmbeddingGrad {
                table: &table,
                ids: &ids,
                dy: &dy,
            },
            1e-2,
        );
    }
}

#[test]
fn vocabulary_parallel_embedding() {
    let mut rng = fastrand::Rng::with_seed(13);
    let (vocab, width) = (12, 3);
    let table = rand(&mut rng, &[vocab, width]);
    let ids = ints(&mut rng, &[4, 5], vocab);
    let dy = rand(&mut rng, &[4, 5, width]);
    let full = eval1(
        Op::Embedding {
            table: &table,
            ids: &ids,
        },
        &KernelCtx::default(),
    );
    let full_grad = eval1(
        Op::EmbeddingGrad {
            table: &table,
            ids: &ids,
            dy: &dy,
        },
        &KernelCtx::default(),
    );
    for parts in [2, 3, 4] {
        let rows = vocab / parts;
        let mut sum = Tensor::zeros(full.shape.clone());
        for rank in 0..parts {
            let shard = sub_block(&table, &[rank * rows, 0], &[rows, width]);
            let l = KernelCtx {
                vocab_offset: rank * rows,
                vocab_rows: Some(vocab),
                ..KernelCtx::default()
            };
            let y = eval1(
                Op::Embedding {
                    table: &shard,
                    ids: &ids,
                },
                &l,
            );
            // Ids this rank does not hold look up zero rows.
            for (k, &id) in ids.data.iter().enumerate() {
                let row = &y.data[k * width..(k + 1) * width];
                let id = id as usize;
                if (rank * rows..(rank + 1) * rows).contains(&id) {
                    assert_eq!(row, &full.data[k * width..(k + 1) * width]);
                } else {
                    assert!(row.iter().all(|&v| v == 0.0));
                }
            }
            for (s, v) in sum.data.iter_mut().zip(&y.data) {
                *s += v;
            }
            let g = eval1(
                Op::EmbeddingGrad {
                    table: &shard,
                    ids: &ids,
                    dy: &dy,
                },
                &l,
            );
            assert_eq!(g, sub_block(&full_grad, &[rank * rows, 0], &[rows, width]));
            // A non-zero offset alone marks the table vocabulary-parallel.
            if rank > 0 {
                let l = KernelCtx {
                    vocab_offset: rank * rows,
                    ..KernelCtx::default()
                };
                let y2 = eval1(
                    Op::Embedding {
                        table: &shard,
                        ids: &ids,
                    },
                    &l,
                );
                assert_eq!(y, y2);
            }
        }
        assert_eq!(sum, full);
    }
    // Out of the full vocabulary, negative or fractional: errors.
    let shard = sub_block(&table, &[0, 0], &[6, width]);
    let l = KernelCtx {
        vocab_rows: Some(vocab),
        ..KernelCtx::default()
    };
    for bad in [12.0, -1.0, 2.5, f32::NAN] {
        let ids = Tensor {
            shape: vec![1],
            data: vec![bad].into(),
        };
        let r = eval(
            &Op::Embedding {
                table: &shard,
                ids: &ids,
            },
            &l,
        );
        assert!(matches!(r, Err(KernelError::Index { .. })), "{bad}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

#[test]
fn cross_entropy_and_its_grad() {
    let mut rng = fastrand::Rng::with_seed(14);
    for shape in [&[2, 5, 7][..], &[4, 9], &[2, 3, 4, 6], &[64, 1000]] {
        let vocab = *shape.last().unwrap();
        let logits = uniform(&mut rng, shape, -8.0, 8.0);
        for classes in [None, Some(vocab - 2)] {
            let targets = ints(
                &mut rng,
                &shape[..shape.len() - 1],
                classes.unwrap_or(vocab),
            );
            let dloss = Tensor {
                shape: vec![],
                data: vec![1.7].into(),
            };
            for shift in [false, true] {
                let classes = classes.map(d);
                check_threads(
                    Op::CrossEntropy {
                        logits: &logits,
                        targets: &targets,
                        shift,
                        classes: classes.clone(),
                    },
                    FLOOR,
                );
                check_threads(
                    Op::CrossEntropyGrad {
                        logits: &logits,
                        targets: &targets,
                        dloss: &dloss,
                        shift,
                        classes: classes.clone(),
                    },
                    1e-2,
                );
                // token_parts = 2: half the local mean.
                let l = KernelCtx {
                    token_parts: 2,
                    ..KernelCtx::default()
                };
                let half = eval1(
                    Op::CrossEntropy {
                        logits: &logits,
                        targets: &targets,
                        shift,
                        classes: classes.clone(),
                    },
                    &l,
                );
                let want = reference(&Op::CrossEntropy {
                    logits: &logits,
                    targets: &targets,
                    shift,
                    classes: classes.clone(),
                })
                .unwrap()
                .remove(0);
                assert_close(&half, &T64::scalar(want.data[0] / 2.0), 0.0, "CE / 2");
            }
        }
    }
}

/// The vocabulary-parallel cross-entropy on `parts` emulated ranks, combined by hand, against
/// the reference's whole CrossEntropy and CrossEntropyGrad.
fn vocab_parallel_ce(
    rng: &mut fastrand::Rng,
    shape: &[usize],
    parts: usize,
    classes: usize,
    shift: bool,
    token_parts: usize,
) {
    let r = shape.len();
    let vocab = shape[r - 1];
    let width = vocab / parts;
    let logits = uniform(rng, shape, -8.0, 8.0);
    let targets = ints(rng, &shape[..r - 1], classes);
    let shards: Vec<Tensor> = (0..parts)
        .map(|p| {
            eval1(
                Op::Slice {
                    x: &logits,
                    dim: -1,
                    start: d(p * width),
                    end: d((p + 1) * width),
                },
                &KernelCtx::default(),
            )
        })
        .collect();
    let rows: usize = shape[..r - 1].iter().product();
    let mut max = vec![f32::NEG_INFINITY; rows];
    for (p, s) in shards.iter().enumerate() {
        let m = kernels::ce_row_max(s, &shard(p * width, classes, shift, 1), 1).unwrap();
        for (a, b) in max.iter_mut().zip(m) {
            *a = a.max(b);
        }
    }
    let (mut sum, mut target) = (vec![0f32; rows], vec![0f32; rows]);
    for (p, s) in shards.iter().enumerate() {
        let sh = shard(p * width, classes, shift, 1);
        let (su, tl) = kernels::ce_row_sums(s, &max, &targets, &sh, 1).unwrap();
        for i in 0..rows {
            sum[i] += su[i];
            target[i] += tl[i];
        }
    }
    let stats = RowStats {
        max: max.clone(),
        sum: sum.clone(),
        target,
    };
    let loss = ce_loss(
        &stats,
        &shards[0].shape,
        &shard(0, classes, shift, token_parts),
    )
    .unwrap();
    let whole = Op::CrossEntropy {
        logits: &logits,
        targets: &targets,
        shift,
        classes: Some(d(classes)),
    };
    let want = reference(&whole).unwrap().remove(0).data[0] / token_parts as f64;
    let what = format!("vocab-parallel CE {shape:?} over {parts}, {classes} classes, shift {shift}, token_parts {token_parts}");
    assert_close(
        &Tensor {
            shape: vec![],
            data: vec![loss].into(),
        },
        &T64::scalar(want),
        0.0,
        &what,
    );
    let dloss = 0.8f32;
    let grads: Vec<Tensor> = shards
        .iter()
        .enumerate()
        .map(|(p, s)| {
            let sh = shard(p * width, classes, shift, token_parts);
            kernels::ce_grad(s, &targets, &stats, &sh, dloss, 1).unwrap()
        })
        .collect();
    let joined = eval1(
        Op::Concat {
            xs: grads.iter().collect(),
            dim: -1,
        },
        &KernelCtx::default(),
    );
    let mut want = reference(&Op::CrossEntropyGrad {
        logits: &logits,
        targets: &targets,
        dloss: &Tensor {
            shape: vec![],
            data: vec![dloss].into(),
        },
        shift,
        classes: Some(d(classes)),
    })
    .unwrap()
    .remove(0);
    for v in &mut want.data {
        *v /= token_parts as f64;
    }
    assert_close(&joined, &want, 1e-2, &what);
}

#[test]
fn vocabulary_parallel_cross_entropy() {
    let mut rng = fastrand::Rng::with_seed(15);
    for parts in [2, 3, 4] {
        for shift in [false, true] {
            for token_parts in [1, 2] {
                // 12 classes padded to 12 (none), to 12 from 10, from 7 (a rank with no real class at 4 parts).
                for classes in [12, 10, 7] {
                    vocab_parallel_ce(&mut rng, &[2, 5, 12], parts, classes, shift, token_parts);
                    vocab_parallel_ce(&mut rng, &[3, 12], parts, classes, shift, token_parts);
                }
            }
        }
    }
    // A rank past the real classes: −∞ maxima, zero sums and gradients.
    let logits = rand(&mut rng, &[2, 3, 4]);
    let targets = ints(&mut rng, &[2, 3], 5);
    let past = shard(8, 5, true, 1);
    let m = kernels::ce_row_max(&logits, &past, 1).unwrap();
    assert!(m.iter().all(|&v| v == f32::NEG_INFINITY));
    let max = vec![1.0; 6];
    let (s, t) = kernels::ce_row_sums(&logits, &max, &targets, &past, 1).unwrap();
    assert!(s.iter().chain(&t).all(|&v| v == 0.0));
    let stats = RowStats {
        max,
        sum: vec![1.0; 6],
        target: Vec::new(),
    };
    let g = kernels::ce_grad(&logits, &targets, &stats, &past, 1.0, 1).unwrap();
    assert!(g.data.iter().all(|&v| v == 0.0));
    // Threads give the same results.
    let logits = uniform(&mut rng, &[64, 2000], -5.0, 5.0);
    let targets = ints(&mut rng, &[64], 1900);
    let sh = shard(100, 1900, false, 1);
    let m1 = kernels::ce_row_max(&logits, &sh, 1).unwrap();
    assert_eq!(m1, kernels::ce_row_max(&logits, &sh, 2).unwrap());
    let s1 = kernels::ce_row_sums(&logits, &m1, &targets, &sh, 1).unwrap();
    assert_eq!(
        s1,
        kernels::ce_row_sums(&logits, &m1, &targets, &sh, 2).unwrap()
    );
    let stats = RowStats {
        max: m1,
        sum: s1.0,
        target: s1.1,
    };
    let g1 = kernels::ce_grad(&logits, &targets, &stats, &sh, 1.0, 1).unwrap();
    let g2 = kernels::ce_grad(&logits, &targets, &stats, &sh, 1.0, 2).unwrap();
    assert_eq!(g1, g2);
}

/// The cross-entropy over windows of rows (a fused output layer's chunks): each window's
/// statistics and gradient are the whole call's rows, to the bit, the gradient written over
/// the window's logits too; the windows' losses add up to the whole loss; a window past the
/// rows is an error.
#[test]
fn cross_entropy_over_windows_of_rows() {
    let mut rng = fastrand::Rng::with_seed(21);
    let (rows, vocab) = (12, 9);
    for shift in [false, true] {
        // A rank holding classes 4.. of 11 real ones: two of its 9 columns are padding.
        let whole = VocabShard {
            window: None,
            ..shard(4, 11, shift, 2)
        };
        let logits = rand(&mut rng, &[2, 6, vocab]);
        let targets = ints(&mut rng, &[2, 6], 11);
        let max = kernels::ce_row_max(&logits, &whole, 1).unwrap();
        let (sum, target) = kernels::ce_row_sums(&logits, &max, &targets, &whole, 1).unwrap();
        let stats = RowStats { max, sum, target };
        let grad = kernels::ce_grad(&logits, &targets, &stats, &whole, 1.5, 1).unwrap();
        let loss = ce_loss(&stats, &logits.shape, &whole).unwrap();
        let mut losses = 0.0;
        // Windows across the sequence boundary at row 6.
        for (first, end) in [(0, 5), (5, 9), (9, 12)] {
            let window = VocabShard {
                window: Some(RowWindow {
                    first,
                    total: rows,
                    seq: 6,
                }),
                ..whole
            };
            let part = Tensor {
                shape: vec![end - first, vocab],
                data: logits.data[first * vocab..end * vocab].to_vec().into(),
            };
            let max = kernels::ce_row_max(&part, &window, 1).unwrap();
            assert_eq!(max, stats.max[first..end]);
            let (sum, target) = kernels::ce_row_sums(&part, &max, &targets, &window, 1).unwrap();
            assert_eq!(sum, stats.sum[first..end]);
            assert_eq!(target, stats.target[first..end]);
            let part_stats = RowStats { max, sum, target };
            losses += ce_loss(&part_stats, &part.shape, &window).unwrap();
            let want = &grad.data[first * vocab..end * vocab];
            let g = kernels::ce_grad(&part, &targets, &part_stats, &window, 1.5, 2).unwrap();
            assert_eq!(g.data, want, "rows {first}..{end}, shift {shift}");
            let g =
                kernels::ce_grad_in_place(part, &targets, &part_stats, &window, 1.5, 2).unwrap();
            assert_eq!(g.data, want, "in place: rows {first}..{end}, shift {shift}");
        }
        assert!(
            (losses - loss).abs() <= 1e-6 * loss.abs(),
            "{losses} against {loss}"
        );
        // The whole gradient written over the logits: the same bits.
        let in_place = kernels::ce_grad_in_place(logits, &targets, &stats, &whole, 1.5, 1);
        assert_eq!(in_place.unwrap(), grad);
    }
    // A window that does not lie inside the rows, or whose targets are not the full ones.
    let part = rand(&mut rng, &[4, vocab]);
    let targets = ints(&mut rng, &[2, 6], 9);
    let past = VocabShard {
        window: Some(RowWindow {
            first: 10,
            total: 12,
            seq: 6,
        }),
        ..shard(0, 9, true, 1)
    };
    assert!(matches!(
        kernels::ce_row_max(&part, &past, 1),
        Err(KernelError::Invalid { .. })
    ));
    let inside = VocabShard {
        window: Some(RowWindow {
            first: 0,
            total: 12,
            seq: 6,
        }),
        ..past
    };
    let max = kernels::ce_row_max(&part, &inside, 1).unwrap();
    assert!(kernels::ce_row_sums(&part, &max, &t(&[4]), &inside, 1).is_err());
    assert!(kernels::ce_row_sums(&part, &max, &targets, &inside, 1).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Not local, errors

#[test]
fn collectives_are_not_local() {
    let x = Tensor::zeros(vec![2, 2]);
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
            parts: 2,
            partial_grad: false,
        },
        Op::ReduceScatter {
            x: &x,
            dim: 0,
            axis: MeshAxis::Tp,
            parts: 2,
        },
        Op::LocalSlice {
            x: &x,
            dim: 0,
            axis: MeshAxis::Tp,
            parts: 2,
        },
    ] {
        let r = eval(&op, &KernelCtx::default());
        assert!(matches!(r, Err(KernelError::NotLocal { .. })), "{r:?}");
    }
}

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape.to_vec())
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let l = KernelCtx::default();
    let err = |op: Op<&Tensor, Dim>| {
        let r = eval(&op, &l);
        assert!(r.is_err(), "{}: {r:?}", op.mnemonic());
        // The reference rejects the same inputs.
        assert!(
            reference(&op).is_err(),
            "{}: the reference accepts",
            op.mnemonic()
        );
        r.unwrap_err()
    };
    let (a, b) = (t(&[2, 3]), t(&[4, 5]));
    err(Op::MatMul {
        a: &a,
        b: &b,
        transpose_a: false,
        transpose_b: false,
    });
    err(Op::MatMul {
        a: &t(&[3]),
        b: &t(&[3, 2]),
        transpose_a: false,
        transpose_b: false,
    });
    err(Op::MatMul {
        a: &t(&[2, 2, 3]),
        b: &t(&[3, 3, 2]),
        transpose_a: false,
        transpose_b: false,
    });
    err(Op::Add(&a, &b));
    err(Op::Div(&t(&[3, 2]), &t(&[3])));
    let broken = Tensor {
        shape: vec![2, 2],
        data: vec![1.0].into(),
    };
    err(Op::Relu(&broken));
    err(Op::Add(&a, &broken));
    err(Op::Scale {
        x: &a,
        factor: Factor::InvSqrt(d(0)),
    });
    err(Op::LayerNorm {
        x: &a,
        weight: Some(&t(&[2])),
        bias: None,
        eps: 1e-5,
    });
    err(Op::LayerNorm {
        x: &a,
        weight: None,
        bias: None,
        eps: 0.0,
    });
    err(Op::RmsNorm {
        x: &t(&[]),
        weight: None,
        eps: 1e-5,
    });
    err(Op::LayerNormGrad {
        x: &a,
        weight: None,
        dy: &b,
        eps: 1e-5,
    });
    err(Op::Softmax {
        x: &t(&[4, 3]),
        causal: true,
    });
    err(Op::SoftmaxGrad { y: &a, dy: &b });
    err(Op::Reshape {
        x: &a,
        shape: ds(&[5]),
    });
    err(Op::Transpose {
        x: &a,
        perm: vec![0, 0],
    });
    err(Op::Transpose {
        x: &a,
        perm: vec![1],
    });
    err(Op::Slice {
        x: &a,
        dim: 2,
        start: d(0),
        end: d(1),
    });
    err(Op::Slice {
        x: &a,
        dim: 1,
        start: d(2),
        end: d(4),
    });
    err(Op::Split {
        x: &a,
        dim: 1,
        sizes: ds(&[1, 1]),
    });
    err(Op::Concat {
        xs: vec![&a, &b],
        dim: 0,
    });
    err(Op::Concat { xs: vec![], dim: 0 });
    err(Op::Pad {
        x: &a,
        dim: -3,
        before: d(1),
        after: d(1),
    });
    err(Op::Rotary {
        x: &t(&[2, 3, 5]),
        base: 10000.0,
        inverse: false,
        scaling: None,
    });
    err(Op::Rotary {
        x: &t(&[3, 4]),
        base: 10000.0,
        inverse: false,
        scaling: None,
    });
    err(Op::Dropout { x: &a, p: 1.0 });
    err(Op::DropoutGrad {
        dy: &a,
        forward: &b,
        p: 0.1,
    });
    err(Op::SumTo {
        x: &a,
        shape: ds(&[2]),
    });
    err(Op::Expand {
        x: &a,
        shape: ds(&[3, 3]),
    });
    err(Op::Fill {
        shape: ds(&[2]),
        value: 0.5,
        dtype: DType::I64,
    });
    err(Op::Fill {
        shape: ds(&[2]),
        value: f64::NAN,
        dtype: DType::F32,
    });
    err(Op::ActGrad {
        act: Activation::Gelu,
        x: &a,
        dy: &b,
    });
    // Ids and targets out of range.
    let table = t(&[3, 2]);
    for bad in [3.0, -1.0, 0.5, f32::NAN] {
        let ids = Tensor {
            shape: vec![2],
            data: vec![0.0, bad].into(),
        };
        let e = err(Op::Embedding {
            table: &table,
            ids: &ids,
        });
        assert!(matches!(e, KernelError::Index { element: 1, .. }), "{e:?}");
        err(Op::EmbeddingGrad {
            table: &table,
            ids: &ids,
            dy: &t(&[2, 2]),
        });
    }
    err(Op::Embedding {
        table: &t(&[3]),
        ids: &t(&[2]),
    });
    err(Op::EmbeddingGrad {
        table: &table,
        ids: &t(&[2]),
        dy: &t(&[2, 3]),
    });
    let logits = t(&[2, 3, 4]);
    let targets = Tensor {
        shape: vec![2, 3],
        data: vec![0.0, 1.0, 4.0, 0.0, 1.0, 2.0].into(),
    };
    let e = err(Op::CrossEntropy {
        logits: &logits,
        targets: &targets,
        shift: false,
        classes: None,
    });
    assert!(matches!(e, KernelError::Index { element: 2, .. }), "{e:?}");
    err(Op::CrossEntropy {
        logits: &logits,
        targets: &t(&[2, 3]),
        shift: false,
        classes: Some(d(5)),
    });
    err(Op::CrossEntropy {
        logits: &logits,
        targets: &t(&[3, 2]),
        shift: false,
        classes: None,
    });
    err(Op::CrossEntropy {
        logits: &t(&[2, 1, 4]),
        targets: &t(&[2, 1]),
        shift: true,
        classes: None,
    });
    err(Op::CrossEntropyGrad {
        logits: &logits,
        targets: &t(&[2, 3]),
        dloss: &t(&[1]),
        shift: true,
        classes: None,
    });
    // Too large to allocate: an error, not an abort.
    let e = eval(
        &Op::Fill {
            shape: ds(&[1 << 40, 1 << 40]),
            value: 0.0,
            dtype: DType::F32,
        },
        &l,
    );
    assert!(e.is_err());
    let e = eval(
        &Op::Pad {
            x: &a,
            dim: 0,
            before: d(usize::MAX),
            after: d(1),
        },
        &l,
    );
    assert!(e.is_err());
}

#[test]
fn bad_local_context_and_phase_inputs_are_errors() {
    let x = t(&[4, 6]);
    // Shard offsets that do not fit the full shape, or without it.
    for l in [
        KernelCtx {
            full_shape: Some(vec![4, 6]),
            offsets: Some(vec![0, 1]),
            ..KernelCtx::default()
        },
        KernelCtx {
            full_shape: Some(vec![4]),
            offsets: None,
            ..KernelCtx::default()
        },
        KernelCtx {
            offsets: Some(vec![0, 0]),
            ..KernelCtx::default()
        },
    ] {
        assert!(eval(&Op::Dropout { x: &x, p: 0.1 }, &l).is_err(), "{l:?}");
    }
    // A table shard past the declared vocabulary.
    let l = KernelCtx {
        vocab_offset: 4,
        vocab_rows: Some(5),
        ..KernelCtx::default()
    };
    let r = eval(
        &Op::Embedding {
            table: &t(&[2, 3]),
            ids: &t(&[1]),
        },
        &l,
    );
    assert!(matches!(r, Err(KernelError::Invalid { .. })), "{r:?}");
    // The phases check their lengths.
    let logits = t(&[2, 3, 4]);
    let targets = t(&[2, 3]);
    let (sh, plain) = (shard(0, 4, true, 1), shard(0, 4, false, 1));
    assert!(kernels::ce_row_max(&t(&[4]), &sh, 1).is_err());
    assert!(kernels::ce_row_sums(&logits, &[0.0; 5], &targets, &sh, 1).is_err());
    assert!(kernels::ce_row_sums(&logits, &[0.0; 6], &t(&[6]), &sh, 1).is_err());
    let stats = |max: &[f32], sum: &[f32], target: &[f32]| RowStats {
        max: max.to_vec(),
        sum: sum.to_vec(),
        target: target.to_vec(),
    };
    let ones = stats(&[0.0; 6], &[1.0; 6], &[0.0; 6]);
    assert!(ce_loss(&stats(&[0.0; 6], &[1.0; 6], &[0.0; 5]), &[2, 3, 4], &sh).is_err());
    assert!(ce_loss(&stats(&[0.0; 2], &[1.0; 2], &[0.0; 2]), &[2, 1, 4], &sh).is_err());
    assert!(ce_loss(&ones, &[2, 3, 4], &shard(0, 4, true, 0)).is_err());
    let short = stats(&[0.0; 6], &[1.0; 4], &[]);
    assert!(kernels::ce_grad(&logits, &targets, &short, &sh, 1.0, 1).is_err());
    let bad_targets = Tensor {
        shape: vec![2, 3],
        data: vec![0.0, 9.0, 0.0, 0.0, 0.0, 0.0].into(),
    };
    assert!(kernels::ce_grad(&logits, &bad_targets, &ones, &sh, 1.0, 1).is_err());
    assert!(kernels::ce_row_sums(&logits, &[0.0; 6], &bad_targets, &plain, 1).is_err());
    // With shift, the first target of each sequence is not read.
    let unread = Tensor {
        shape: vec![2, 3],
        data: vec![99.0, 0.0, 1.0, -5.0, 2.0, 3.0].into(),
    };
    assert!(kernels::ce_row_sums(&logits, &[0.0; 6], &unread, &sh, 1).is_ok());
}
