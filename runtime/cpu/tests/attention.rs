//! The fused attention (`Backend::attention` and `attention_grad`) against the unfused chain it
//! replaces, evaluated with the CPU kernels themselves: `MatMul(q, kᵀ) → Scale → Softmax →
//! Dropout → MatMul(·, v)` forward, and the gradients autodiff builds for those ops backward.
//! Causal and not, with and without dropout on a placed shard, odd sizes and a GPT-2 head's;
//! and the sequence-first layout against heads first on transposed operands.

use ferrotron_cpu::{kernels, Cpu};
use ferrotron_exec::backend::Backend;
use ferrotron_exec::kernel::{AttentionSaved, AttentionSpec, KernelError, Placement};
use ferrotron_exec::Tensor;
use ferrotron_ir::op::{Factor, Op};
use ferrotron_ir::Dim;

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect(),
    }
}

fn eval(op: Op<&Tensor, Dim>, at: &Placement) -> Tensor {
    let name = op.mnemonic();
    let mut out = kernels::eval(&op, at, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
    out.remove(0)
}

fn matmul(a: &Tensor, b: &Tensor, transpose_a: bool, transpose_b: bool) -> Tensor {
    let op = Op::MatMul {
        a,
        b,
        transpose_a,
        transpose_b,
    };
    eval(op, &Placement::default())
}

fn scale(x: &Tensor, factor: f64) -> Tensor {
    let op = Op::Scale {
        x,
        factor: Factor::Const(factor),
    };
    eval(op, &Placement::default())
}

/// The unfused chain's results: the output, the row log-sum-exps (in `f64` from the scores),
/// and `(dq, dk, dv)`.
struct Unfused {
    out: Tensor,
    lse: Tensor,
    grads: [Tensor; 3],
}

fn unfused([q, k, v, dout]: [&Tensor; 4], spec: &AttentionSpec, at: &Placement) -> Unfused {
    let s = matmul(q, k, false, true);
    let scaled = scale(&s, spec.factor);
    let causal = spec.causal;
    let p = eval(Op::Softmax { x: &scaled, causal }, at);
    let dropout = spec.dropout > 0.0;
    let z = if dropout {
        eval(
            Op::Dropout {
                x: &p,
                p: spec.dropout,
            },
            at,
        )
    } else {
        p.clone()
    };
    let out = matmul(&z, v, false, false);

    let r = q.shape.len();
    let (queries, keys) = (q.shape[r - 2], k.shape[r - 2]);
    let lse_data = scaled
        .data
        .chunks_exact(keys)
        .enumerate()
        .map(|(row, s)| {
            let i = row % queries;
            let vis = if causal { i + 1 + keys - queries } else { keys };
            let m = s[..vis]
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let l: f64 = s[..vis].iter().map(|&x| (x as f64 - m).exp()).sum();
            (m + l.ln()) as f32
        })
        .collect();
    let lse = Tensor {
        shape: q.shape[..r - 1].to_vec(),
        data: lse_data,
    };

    let dz = matmul(dout, v, false, true);
    let dp = if dropout {
        eval(
            Op::DropoutGrad {
                dy: &dz,
                forward: &z,
                p: spec.dropout,
            },
            at,
        )
    } else {
        dz
    };
    let dscaled = eval(Op::SoftmaxGrad { y: &p, dy: &dp }, at);
    let ds = scale(&dscaled, spec.factor);
    let dq = matmul(&ds, k, false, false);
    let dk = matmul(&ds, q, true, false);
    let dv = matmul(&z, dout, true, false);
    Unfused {
        out,
        lse,
        grads: [dq, dk, dv],
    }
}

/// `|x − y| ≤ max(rtol·(|x| + |y|), atol·max|want|)` elementwise: relative, with a floor scaled
/// to the tensor's magnitude for elements that are sums cancelling to near zero.
fn assert_close(got: &Tensor, want: &Tensor, rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let magnitude = want.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(magnitude > 0.0, "{what}: all zeros");
    for (i, (&x, &y)) in got.data.iter().zip(&want.data).enumerate() {
        let tol = (rtol * (x.abs() + y.abs())).max(atol * magnitude);
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {i}: {x} vs {y} (tolerance {tol:e})"
        );
    }
}

