//! The CUDA fused attention (`cuda::kernels::attention` and `attention_grad`) against a naive
//! `f64` attention on the host: forward (output and row log-sum-exps) and backward
//! (`dq`, `dk`, `dv`), causal or not, without dropout and with the unfused `Dropout`'s mask at a
//! shard's placement (the mask read back from the device's own `Dropout` kernel on ones, and
//! checked against `ferrotron_ir::reference::dropout_keeps`), odd sizes, rows wider than one
//! warp's column group, more keys than one tile of 32; in `f32` storage (relative 2e-5 with a
//! floor of 2e-5 of the output's largest element forward, 1e-4 backward) and in bf16 storage
//! (the reference on the same bf16-rounded inputs; relative 2e-2, floor 1e-2); bit-identical on
//! a second run; and bad shapes refused. Sequence first (`AttentionSpec::seq_first`, operands
//! `[..., seq, heads, d]`): the same bits as heads first on the host-transposed operands, forward
//! and backward (the log-sum-exps and the dropout mask those of `[..., heads, queries, keys]`
//! either way), and its bad shapes refused. Through the executor: a GPT with dropout on its
//! probabilities, at tp = 1, 2, 4 (each rank a shard of the heads), gives the same loss, outputs
//! and gradients with the fused attention as with the unfused chain, on the GPU.
//!
//! Without a GPU each test prints `SKIPPED` and passes, unless `FERROTRON_REQUIRE_GPU` is set;
//! `cuda_emulated.rs` runs them on the CPU stand-in for the driver (`cuda-emu`).

use ferrotron_backend_tests::{assert_close, runs_agree_on_the_gpu, zoo_model, Tol};
use ferrotron_cuda::kernels;
use ferrotron_cuda::{CudaTensor, RankDevice, Storage};
use ferrotron_exec::kernel::{AttentionSaved, AttentionSpec};
use ferrotron_exec::verify::Outputs;
use ferrotron_exec::{KernelError, Placement, RunOptions, Tensor};
use ferrotron_ir::reference::dropout_keeps;
use ferrotron_ir::{Dim, Op};
use half::bf16;

// ---------------------------------------------------------------------------------------------
// The device

/// A rank on GPU 0, or `None` (see [`ferrotron_backend_tests::device`]).
fn device(test: &str) -> Option<RankDevice> {
    ferrotron_backend_tests::device(test, env!("CARGO_CRATE_NAME"))
}

// ---------------------------------------------------------------------------------------------
// The host reference

/// One attention's sizes and attributes, as a test case.
#[derive(Clone, Debug)]
struct Case {
    lead: Vec<usize>,
    queries: usize,
    keys: usize,
    d: usize,
    dv: usize,
    factor: f64,
    causal: bool,
    dropout: f64,
    at: Placement,
}

impl Case {
    fn spec(&self) -> AttentionSpec {
        AttentionSpec {
            factor: self.factor,
            causal: self.causal,
            dropout: self.dropout,
            seq_first: false,
        }
    }

    fn batch(&self) -> usize {
        self.lead.iter().product()
    }

    fn shape(&self, tail: &[usize]) -> Vec<usize> {
        self.lead.iter().chain(tail).copied().collect()
    }

    fn visible(&self, i: usize) -> usize {
        if self.causal {
            i + 1 + self.keys - self.queries
        } else {
            self.keys
        }
    }
}

/// The host values of one case, bf16-rounded for a bf16 run.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

fn uniform(rng: &mut fastrand::Rng, shape: Vec<usize>, scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape,
        data: (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect(),
    }
}

fn round_bf16(t: &Tensor) -> Tensor {
    Tensor {
        shape: t.shape.clone(),
        data: t.data.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
    }
}