struct Case {
    lead: Vec<usize>,
    queries: usize,
    keys: usize,
    d: usize,
    dv: usize,
}

impl Case {
    fn new(lead: &[usize], queries: usize, keys: usize, d: usize, dv: usize) -> Case {
        Case {
            lead: lead.to_vec(),
            queries,
            keys,
            d,
            dv,
        }
    }

    fn shape(&self, rows: usize, width: usize) -> Vec<usize> {
        [&self.lead[..], &[rows, width]].concat()
    }

    /// Random `q`, `k`, `v` and `dout`.
    fn inputs(&self, seed: u64) -> [Tensor; 4] {
        [
            random(&self.shape(self.queries, self.d), seed, 1.5),
            random(&self.shape(self.keys, self.d), seed + 1, 1.5),
            random(&self.shape(self.keys, self.dv), seed + 2, 1.0),
            random(&self.shape(self.queries, self.dv), seed + 3, 1.0),
        ]
    }

    /// The probabilities' placement for dropout: a shard of a larger tensor, at non-zero
    /// offsets along the batch and heads axes, with a seed.
    fn placement(&self) -> Placement {
        let mut full = self.shape(self.queries, self.keys);
        let mut offsets = vec![0; full.len()];
        for (a, extra) in [(0, 1), (1, 3)] {
            if a + 2 < full.len() {
                full[a] += extra + 2;
                offsets[a] = extra;
            }
        }
        Placement {
            full_shape: Some(full),
            offsets: Some(offsets),
            dropout_seed: 11,
            ..Placement::default()
        }
    }
}

fn fused(
    [q, k, v, dout]: [&Tensor; 4],
    spec: &AttentionSpec,
    at: &Placement,
    threads: usize,
) -> (Tensor, Tensor, [Tensor; 3]) {
    let cpu = Cpu { threads };
    let (out, lse) = cpu.attention(q, k, v, spec, at).expect("attention");
    let saved = AttentionSaved {
        q,
        k,
        v,
        out: &out,
        lse: &lse,
        dout,
    };
    let grads = cpu.attention_grad(saved, spec, at).expect("attention_grad");
    (out, lse, grads)
}

fn check(case: &Case, causal: bool, dropout: f64, seed: u64) {
    let [q, k, v, dout] = case.inputs(seed);
    let spec = AttentionSpec {
        factor: 1.0 / (case.d as f64).sqrt(),
        causal,
        dropout,
        seq_first: false,
    };
    let at = if dropout > 0.0 {
        case.placement()
    } else {
        Placement::default()
    };
    let operands = [&q, &k, &v, &dout];
    let want = unfused(operands, &spec, &at);
    let (out, lse, [dq, dk, dv]) = fused(operands, &spec, &at, 1);
    let what = |t: &str| {
        format!(
            "{t} of {:?}×{}×{} d {} dv {} causal {causal} dropout {dropout}",
            case.lead, case.queries, case.keys, case.d, case.dv
        )
    };
    assert_close(&out, &want.out, 1e-5, 2e-6, &what("out"));
    assert_close(&lse, &want.lse, 1e-6, 1e-6, &what("lse"));
    for (got, want, name) in [
        (&dq, &want.grads[0], "dq"),
        (&dk, &want.grads[1], "dk"),
        (&dv, &want.grads[2], "dv"),
    ] {
        assert_close(got, want, 1e-4, 5e-6, &what(name));
    }
}

#[test]
fn fused_attention_is_the_unfused_chain() {
    let odd = Case::new(&[2, 3], 7, 13, 5, 3);
    let square = Case::new(&[3], 9, 9, 4, 6);
    // Past one tile each way, with ragged last tiles.
    let tiles = Case::new(&[2], 70, 131, 16, 24);
    for (n, case) in [odd, square, tiles].iter().enumerate() {
        for causal in [false, true] {
            for dropout in [0.0, 0.1] {
                check(case, causal, dropout, 10 * n as u64);
            }
        }
    }
}

#[test]
fn fused_attention_at_a_gpt2_size() {
    let case = Case::new(&[2, 3], 128, 128, 64, 64);
    for (causal, dropout) in [(true, 0.0), (false, 0.0), (true, 0.1)] {
        check(&case, causal, dropout, 100);
    }
}

#[test]
fn fused_attention_is_the_same_on_any_thread_count() {
    let case = Case::new(&[2, 3], 128, 160, 64, 32);
    let [q, k, v, dout] = case.inputs(7);
    let spec = AttentionSpec {
        factor: 0.125,
        causal: true,
        dropout: 0.1,
        seq_first: false,
    };
    let at = case.placement();
    let operands = [&q, &k, &v, &dout];
    let one = fused(operands, &spec, &at, 1);
    for threads in [2, 3] {
        assert_eq!(
            fused(operands, &spec, &at, threads),
            one,
            "{threads} threads"
        );
    }
}

fn invalid<T>(r: Result<T, KernelError>) -> bool {
    matches!(r, Err(KernelError::Invalid { .. }))
}

#[test]
fn bad_shapes_are_errors() {
    let cpu = Cpu { threads: 1 };
    let at = Placement::default();
    let spec = AttentionSpec {
        factor: 0.5,
        causal: false,
        dropout: 0.0,
        seq_first: false,
    };
    let t = |shape: &[usize]| random(shape, 1, 1.0);
    let (q, k, v) = (t(&[2, 7, 5]), t(&[2, 13, 5]), t(&[2, 13, 3]));
    // Widths that disagree, leading axes that disagree, more queries than keys when causal.
    assert!(invalid(cpu.attention(&q, &t(&[2, 13, 4]), &v, &spec, &at)));
    assert!(invalid(cpu.attention(&q, &k, &t(&[3, 13, 3]), &spec, &at)));
    let causal = AttentionSpec {
        causal: true,
        ..spec
    };
    assert!(invalid(cpu.attention(&k, &q, &t(&[2, 7, 3]), &causal, &at)));
    // Data that does not fill its shape.
    let short = Tensor {
        shape: vec![2, 7, 5],
        data: vec![0.0; 69].into(),
    };
    assert!(invalid(cpu.attention(&short, &k, &v, &spec, &at)));
    // A dropout placement that does not fit the probabilities.
    let dropout = AttentionSpec {
        dropout: 0.1,
        ..spec
    };
    let misplaced = Placement {
        full_shape: Some(vec![2, 7, 12]),
        ..Placement::default()
    };
    assert!(invalid(cpu.attention(&q, &k, &v, &dropout, &misplaced)));

    let (out, lse) = cpu.attention(&q, &k, &v, &spec, &at).expect("attention");
    let dout = t(&[2, 7, 3]);
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        dout: &dout,
    };
    assert!(cpu.attention_grad(saved, &spec, &at).is_ok());
    let wrong_lse = t(&[2, 8]);
    let wrong_out = t(&[2, 7, 4]);
    for bad in [
        AttentionSaved {
            lse: &wrong_lse,
            ..saved
        },
        AttentionSaved {
            out: &wrong_out,
            ..saved
        },
        AttentionSaved {
            dout: &wrong_out,
            ..saved
        },
    ] {
        let r = cpu.attention_grad(bad, &spec, &at);
        assert!(
            invalid(r),
            "{:?} {:?} {:?}",
            bad.out.shape,
            bad.lse.shape,
            bad.dout.shape
        );
    }
}