/// The naive attention in `f64`: `(out, lse, dq, dk, dv)`, `keep[(b·queries + i)·keys + j]` the
/// dropout mask of the probabilities (all true without dropout).
fn reference(c: &Case, x: &Inputs, keep: &[bool]) -> [Tensor; 5] {
    let (nq, nk, d, dv) = (c.queries, c.keys, c.d, c.dv);
    let scale = if c.dropout > 0.0 {
        1.0 / (1.0 - c.dropout)
    } else {
        1.0
    };
    let f = |t: &Tensor, i: usize| f64::from(t.data[i]);
    let mut out = vec![0f64; c.batch() * nq * dv];
    let mut lse = vec![0f64; c.batch() * nq];
    let mut dq = vec![0f64; c.batch() * nq * d];
    let mut dk = vec![0f64; c.batch() * nk * d];
    let mut dvv = vec![0f64; c.batch() * nk * dv];
    for b in 0..c.batch() {
        for i in 0..nq {
            let row = b * nq + i;
            let vis = c.visible(i);
            let s: Vec<f64> = (0..vis)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|t| f(&x.q, row * d + t) * f(&x.k, (b * nk + j) * d + t))
                        .sum();
                    dot * c.factor
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = s.iter().map(|&s| (s - m).exp()).sum();
            lse[row] = m + l.ln();
            let p: Vec<f64> = s.iter().map(|&s| (s - m).exp() / l).collect();
            let kept = |j: usize| keep[row * nk + j];
            let z: Vec<f64> = (0..vis)
                .map(|j| if kept(j) { p[j] * scale } else { 0.0 })
                .collect();
            for col in 0..dv {
                out[row * dv + col] = (0..vis)
                    .map(|j| z[j] * f(&x.v, (b * nk + j) * dv + col))
                    .sum();
            }
            // Backward.
            let dd: f64 = (0..dv)
                .map(|col| f(&x.dout, row * dv + col) * out[row * dv + col])
                .sum();
            for j in 0..vis {
                let dz: f64 = (0..dv)
                    .map(|col| f(&x.dout, row * dv + col) * f(&x.v, (b * nk + j) * dv + col))
                    .sum();
                let dp = if kept(j) { dz * scale } else { 0.0 };
                let ds = p[j] * (dp - dd);
                for t in 0..d {
                    dq[row * d + t] += c.factor * ds * f(&x.k, (b * nk + j) * d + t);
                    dk[(b * nk + j) * d + t] += c.factor * ds * f(&x.q, row * d + t);
                }
                for col in 0..dv {
                    dvv[(b * nk + j) * dv + col] += z[j] * f(&x.dout, row * dv + col);
                }
            }
        }
    }
    let t = |shape: Vec<usize>, data: Vec<f64>| Tensor {
        shape,
        data: data.into_iter().map(|v| v as f32).collect(),
    };
    [
        t(c.shape(&[nq, dv]), out),
        t(c.shape(&[nq]), lse),
        t(c.shape(&[nq, d]), dq),
        t(c.shape(&[nk, d]), dk),
        t(c.shape(&[nk, dv]), dvv),
    ]
}

/// The unfused `Dropout`'s mask on the probabilities `[..., queries, keys]` at the case's
/// placement, read from the device's own kernel (on ones) and checked against the reference
/// mask of the full tensor.
fn dropout_mask(dev: &RankDevice, c: &Case) -> Vec<bool> {
    let shape = c.shape(&[c.queries, c.keys]);
    let n: usize = shape.iter().product();
    if c.dropout == 0.0 {
        return vec![true; n];
    }
    let ones = Tensor {
        shape: shape.clone(),
        data: vec![1.0; n].into(),
    };
    let ones = kernels::upload(dev, &ones, Storage::F32).expect("upload");
    let op: Op<&CudaTensor, Dim> = Op::Dropout {
        x: &ones,
        p: c.dropout,
    };
    let dropped = kernels::eval(dev, &op, &c.at).expect("Dropout").remove(0);
    let keep: Vec<bool> = kernels::download(dev, &dropped)
        .expect("download")
        .data
        .iter()
        .map(|&v| v != 0.0)
        .collect();
    // The same mask from the reference: element `e` of the shard sits at its place in the full
    // tensor.
    let full = c.at.full_shape.clone().unwrap_or(shape.clone());
    let offsets = c.at.offsets.clone().unwrap_or(vec![0; shape.len()]);
    for (e, &kept) in keep.iter().enumerate() {
        let (mut rest, mut flat, mut stride) = (e, 0u64, 1u64);
        for ax in (0..shape.len()).rev() {
            let idx = rest % shape[ax] + offsets[ax];
            rest /= shape[ax];
            flat += idx as u64 * stride;
            stride *= full[ax] as u64;
        }
        let counter = flat.wrapping_add(c.at.dropout_seed.wrapping_mul(1 << 40));
        assert_eq!(kept, dropout_keeps(counter, c.dropout), "mask element {e}");
    }
    let dropped_count = keep.iter().filter(|&&k| !k).count();
    assert!(dropped_count > 0, "{c:?}: the mask drops nothing");
    keep
}