#[test]
fn empty_sizes_are_not_errors() {
    let cpu = Cpu { threads: 2 };
    let at = Placement::default();
    // (queries, keys, d, dv): no queries, no keys, no width, no value width.
    for (queries, keys, d, dv) in [(0, 3, 2, 2), (3, 0, 2, 2), (3, 4, 0, 2), (3, 4, 2, 0)] {
        for causal in [false, true] {
            if causal && queries > keys {
                continue;
            }
            let spec = AttentionSpec {
                factor: 0.5,
                causal,
                dropout: 0.1,
                seq_first: false,
            };
            let case = Case::new(&[2], queries, keys, d, dv);
            let [q, k, v, dout] = case.inputs(3);
            let what = format!("{queries}×{keys} d {d} dv {dv} causal {causal}");
            let (out, lse) = cpu.attention(&q, &k, &v, &spec, &at).expect(&what);
            assert_eq!(out.shape, [2, queries, dv], "{what}");
            assert_eq!(lse.shape, [2, queries], "{what}");
            if keys == 0 {
                assert!(out.data.iter().all(|&x| x == 0.0), "{what}");
            }
            let saved = AttentionSaved {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
                dout: &dout,
            };
            let [dq, dk, dv] = cpu.attention_grad(saved, &spec, &at).expect(&what);
            assert_eq!(
                (dq.shape, dk.shape, dv.shape),
                (q.shape, k.shape, v.shape),
                "{what}"
            );
        }
    }
}

#[test]
fn empty_tensors_with_huge_leading_axes_are_not_allocations() {
    let cpu = Cpu { threads: 2 };
    let at = Placement::default();
    let spec = AttentionSpec {
        factor: 1.0,
        causal: false,
        dropout: 0.0,
        seq_first: false,
    };
    let empty = |shape: &[usize]| Tensor {
        shape: shape.to_vec(),
        data: Vec::new().into(),
    };
    let huge = 1 << 40;
    let (q, k, v) = (
        empty(&[huge, 0, 4]),
        empty(&[huge, 0, 4]),
        empty(&[huge, 0, 2]),
    );
    let (out, lse) = cpu
        .attention(&q, &k, &v, &spec, &at)
        .expect("empty attention");
    assert_eq!(
        (&out.shape[..], &lse.shape[..]),
        (&[huge, 0, 2][..], &[huge, 0][..])
    );
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        dout: &out,
    };
    let grads = cpu
        .attention_grad(saved, &spec, &at)
        .expect("empty gradients");
    assert!(grads.iter().all(|g| g.data.is_empty()));
}

/// `t` with its sequence and heads axes swapped (the third and second from last): sequence
/// first `[..., seq, heads, d]` to heads first `[..., heads, seq, d]` and back.
fn swap_seq_heads(t: &Tensor) -> Tensor {
    let r = t.shape.len();
    let (a, b, w) = (t.shape[r - 3], t.shape[r - 2], t.shape[r - 1]);
    let mut shape = t.shape.clone();
    shape.swap(r - 3, r - 2);
    let mut data = Vec::with_capacity(t.data.len());
    for outer in t.data.chunks_exact(a * b * w) {
        for j in 0..b {
            for i in 0..a {
                data.extend_from_slice(&outer[(i * b + j) * w..][..w]);
            }
        }
    }
    Tensor {
        shape,
        data: data.into(),
    }
}

fn bits(t: &Tensor) -> (Vec<usize>, Vec<u32>) {
    (
        t.shape.clone(),
        t.data.iter().map(|x| x.to_bits()).collect(),
    )
}