// ---------------------------------------------------------------------------------------------
// Comparison

const F32_FWD: Tol = Tol {
    rtol: 2e-5,
    floor: 2e-5,
};
const F32_BWD: Tol = Tol {
    rtol: 1e-4,
    floor: 1e-4,
};
const BF16: Tol = Tol {
    rtol: 2e-2,
    floor: 1e-2,
};

fn bits(dev: &RankDevice, t: &CudaTensor) -> Vec<u32> {
    let t = kernels::download(dev, t).expect("download");
    t.data.iter().map(|v| v.to_bits()).collect()
}

/// Runs one case forward and backward in both storage types and compares with the reference;
/// each pass runs twice and must give the same bits.
fn run_case(dev: &RankDevice, name: &str, c: &Case, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let raw = Inputs {
        q: uniform(&mut rng, c.shape(&[c.queries, c.d]), 1.5),
        k: uniform(&mut rng, c.shape(&[c.keys, c.d]), 1.5),
        v: uniform(&mut rng, c.shape(&[c.keys, c.dv]), 1.0),
        dout: uniform(&mut rng, c.shape(&[c.queries, c.dv]), 1.0),
    };
    let keep = dropout_mask(dev, c);
    for dtype in [Storage::F32, Storage::Bf16] {
        let x = match dtype {
            Storage::F32 => Inputs {
                q: raw.q.clone(),
                k: raw.k.clone(),
                v: raw.v.clone(),
                dout: raw.dout.clone(),
            },
            Storage::Bf16 => Inputs {
                q: round_bf16(&raw.q),
                k: round_bf16(&raw.k),
                v: round_bf16(&raw.v),
                dout: round_bf16(&raw.dout),
            },
        };
        let what = format!("{name} ({dtype:?})");
        let want = reference(c, &x, &keep);
        let up = |t: &Tensor| kernels::upload(dev, t, dtype).expect("upload");
        let (q, k, v, dout) = (up(&x.q), up(&x.k), up(&x.v), up(&x.dout));
        let spec = c.spec();
        let (out, lse) = kernels::attention(dev, &q, &k, &v, &spec, &c.at)
            .unwrap_or_else(|e| panic!("{what}: attention: {e}"));
        assert_eq!(out.dtype(), dtype, "{what}: the output's storage");
        assert_eq!(lse.dtype(), Storage::F32, "{what}: the lse's storage");
        let saved = AttentionSaved {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
            dout: &dout,
        };
        let (dq, dk, dv) = kernels::attention_grad(dev, saved, &spec, &c.at)
            .unwrap_or_else(|e| panic!("{what}: attention_grad: {e}"));
        let (fwd, bwd, lse_tol) = match dtype {
            Storage::F32 => (F32_FWD, F32_BWD, F32_FWD),
            // The lse is f32 from bf16 inputs: only the scores' sums differ in order.
            Storage::Bf16 => (BF16, BF16, F32_BWD),
        };
        let got = [&out, &lse, &dq, &dk, &dv];
        let names = ["out", "lse", "dq", "dk", "dv"];
        for (n, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            let tol = match *n {
                "out" => fwd,
                "lse" => lse_tol,
                _ => bwd,
            };
            let g = kernels::download(dev, g).expect("download");
            assert_close(&format!("{what} {n}"), &g, w, tol);
        }
        // Deterministic: the same bits again.
        let (out2, lse2) = kernels::attention(dev, &q, &k, &v, &spec, &c.at).unwrap();
        let (dq2, dk2, dv2) = kernels::attention_grad(dev, saved, &spec, &c.at).unwrap();
        for (n, (a, b)) in names.iter().zip(
            [&out, &lse, &dq, &dk, &dv]
                .into_iter()
                .zip([&out2, &lse2, &dq2, &dk2, &dv2]),
        ) {
            assert_eq!(
                bits(dev, a),
                bits(dev, b),
                "{what} {n}: a second run differs"
            );
        }
    }
}