/// Sequence first on `[outer..., seq, heads, d]` operands against heads first on their
/// transposes: the same bits, the log-sum-exps (`[outer..., heads, queries]`) as they are, the
/// output and gradients transposed back. `case.lead` is `[outer..., heads]`, and its placement
/// that of the probabilities `[outer..., heads, queries, keys]` in both layouts.
fn check_seq_first(case: &Case, causal: bool, dropout: f64, seed: u64) {
    let heads_first = case.inputs(seed);
    let [q, k, v, dout] = heads_first.each_ref().map(swap_seq_heads);
    let spec = AttentionSpec {
        factor: 1.0 / (case.d as f64).sqrt(),
        causal,
        dropout,
        seq_first: false,
    };
    let seq_first = AttentionSpec {
        seq_first: true,
        ..spec
    };
    let at = if dropout > 0.0 {
        case.placement()
    } else {
        Placement::default()
    };
    let [hq, hk, hv, hdout] = &heads_first;
    let (want_out, want_lse, want_grads) = fused([hq, hk, hv, hdout], &spec, &at, 1);
    let (out, lse, grads) = fused([&q, &k, &v, &dout], &seq_first, &at, 1);
    let what = |t: &str| {
        format!(
            "{t} of {:?}×{}×{} d {} dv {} causal {causal} dropout {dropout}",
            case.lead, case.queries, case.keys, case.d, case.dv
        )
    };
    let r = q.shape.len();
    assert_eq!(out.shape, [&q.shape[..r - 1], &[case.dv]].concat());
    assert_eq!(
        bits(&swap_seq_heads(&out)),
        bits(&want_out),
        "{}",
        what("out")
    );
    assert_eq!(bits(&lse), bits(&want_lse), "{}", what("lse"));
    for ((got, want), (name, operand)) in
        grads
            .iter()
            .zip(&want_grads)
            .zip([("dq", &q), ("dk", &k), ("dv", &v)])
    {
        assert_eq!(got.shape, operand.shape, "{}", what(name));
        assert_eq!(bits(&swap_seq_heads(got)), bits(want), "{}", what(name));
    }
}

#[test]
fn seq_first_is_heads_first_on_transposed_operands() {
    // `lead` is `[outer..., heads]`.
    let odd = Case::new(&[2, 3], 7, 13, 5, 3);
    let no_outer = Case::new(&[4], 9, 9, 4, 6);
    let two_outer = Case::new(&[2, 1, 3], 5, 6, 3, 2);
    // Past one tile each way, with ragged last tiles.
    let tiles = Case::new(&[2, 2], 70, 131, 16, 24);
    for (n, case) in [odd, no_outer, two_outer, tiles].iter().enumerate() {
        for causal in [false, true] {
            for dropout in [0.0, 0.1] {
                check_seq_first(case, causal, dropout, 20 + 10 * n as u64);
            }
        }
    }
}

#[test]
fn seq_first_at_a_gpt2_size() {
    let case = Case::new(&[2, 12], 128, 128, 64, 64);
    for (causal, dropout) in [(true, 0.0), (false, 0.1)] {
        check_seq_first(&case, causal, dropout, 200);
    }
}

#[test]
fn seq_first_is_the_same_on_any_thread_count() {
    let case = Case::new(&[2, 3], 128, 160, 64, 32);
    let [q, k, v, dout] = case.inputs(9).each_ref().map(swap_seq_heads);
    let spec = AttentionSpec {
        factor: 0.125,
        causal: true,
        dropout: 0.1,
        seq_first: true,
    };
    let at = case.placement();
    let operands = [&q, &k, &v, &dout];
    let one = fused(operands, &spec, &at, 1);
    for threads in [2, 3] {
        assert_eq!(
            fused(operands, &spec, &at, threads),
            one,
            "{threads} threads"
        );
    }
}

#[test]
fn bad_seq_first_shapes_are_errors() {
    let cpu = Cpu { threads: 1 };
    let at = Placement::default();
    let spec = AttentionSpec {
        factor: 0.5,
        causal: false,
        dropout: 0.0,
        seq_first: true,
    };
    let t = |shape: &[usize]| random(shape, 1, 1.0);
    // `[batch, seq, heads, d]`.
    let (q, k, v) = (t(&[2, 7, 3, 5]), t(&[2, 13, 3, 5]), t(&[2, 13, 3, 4]));
    assert!(cpu.attention(&q, &k, &v, &spec, &at).is_ok());
    // Heads that differ between q and k, and between k and v; batches that differ; widths
    // that differ; lengths of k and v that differ; too few axes.
    assert!(invalid(cpu.attention(
        &q,
        &t(&[2, 13, 4, 5]),
        &v,
        &spec,
        &at
    )));
    assert!(invalid(cpu.attention(
        &q,
        &k,
        &t(&[2, 13, 1, 4]),
        &spec,
        &at
    )));
    assert!(invalid(cpu.attention(
        &q,
        &t(&[1, 13, 3, 5]),
        &v,
        &spec,
        &at
    )));
    assert!(invalid(cpu.attention(
        &q,
        &t(&[2, 13, 3, 6]),
        &v,
        &spec,
        &at
    )));
    assert!(invalid(cpu.attention(
        &q,
        &k,
        &t(&[2, 12, 3, 4]),
        &spec,
        &at
    )));
    let (q2, k2, v2) = (t(&[7, 5]), t(&[13, 5]), t(&[13, 4]));
    assert!(invalid(cpu.attention(&q2, &k2, &v2, &spec, &at)));
    // A dropout placement that is q's shape's, not the probabilities' `[2, 3, 7, 13]`.
    let dropout = AttentionSpec {
        dropout: 0.1,
        ..spec
    };
    let misplaced = Placement {
        full_shape: Some(vec![2, 7, 3, 13]),
        ..Placement::default()
    };
    assert!(invalid(cpu.attention(&q, &k, &v, &dropout, &misplaced)));
    let placed = Placement {
        full_shape: Some(vec![2, 3, 7, 13]),
        ..Placement::default()
    };
    assert!(cpu.attention(&q, &k, &v, &dropout, &placed).is_ok());

    let (out, lse) = cpu.attention(&q, &k, &v, &spec, &at).expect("attention");
    assert_eq!(
        (&out.shape[..], &lse.shape[..]),
        (&[2, 7, 3, 4][..], &[2, 3, 7][..])
    );
    let dout = t(&[2, 7, 3, 4]);
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        dout: &dout,
    };
    assert!(cpu.attention_grad(saved, &spec, &at).is_ok());
    // The heads-first shapes of the output and the log-sum-exps' sequence-first ones.
    let (heads_first_out, seq_first_lse) = (t(&[2, 3, 7, 4]), t(&[2, 7, 3]));
    for bad in [
        AttentionSaved {
            lse: &seq_first_lse,
            ..saved
        },
        AttentionSaved {
            out: &heads_first_out,
            ..saved
        },
        AttentionSaved {
            dout: &heads_first_out,
            ..saved
        },
    ] {
        assert!(invalid(cpu.attention_grad(bad, &spec, &at)));
    }
}

#[test]
fn empty_seq_first_sizes_are_not_errors() {
    let cpu = Cpu { threads: 2 };
    let at = Placement::default();
    // (heads, queries, keys, d, dv).
    for (heads, queries, keys, d, dv) in [
        (0, 3, 4, 2, 2),
        (3, 0, 4, 2, 2),
        (3, 3, 0, 2, 2),
        (3, 3, 4, 0, 2),
        (3, 3, 4, 2, 0),
    ] {
        for causal in [false, true] {
            if causal && queries > keys {
                continue;
            }
            let spec = AttentionSpec {
                factor: 0.5,
                causal,
                dropout: 0.1,
                seq_first: true,
            };
            let t = |rows: usize, width: usize| random(&[2, rows, heads, width], 3, 1.0);
            let (q, k, v, dout) = (t(queries, d), t(keys, d), t(keys, dv), t(queries, dv));
            let what = format!("{heads} heads {queries}×{keys} d {d} dv {dv} causal {causal}");
            let (out, lse) = cpu.attention(&q, &k, &v, &spec, &at).expect(&what);
            assert_eq!(out.shape, [2, queries, heads, dv], "{what}");
            assert_eq!(lse.shape, [2, heads, queries], "{what}");
            if keys == 0 {
                assert!(out.data.iter().all(|&x| x == 0.0), "{what}");
            }
            let saved = AttentionSaved {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
                dout: &dout,
            };
            let [dq, dk, dv] = cpu.attention_grad(saved, &spec, &at).expect(&what);
            assert_eq!(
                (dq.shape, dk.shape, dv.shape),
                (q.shape, k.shape, v.shape),
                "{what}"
            );
        }
    }
}