/// A shard of 2 of 6 heads (offset 3) of a `[2, 6, queries, keys]` probabilities tensor, with a
/// non-zero seed.
fn sharded(lead: &[usize], queries: usize, keys: usize) -> Placement {
    Placement {
        full_shape: Some(vec![lead[0], 6, queries, keys]),
        offsets: Some(vec![0, 3, 0, 0]),
        dropout_seed: 5,
        ..Placement::default()
    }
}

fn case(lead: &[usize], (queries, keys, d, dv): (usize, usize, usize, usize)) -> Case {
    Case {
        lead: lead.to_vec(),
        queries,
        keys,
        d,
        dv,
        factor: 1.0 / (d as f64).sqrt(),
        causal: false,
        dropout: 0.0,
        at: Placement::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn attention_matches_the_naive_reference() {
    let Some(dev) = device("attention") else {
        return;
    };
    let lead = [2, 2];
    for causal in [false, true] {
        for dropout in [0.0, 0.1] {
            let mut c = case(&lead, (7, 13, 5, 3));
            c.causal = causal;
            c.dropout = dropout;
            c.at = sharded(&lead, 7, 13);
            let name = format!("attention causal {causal} dropout {dropout}");
            run_case(&dev, &name, &c, 7 + u64::from(causal));
        }
    }
    // As many queries as keys, one leading axis, an unsharded placement.
    let mut c = case(&[3], (9, 9, 8, 8));
    c.causal = true;
    c.dropout = 0.1;
    run_case(&dev, "square causal", &c, 11);
}

#[test]
fn attention_over_many_keys_and_wide_rows() {
    let Some(dev) = device("attention_wide") else {
        return;
    };
    // More keys than one tile of 32: the online softmax rescales across tiles.
    let mut c = case(&[1, 2], (5, 70, 4, 6));
    c.causal = true;
    c.dropout = 0.1;
    c.at = sharded(&[1, 2], 5, 70);
    run_case(&dev, "many keys", &c, 3);
    let mut c = case(&[2], (40, 37, 3, 2));
    c.factor = 2.0;
    run_case(&dev, "many queries", &c, 4);
    // Rows wider than one warp's 256 columns: several warps per row.
    let c = case(&[1], (3, 4, 300, 260));
    run_case(&dev, "wide rows", &c, 5);
    // Empty: no keys (output 0, lse −∞, dq 0), no queries (dk, dv 0).
    run_case(&dev, "no keys", &case(&[2], (3, 0, 4, 5)), 6);
    run_case(&dev, "no queries", &case(&[2], (0, 5, 4, 3)), 6);
}

#[test]
fn attention_refuses_bad_shapes() {
    let Some(dev) = device("attention_refusals") else {
        return;
    };
    let z = |shape: &[usize]| {
        let t = Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()].into(),
        };
        kernels::upload(&dev, &t, Storage::F32).unwrap()
    };
    let spec = AttentionSpec {
        factor: 0.5,
        causal: false,
        dropout: 0.0,
        seq_first: false,
    };
    let at = Placement::default();
    let is_invalid = |r: Result<_, KernelError>, what: &str| match r {
        Err(KernelError::Invalid { .. }) => {}
        Err(e) => panic!("{what}: the wrong error: {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let (q, k, v) = (z(&[2, 7, 5]), z(&[2, 13, 5]), z(&[2, 13, 3]));
    is_invalid(
        kernels::attention(&dev, &q, &z(&[2, 13, 4]), &v, &spec, &at).map(|_| ()),
        "q and k of different widths",
    );
    is_invalid(
        kernels::attention(&dev, &q, &k, &z(&[3, 13, 3]), &spec, &at).map(|_| ()),
        "different leading axes",
    );
    let causal = AttentionSpec {
        causal: true,
        ..spec
    };
    is_invalid(
        kernels::attention(&dev, &z(&[2, 14, 5]), &k, &v, &causal, &at).map(|_| ()),
        "a causal attention with more queries than keys",
    );
    let (out, lse) = kernels::attention(&dev, &q, &k, &v, &spec, &at).unwrap();
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        dout: &out,
    };
    kernels::attention_grad(&dev, saved, &spec, &at).expect("the good shapes");
    let bad_lse = z(&[2, 6]);
    let bad_out = z(&[2, 7, 4]);
    let lse_bf16 =
        kernels::upload(&dev, &kernels::download(&dev, &lse).unwrap(), Storage::Bf16).unwrap();
    for (what, s) in [
        (
            "an lse of the wrong shape",
            AttentionSaved {
                lse: &bad_lse,
                ..saved
            },
        ),
        (
            "an output of the wrong shape",
            AttentionSaved {
                out: &bad_out,
                ..saved
            },
        ),
        (
            "a gradient of the wrong shape",
            AttentionSaved {
                dout: &bad_out,
                ..saved
            },
        ),
        (
            "a bf16 lse",
            AttentionSaved {
                lse: &lse_bf16,
                ..saved
            },
        ),
    ] {
        is_invalid(
            kernels::attention_grad(&dev, s, &spec, &at).map(|_| ()),
            what,
        );
    }
    // A dropout placement the probabilities do not fit.
    let dropping = AttentionSpec {
        dropout: 0.1,
        ..spec
    };
    let misplaced = Placement {
        full_shape: Some(vec![2, 7, 12]),
        ..Placement::default()
    };
    is_invalid(
        kernels::attention(&dev, &q, &k, &v, &dropping, &misplaced).map(|_| ()),
        "a placement the probabilities do not fit",
    );
}

#[test]
fn fused_attention_in_a_model_equals_the_unfused_chain() {
    if device("attention_in_a_model").is_none() {
        return;
    }
    // GPT-2 small's graph (dropout 0.1 on the probabilities), shrunk; 11 positions: odd sizes.
    let dims = [
        ("vocab", 97),
        ("positions", 16),
        ("seq", 11),
        ("batch", 2),
        ("hidden", 24),
        ("heads", 4),
        ("layers", 2),
    ];
    let g = zoo_model("gpt2-small.ron", &dims);
    let fused = RunOptions {
        dropout_seed: 3,
        ..RunOptions::default()
    };
    assert!(fused.fuse && fused.fuse_attention, "fused by default");
    let unfused = RunOptions {
        fuse_attention: false,
        ..fused.clone()
    };
    runs_agree_on_the_gpu((&g, 7), (&fused, &unfused), Outputs::Compared, |_, _| {});
}

// ---------------------------------------------------------------------------------------------
// Sequence first

/// Swaps axes `r − 3` and `r − 2`: heads first `[..., heads, seq, w]` ↔ sequence first
/// `[..., seq, heads, w]`.
fn swap_seq_heads(t: &Tensor) -> Tensor {
    let r = t.shape.len();
    let (a, b, w) = (t.shape[r - 3], t.shape[r - 2], t.shape[r - 1]);
    let outer: usize = t.shape[..r - 3].iter().product();
    let mut data = Vec::with_capacity(t.data.len());
    for o in 0..outer {
        for y in 0..b {
            for x in 0..a {
                let src = ((o * a + x) * b + y) * w;
                data.extend_from_slice(&t.data[src..src + w]);
            }
        }
    }
    let mut shape = t.shape.clone();
    shape.swap(r - 3, r - 2);
    Tensor {
        shape,
        data: data.into(),
    }
}

/// Runs a case (its `lead` ending in the heads) heads first and sequence first (on the operands
/// transposed on the host), in both storage types: the sequence-first results, transposed back,
/// must have the same bits as the heads-first ones (the same arithmetic in the same order), and
/// both match the reference; the sequence-first pass again gives the same bits.
fn run_seq_first_case(dev: &RankDevice, name: &str, c: &Case, seed: u64) {
    assert!(!c.lead.is_empty(), "{name}: the lead must end in the heads");
    let mut rng = fastrand::Rng::with_seed(seed);
    let raw = Inputs {
        q: uniform(&mut rng, c.shape(&[c.queries, c.d]), 1.5),
        k: uniform(&mut rng, c.shape(&[c.keys, c.d]), 1.5),
        v: uniform(&mut rng, c.shape(&[c.keys, c.dv]), 1.0),
        dout: uniform(&mut rng, c.shape(&[c.queries, c.dv]), 1.0),
    };
    let keep = dropout_mask(dev, c);
    let heads_first = c.spec();
    let seq_first = AttentionSpec {
        seq_first: true,
        ..heads_first
    };
    for dtype in [Storage::F32, Storage::Bf16] {
        let x = match dtype {
            Storage::F32 => Inputs {
                q: raw.q.clone(),
                k: raw.k.clone(),
                v: raw.v.clone(),
                dout: raw.dout.clone(),
            },
            Storage::Bf16 => Inputs {
                q: round_bf16(&raw.q),
                k: round_bf16(&raw.k),
                v: round_bf16(&raw.v),
                dout: round_bf16(&raw.dout),
            },
        };
        let what = format!("{name} ({dtype:?})");
        let want = reference(c, &x, &keep);
        let up = |t: &Tensor| kernels::upload(dev, t, dtype).expect("upload");
        let down = |t: &CudaTensor| kernels::download(dev, t).expect("download");
        // Both layouts: [out, lse, dq, dk, dv] as the device returns them.
        let pass = |spec: &AttentionSpec, x: [&Tensor; 4]| {
            let (q, k, v, dout) = (up(x[0]), up(x[1]), up(x[2]), up(x[3]));
            let (out, lse) = kernels::attention(dev, &q, &k, &v, spec, &c.at)
                .unwrap_or_else(|e| panic!("{what}: attention {spec:?}: {e}"));
            assert_eq!(out.dtype(), dtype, "{what}: the output's storage");
            assert_eq!(lse.dtype(), Storage::F32, "{what}: the lse's storage");
            let saved = AttentionSaved {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
                dout: &dout,
            };
            let (dq, dk, dv) = kernels::attention_grad(dev, saved, spec, &c.at)
                .unwrap_or_else(|e| panic!("{what}: attention_grad {spec:?}: {e}"));
            [out, lse, dq, dk, dv]
        };
        let hf = pass(&heads_first, [&x.q, &x.k, &x.v, &x.dout]);
        let sf_in = [&x.q, &x.k, &x.v, &x.dout].map(swap_seq_heads);
        let sf = pass(&seq_first, [&sf_in[0], &sf_in[1], &sf_in[2], &sf_in[3]]);
        let names = ["out", "lse", "dq", "dk", "dv"];
        let (fwd, bwd, lse_tol) = match dtype {
            Storage::F32 => (F32_FWD, F32_BWD, F32_FWD),
            Storage::Bf16 => (BF16, BF16, F32_BWD),
        };
        for (idx, n) in names.iter().enumerate() {
            let (h, s) = (down(&hf[idx]), down(&sf[idx]));
            // The lse is [..., heads, queries] in both layouts; the rest transpose.
            let s_back = if *n == "lse" {
                s.clone()
            } else {
                assert_eq!(
                    s.shape,
                    swap_seq_heads(&h).shape,
                    "{what} {n}: the sequence-first shape"
                );
                swap_seq_heads(&s)
            };
            assert_eq!(s_back.shape, h.shape, "{what} {n}: shape");
            let hb: Vec<u32> = h.data.iter().map(|v| v.to_bits()).collect();
            let sb: Vec<u32> = s_back.data.iter().map(|v| v.to_bits()).collect();
            if let Some(e) = (0..hb.len()).find(|&e| hb[e] != sb[e]) {
                panic!(
                    "{what} {n}: sequence first differs from heads first at element {e} of \
                     {:?} (heads first): {} vs {}",
                    h.shape, s_back.data[e], h.data[e]
                );
            }
            let tol = match *n {
                "out" => fwd,
                "lse" => lse_tol,
                _ => bwd,
            };
            assert_close(
                &format!("{what} {n} (sequence first)"),
                &s_back,
                &want[idx],
                tol,
            );
        }
        // Deterministic: the same bits again.
        let again = pass(&seq_first, [&sf_in[0], &sf_in[1], &sf_in[2], &sf_in[3]]);
        for (n, (a, b)) in names.iter().zip(sf.iter().zip(&again)) {
            assert_eq!(
                bits(dev, a),
                bits(dev, b),
                "{what} {n}: a second sequence-first run differs"
            );
        }
    }
}

#[test]
fn attention_seq_first_equals_heads_first_on_transposed_operands() {
    let Some(dev) = device("attention_seq_first") else {
        return;
    };
    // [2, seq, 3 heads, d]: 3 of 6 heads at offset 3 of the probabilities, odd sizes.
    let lead = [2, 3];
    for causal in [false, true] {
        for dropout in [0.0, 0.1] {
            let mut c = case(&lead, (7, 13, 5, 3));
            c.causal = causal;
            c.dropout = dropout;
            c.at = sharded(&lead, 7, 13);
            let name = format!("seq first causal {causal} dropout {dropout}");
            run_seq_first_case(&dev, &name, &c, 21 + u64::from(causal));
        }
    }
    // The probabilities a shard of both the batch and the heads, another seed.
    let mut c = case(&[2, 3], (6, 9, 4, 7));
    c.causal = true;
    c.dropout = 0.2;
    c.at = Placement {
        full_shape: Some(vec![5, 8, 6, 9]),
        offsets: Some(vec![1, 4, 0, 0]),
        dropout_seed: 9,
        ..Placement::default()
    };
    run_seq_first_case(&dev, "seq first sharded batch and heads", &c, 23);
    // No axes before the sequence: q [queries, heads, d]; square and causal.
    let mut c = case(&[4], (9, 9, 8, 8));
    c.causal = true;
    c.dropout = 0.1;
    run_seq_first_case(&dev, "seq first rank 3", &c, 24);
    // Two axes before the sequence, and a single head.
    run_seq_first_case(
        &dev,
        "seq first two outer axes",
        &case(&[2, 1, 3], (5, 6, 3, 2)),
        25,
    );
    run_seq_first_case(&dev, "seq first one head", &case(&[2, 1], (5, 6, 3, 4)), 26);
}

#[test]
fn attention_seq_first_over_many_keys_and_wide_rows() {
    let Some(dev) = device("attention_seq_first_wide") else {
        return;
    };
    // More keys and queries than one tile of 32.
    let mut c = case(&[1, 2], (35, 70, 4, 6));
    c.causal = true;
    c.dropout = 0.1;
    c.at = sharded(&[1, 2], 35, 70);
    run_seq_first_case(&dev, "seq first many keys", &c, 31);
    // Rows wider than one warp's 256 columns.
    run_seq_first_case(
        &dev,
        "seq first wide rows",
        &case(&[1, 2], (3, 4, 300, 260)),
        32,
    );
    // Empty: no keys, no queries.
    run_seq_first_case(&dev, "seq first no keys", &case(&[2, 3], (3, 0, 4, 5)), 33);
    run_seq_first_case(
        &dev,
        "seq first no queries",
        &case(&[2, 3], (0, 5, 4, 3)),
        33,
    );
}

#[test]
fn attention_seq_first_refuses_bad_shapes() {
    let Some(dev) = device("attention_seq_first_refusals") else {
        return;
    };
    let z = |shape: &[usize]| {
        let t = Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()].into(),
        };
        kernels::upload(&dev, &t, Storage::F32).unwrap()
    };
    let spec = AttentionSpec {
        factor: 0.5,
        causal: false,
        dropout: 0.0,
        seq_first: true,
    };
    let at = Placement::default();
    let is_invalid = |r: Result<_, KernelError>, what: &str| match r {
        Err(KernelError::Invalid { .. }) => {}
        Err(e) => panic!("{what}: the wrong error: {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    // [batch 2, seq, heads 3, d].
    let (q, k, v) = (z(&[2, 7, 3, 5]), z(&[2, 13, 3, 5]), z(&[2, 13, 3, 3]));
    is_invalid(
        kernels::attention(&dev, &z(&[7, 5]), &z(&[13, 5]), &z(&[13, 3]), &spec, &at).map(|_| ()),
        "rank 2 sequence first",
    );
    is_invalid(
        kernels::attention(&dev, &q, &z(&[2, 13, 4, 5]), &v, &spec, &at).map(|_| ()),
        "k with other heads",
    );
    is_invalid(
        kernels::attention(&dev, &q, &k, &z(&[2, 13, 2, 3]), &spec, &at).map(|_| ()),
        "v with other heads",
    );
    is_invalid(
        kernels::attention(&dev, &q, &z(&[2, 13, 3, 4]), &v, &spec, &at).map(|_| ()),
        "q and k of different widths",
    );
    is_invalid(
        kernels::attention(&dev, &q, &k, &z(&[2, 12, 3, 3]), &spec, &at).map(|_| ()),
        "k and v of different lengths",
    );
    is_invalid(
        kernels::attention(&dev, &q, &k, &z(&[3, 13, 3, 3]), &spec, &at).map(|_| ()),
        "different leading axes",
    );
    let causal = AttentionSpec {
        causal: true,
        ..spec
    };
    is_invalid(
        kernels::attention(&dev, &z(&[2, 14, 3, 5]), &k, &v, &causal, &at).map(|_| ()),
        "a causal attention with more queries than keys",
    );
    let (out, lse) = kernels::attention(&dev, &q, &k, &v, &spec, &at).expect("the good shapes");
    assert_eq!(out.shape, [2, 7, 3, 3], "the output is sequence first");
    assert_eq!(lse.shape, [2, 3, 7], "the lse is heads first");
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        dout: &out,
    };
    let (dq, dk, dv) = kernels::attention_grad(&dev, saved, &spec, &at).expect("the good shapes");
    assert_eq!(
        [dq.shape, dk.shape, dv.shape],
        [q.shape.clone(), k.shape.clone(), v.shape.clone()],
        "the gradients are shaped as the operands"
    );
    // Heads-first shapes of the output and lse are wrong here.
    let hf_out = z(&[2, 3, 7, 3]);
    let sf_lse = z(&[2, 7, 3]);
    for (what, s) in [
        (
            "a heads-first output",
            AttentionSaved {
                out: &hf_out,
                ..saved
            },
        ),
        (
            "a heads-first gradient",
            AttentionSaved {
                dout: &hf_out,
                ..saved
            },
        ),
        (
            "an lse [..., queries, heads]",
            AttentionSaved {
                lse: &sf_lse,
                ..saved
            },
        ),
    ] {
        is_invalid(
            kernels::attention_grad(&dev, s, &spec, &at).map(|_| ()),
            what,
        );
    }
    // The probabilities [2, 3, 7, 13] do not fit 2 heads.
    let dropping = AttentionSpec {
        dropout: 0.1,
        ..spec
    };
    let misplaced = Placement {
        full_shape: Some(vec![2, 2, 7, 13]),
        ..Placement::default()
    };
    is_invalid(
        kernels::attention(&dev, &q, &k, &v, &dropping, &misplaced).map(|_| ()),
        "a placement the probabilities do not fit",
    );
    is_invalid(
        kernels::attention_grad(&dev, saved, &dropping, &misplaced).map(|_| ()),
        "a placement the probabilities do not fit (backward)",
    );
}
