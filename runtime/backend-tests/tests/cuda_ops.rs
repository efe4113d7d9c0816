//! The CUDA kernels against the CPU backend, op by op: every op `cpu::kernels::eval` handles,
//! through `cuda::kernels::eval`, and every fused op through `cuda::kernels::eval_fused` (also
//! against the GPU's unfused pair: to the bit in `f32`), on random inputs (fixed seeds, odd and
//! round sizes), in `f32` storage (to `f32` rounding: relative 1e-5 with a floor of 1e-5 of the output's largest
//! element, 1e-4 for matmuls) and in bf16 storage (the CPU computing on the same bf16-rounded
//! inputs; relative 1e-2); the same errors for the same bad inputs; and the functions around
//! `eval` (moving tensors, the communicators' reductions and layouts, the cross-entropy's
//! phases, AdamW).
//!
//! Without a GPU each test prints `SKIPPED: no CUDA device (<reason>)` and passes, unless
//! `FERROTRON_REQUIRE_GPU` is set; `cuda_emulated.rs` runs them all on the CPU stand-in for the
//! driver (`cuda-emu`). Elementwise kernels are ported operation for operation and
//! should agree with the CPU to the bit in `f32`; where they do not, the test says how many
//! elements differ (on stderr) without failing, as long as they are within tolerance.

use ferrotron_backend_tests::{assert_close, say, Tol};
use ferrotron_cpu::Cpu;
use ferrotron_cuda::{Cuda, CudaTensor, DeviceData, RankDevice, Storage};
use ferrotron_exec::backend::{adamw_host, AdamW};
use ferrotron_exec::fuse::Fused;
use ferrotron_exec::kernel::{CeStats, RowStats, RowWindow, VocabShard};
use ferrotron_exec::{Backend, KernelError, Placement, ReduceOp, Tensor};
use ferrotron_ir::op::{Activation, Factor, MeshAxis, Op};
use ferrotron_ir::{DType as IrDType, Dim};
use half::bf16;
use std::sync::Arc;

/// Where a shard sits in the full tensors, and the CPU's threads: the one context these tests
/// give both backends' kernels.
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

impl KernelCtx {
    fn at(&self) -> Placement {
        Placement {
            vocab_offset: self.vocab_offset,
            vocab_rows: self.vocab_rows,
            full_shape: self.full_shape.clone(),
            offsets: self.offsets.clone(),
            dropout_seed: self.dropout_seed,
            token_parts: self.token_parts,
        }
    }
}

/// The CPU backend's kernels, given a [`KernelCtx`].
mod cpu {
    pub use ferrotron_cpu::kernels::*;
    use ferrotron_exec::{KernelError, Tensor};
    use ferrotron_ir::{Dim, Op};

    pub fn eval(op: &Op<&Tensor, Dim>, l: &super::KernelCtx) -> Result<Vec<Tensor>, KernelError> {
        ferrotron_cpu::kernels::eval(op, &l.at(), l.threads)
    }
}

/// The CUDA backend's kernels, given a [`KernelCtx`].
mod gpu {
    pub use ferrotron_cuda::kernels::*;
    use ferrotron_cuda::{CudaTensor, RankDevice};
    use ferrotron_exec::fuse::Fused;
    use ferrotron_exec::KernelError;
    use ferrotron_ir::{Dim, Op};

    pub fn eval(
        dev: &RankDevice,
        op: &Op<&CudaTensor, Dim>,
        l: &super::KernelCtx,
    ) -> Result<Vec<CudaTensor>, KernelError> {
        ferrotron_cuda::kernels::eval(dev, op, &l.at())
    }

    pub fn eval_fused(
        dev: &RankDevice,
        op: &Fused<&CudaTensor>,
        _: &super::KernelCtx,
    ) -> Result<CudaTensor, KernelError> {
        ferrotron_cuda::kernels::eval_fused(dev, op)
    }
}

/// What a rank holds of a cross-entropy's classes.
fn shard(class_offset: usize, real_classes: usize, shift: bool, token_parts: usize) -> VocabShard {
    VocabShard {
        class_offset,
        real_classes,
        shift,
        token_parts,
        window: None,
    }
}

/// `sh` for the window of rows `first..` of `total` rows of sequences of `seq`.
fn windowed(sh: VocabShard, first: usize, total: usize, seq: usize) -> VocabShard {
    VocabShard {
        window: Some(RowWindow { first, total, seq }),
        ..sh
    }
}

// ---------------------------------------------------------------------------------------------
// The device

/// A rank on GPU 0, or `None` (see [`ferrotron_backend_tests::device`]).
fn device(test: &str) -> Option<RankDevice> {
    ferrotron_backend_tests::device(test, env!("CARGO_CRATE_NAME"))
}

// ---------------------------------------------------------------------------------------------
// Inputs

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

/// Values away from zero (divisors).
fn away(rng: &mut fastrand::Rng, shape: &[usize]) -> Tensor {
    let mut t = uniform(rng, shape, 0.5, 2.0);
    for v in &mut t.data {
        if rng.bool() {
            *v = -*v;
        }
    }
    t
}

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape.to_vec(), data).expect("data fills the shape")
}

fn round_bf16(t: &Tensor) -> Tensor {
    Tensor {
        shape: t.shape.clone(),
        data: t.data.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// Weights and activations: stored in the run's dtype.
    Float,
    /// Ids and targets: always `f32`.
    Index,
}

#[derive(Clone)]
struct Input {
    t: Tensor,
    kind: Kind,
}

fn fl(t: Tensor) -> Input {
    Input {
        t,
        kind: Kind::Float,
    }
}

fn ix(t: Tensor) -> Input {
    Input {
        t,
        kind: Kind::Index,
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison

const F32: Tol = Tol {
    rtol: 1e-5,
    floor: 1e-5,
};
const F32_GEMM: Tol = Tol {
    rtol: 1e-4,
    floor: 1e-4,
};
const BF16: Tol = Tol {
    rtol: 1e-2,
    floor: 1e-3,
};

/// Runs `op` (inputs by index) on the CPU and the GPU, in `f32` and in bf16 storage, and
/// compares every output, or the errors when the CPU refuses the inputs. `exact`: the kernel is
/// expected to agree to the bit in `f32` (reported on stderr when it does not).
fn check(
    dev: &RankDevice,
    name: &str,
    op: &Op<usize, Dim>,
    inputs: &[Input],
    local: &KernelCtx,
    tol: Tol,
    exact: bool,
) {
    check_with(
        dev,
        name,
        inputs,
        tol,
        exact,
        |host| {
            let op = op
                .try_map(|&i| Ok::<_, ()>(&host[i]), |x| Ok(x.clone()))
                .unwrap();
            cpu::eval(&op, local)
        },
        |on_dev| {
            let op = op
                .try_map(|&i| Ok::<_, ()>(&on_dev[i]), |x| Ok(x.clone()))
                .unwrap();
            gpu::eval(dev, &op, local)
        },
    );
}

/// [`check`]'s comparison for any computation: `cpu` on the host inputs (bf16-rounded in the
/// bf16 run), `gpu` on the uploaded ones.
fn check_with(
    dev: &RankDevice,
    name: &str,
    inputs: &[Input],
    tol: Tol,
    exact: bool,
    cpu: impl Fn(&[Tensor]) -> Result<Vec<Tensor>, KernelError>,
    gpu: impl Fn(&[CudaTensor]) -> Result<Vec<CudaTensor>, KernelError>,
) {
    for dtype in [Storage::F32, Storage::Bf16] {
        let host: Vec<Tensor> = inputs
            .iter()
            .map(|i| match (dtype, i.kind) {
                (Storage::Bf16, Kind::Float) => round_bf16(&i.t),
                _ => i.t.clone(),
            })
            .collect();
        let on_dev = upload_all(dev, inputs, dtype);
        let what = format!("{name} ({dtype:?})");
        // Reading the outputs back is part of the GPU's answer: a check the kernels queued
        // (the ids' range) reports there.
        let answer = gpu(&on_dev).and_then(|ts| {
            for t in &ts {
                gpu::download(dev, t)?;
            }
            Ok(ts)
        });
        match (cpu(&host), answer) {
            (Ok(want), Ok(got)) => {
                assert_eq!(want.len(), got.len(), "{what}: outputs");
                for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                    let stored = g.dtype();
                    let g = gpu::download(dev, g).expect("download");
                    let tol = if dtype == Storage::Bf16 { BF16 } else { tol };
                    let differ = assert_close(&format!("{what} output {k}"), &g, w, tol);
                    if exact && dtype == Storage::F32 && differ > 0 {
                        say(&format!(
                            "note: {what} output {k}: {differ} of {} elements not bit-identical \
                             (within tolerance)",
                            w.data.len()
                        ));
                    }
                    if dtype == Storage::F32 {
                        assert_eq!(stored, Storage::F32, "{what}: output {k} stored as");
                    }
                }
            }
            // Compared as text: an error may carry a NaN (a bad id), which is not == itself.
            (Err(we), Err(ge)) => {
                assert_eq!(
                    format!("{ge:?}"),
                    format!("{we:?}"),
                    "{what}: the errors differ"
                )
            }
            (Ok(_), Err(e)) => panic!("{what}: the CPU computes it, the GPU fails: {e}"),
            (Err(e), Ok(_)) => panic!("{what}: the CPU refuses it ({e}), the GPU computes it"),
        }
    }
}

/// The inputs on the device: floats stored as `dtype`, ids and targets as `f32`.
fn upload_all(dev: &RankDevice, inputs: &[Input], dtype: Storage) -> Vec<CudaTensor> {
    inputs
        .iter()
        .map(|i| {
            let storage = if i.kind == Kind::Index {
                Storage::F32
            } else {
                dtype
            };
            gpu::upload(dev, &i.t, storage).expect("upload")
        })
        .collect()
}

fn local() -> KernelCtx {
    KernelCtx::default()
}

// ---------------------------------------------------------------------------------------------
// Elementwise

#[test]
fn the_memory_pool_keeps_what_a_step_frees() {
    // Opening the GPU sets its pool's release threshold to the most (freed memory is kept for
    // the next step's allocations, not handed back at each synchronisation).
    let Some(_dev) = device("pool") else { return };
    let threshold = ferrotron_cuda::device::pool_release_threshold(0).unwrap();
    assert_eq!(threshold, u64::MAX);
}

#[test]
fn unary_ops_and_their_gradients() {
    let Some(dev) = device("unary") else { return };
    let mut rng = fastrand::Rng::with_seed(1);
    let special = t(
        &[12],
        vec![
            -100.0, -88.0, -87.5, -9.0, -1e-30, 0.0, 1e-30, 0.5, 9.0, 87.9, 88.5, 100.0,
        ],
    );
    for shape in [&[3][..], &[2, 50, 7], &[783], &[0, 4]] {
        let x = uniform(&mut rng, shape, -12.0, 12.0);
        let dy = rand(&mut rng, shape);
        for (x, label) in [(&x, "random"), (&special, "special")] {
            if label == "special" && shape != [3] {
                continue;
            }
            let dy = if label == "special" {
                uniform(&mut rng, &[12], -2.0, 2.0)
            } else {
                dy.clone()
            };
            let ops: Vec<(&str, Op<usize, Dim>)> = vec![
                (
                    "Scale",
                    Op::Scale {
                        x: 0,
                        factor: Factor::Const(0.37),
                    },
                ),
                (
                    "Scale InvSqrt",
                    Op::Scale {
                        x: 0,
                        factor: Factor::InvSqrt(d(64)),
                    },
                ),
                ("Gelu", Op::Gelu(0)),
                ("GeluTanh", Op::GeluTanh(0)),
                ("Silu", Op::Silu(0)),
                ("Relu", Op::Relu(0)),
            ];
            for (name, op) in ops {
                let n = format!("{name} {label} {shape:?}");
                check(&dev, &n, &op, &[fl(x.clone())], &local(), F32, true);
            }
            for act in [
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::Silu,
                Activation::Relu,
            ] {
                let op = Op::ActGrad { act, x: 0, dy: 1 };
                let n = format!("ActGrad {act:?} {label} {shape:?}");
                let inputs = [fl(x.clone()), fl(dy.clone())];
                check(&dev, &n, &op, &inputs, &local(), F32, true);
            }
        }
    }
    // A mismatched gradient is refused as on the CPU.
    let op = Op::ActGrad {
        act: Activation::Silu,
        x: 0,
        dy: 1,
    };
    let inputs = [fl(rand(&mut rng, &[3, 4])), fl(rand(&mut rng, &[4, 3]))];
    check(&dev, "ActGrad mismatch", &op, &inputs, &local(), F32, true);
}

#[test]
fn binary_ops_broadcast_as_numpy() {
    let Some(dev) = device("binary") else { return };
    let mut rng = fastrand::Rng::with_seed(2);
    let pairs: &[(&[usize], &[usize])] = &[
        (&[2, 3, 5], &[2, 3, 5]),
        (&[2, 3, 5], &[5]),
        (&[5], &[2, 3, 5]),
        (&[2, 3, 5], &[]),
        (&[], &[4]),
        (&[2, 1, 5], &[3, 1]),
        (&[4, 1, 6], &[1, 5, 1]),
        (&[7, 1], &[1, 783]),
        (&[2, 3, 1, 5], &[3, 4, 1]),
        (&[50, 64], &[1, 64]),
        (&[0, 3], &[3]),
        (&[2, 3], &[3, 2]),
    ];
    for &(sa, sb) in pairs {
        let a = rand(&mut rng, sa);
        let b = away(&mut rng, sb);
        let ops: [(&str, Op<usize, Dim>); 4] = [
            ("Add", Op::Add(0, 1)),
            ("Sub", Op::Sub(0, 1)),
            ("Mul", Op::Mul(0, 1)),
            ("Div", Op::Div(0, 1)),
        ];
        for (name, op) in ops {
            let n = format!("{name} {sa:?} {sb:?}");
            check(
                &dev,
                &n,
                &op,
                &[fl(a.clone()), fl(b.clone())],
                &local(),
                F32,
                true,
            );
        }
    }
}

#[test]
fn add_into_sums_in_the_accumulators_buffer_as_add_does() {
    let Some(_) = device("add_into") else { return };
    let mut rng = fastrand::Rng::with_seed(5);
    for dtype in [Storage::F32, Storage::Bf16] {
        let cuda = Cuda::new(0, 1, dtype).expect("a backend on GPU 0");
        let up = |x: &Tensor| cuda.upload(x, IrDType::F32).expect("upload");
        let back = |x: &CudaTensor| cuda.download(x).expect("download");
        let buffer = |x: &CudaTensor| match &x.data {
            DeviceData::F32(b) => Arc::as_ptr(b) as usize,
            DeviceData::Bf16(b) => Arc::as_ptr(b) as usize,
        };
        for shape in [&[3, 5][..], &[1000], &[0, 4]] {
            let what = format!("add_into {shape:?} {dtype:?}");
            let (a, b) = (up(&rand(&mut rng, shape)), up(&rand(&mut rng, shape)));
            let want = back(&cuda.eval(&Op::Add(&a, &b), &Placement::default()).unwrap()[0]);
            // Alone, the accumulator's buffer takes the sum.
            let (acc, at) = (a.clone(), buffer(&a));
            drop(a);
            let got = cuda.add_into(acc, &b).unwrap();
            assert_eq!(buffer(&got), at, "{what}: a new buffer");
            assert_bits(&what, &back(&got), &want);
            // Shared, it is copied first: the other tensor keeps its values.
            let kept = got.clone();
            let before = back(&kept);
            let again = cuda.add_into(got, &b).unwrap();
            if kept.numel() > 0 {
                assert_ne!(
                    buffer(&again),
                    buffer(&kept),
                    "{what}: wrote a shared buffer"
                );
            }
            assert_eq!(back(&kept), before, "{what}: the shared buffer");
        }
        // Operands of different shapes: a new tensor, broadcast as `Add`.
        let (a, b) = (up(&rand(&mut rng, &[2, 3])), up(&rand(&mut rng, &[3])));
        let want = back(&cuda.eval(&Op::Add(&a, &b), &Placement::default()).unwrap()[0]);
        assert_bits(
            "add_into broadcast",
            &back(&cuda.add_into(a, &b).unwrap()),
            &want,
        );
    }
}

#[test]
fn mixed_storage_computes_in_f32() {
    let Some(dev) = device("mixed") else { return };
    let mut rng = fastrand::Rng::with_seed(3);
    let (x, bias) = (rand(&mut rng, &[4, 6]), rand(&mut rng, &[6]));
    let xd = gpu::upload(&dev, &x, Storage::Bf16).unwrap();
    let bd = gpu::upload(&dev, &bias, Storage::F32).unwrap();
    let out = gpu::eval(&dev, &Op::Add(&xd, &bd), &local()).unwrap();
    assert_eq!(out[0].dtype(), Storage::F32);
    let xr = round_bf16(&x);
    let want = cpu::eval(&Op::Add(&xr, &bias), &local()).unwrap();
    let got = gpu::download(&dev, &out[0]).unwrap();
    assert_close("bf16 + f32", &got, &want[0], F32);
}

#[test]
fn fill_expand_and_dropout() {
    let Some(dev) = device("fill") else { return };
    let mut rng = fastrand::Rng::with_seed(4);
    for (shape, value) in [(&[3, 5][..], 0.25), (&[0][..], 1.0), (&[][..], -3.0)] {
        let op = Op::Fill {
            shape: ds(shape),
            value,
            dtype: IrDType::F32,
        };
        check(
            &dev,
            &format!("Fill {shape:?}"),
            &op,
            &[],
            &local(),
            F32,
            true,
        );
    }
    let bad = Op::Fill {
        shape: ds(&[2]),
        value: 0.5,
        dtype: IrDType::I64,
    };
    check(&dev, "Fill non-integer", &bad, &[], &local(), F32, true);
    for (from, to) in [
        (&[3, 1, 5][..], &[2, 3, 4, 5][..]),
        (&[5], &[2, 5]),
        (&[1], &[7]),
        (&[3, 4], &[3, 4]),
        (&[2, 1], &[2, 1000]),
        (&[3], &[2, 4]),
    ] {
        let op = Op::Expand {
            x: 0,
            shape: ds(to),
        };
        let n = format!("Expand {from:?} to {to:?}");
        check(
            &dev,
            &n,
            &op,
            &[fl(rand(&mut rng, from))],
            &local(),
            F32,
            true,
        );
    }
    // Dropout: whole, sharded along each axis (masks of the full tensor), another seed, p = 0,
    // and the gradient.
    let x = rand(&mut rng, &[4, 6, 10]);
    let cases = [
        (None, None, 0u64),
        (Some(vec![4, 12, 10]), Some(vec![0, 6, 0]), 7),
        (Some(vec![4, 6, 20]), Some(vec![0, 0, 10]), 3),
        (Some(vec![8, 6, 10]), Some(vec![4, 0, 0]), 1 << 33),
        (Some(vec![4, 6, 10]), None, 5),
    ];
    for (full, offsets, seed) in cases {
        let l = KernelCtx {
            full_shape: full.clone(),
            offsets: offsets.clone(),
            dropout_seed: seed,
            ..KernelCtx::default()
        };
        for p in [0.3, 0.0, 0.9] {
            let n = format!("Dropout p {p} full {full:?} at {offsets:?} seed {seed}");
            let op = Op::Dropout { x: 0, p };
            check(&dev, &n, &op, &[fl(x.clone())], &l, F32, true);
            let op = Op::DropoutGrad {
                dy: 0,
                forward: 1,
                p,
            };
            let inputs = [fl(rand(&mut rng, &[4, 6, 10])), fl(x.clone())];
            check(&dev, &format!("{n} grad"), &op, &inputs, &l, F32, true);
        }
    }
    // Refused: p = 1, a shard that does not fit, offsets without the full shape.
    let op = Op::Dropout { x: 0, p: 1.0 };
    check(
        &dev,
        "Dropout p 1",
        &op,
        &[fl(x.clone())],
        &local(),
        F32,
        true,
    );
    let op = Op::Dropout { x: 0, p: 0.5 };
    let l = KernelCtx {
        full_shape: Some(vec![4, 6, 10]),
        offsets: Some(vec![0, 1, 0]),
        ..KernelCtx::default()
    };
    check(&dev, "Dropout misfit", &op, &[fl(x.clone())], &l, F32, true);
    let l = KernelCtx {
        offsets: Some(vec![0, 0, 0]),
        ..KernelCtx::default()
    };
    check(&dev, "Dropout no full shape", &op, &[fl(x)], &l, F32, true);
}

/// The fused bias + dropout + residual add's three ops on the GPU (`Add`, `Dropout` placed by
/// `l`, `Add`), as the unfused program runs them.
fn bias_dropout_add_unfused(
    dev: &RankDevice,
    (x, bias, residual): (&CudaTensor, &CudaTensor, &CudaTensor),
    p: f64,
    l: &KernelCtx,
) -> CudaTensor {
    let one = |op: Op<&CudaTensor, Dim>, l: &KernelCtx| {
        gpu::eval(dev, &op, l)
            .expect("an unfused op")
            .swap_remove(0)
    };
    let summed = one(Op::Add(x, bias), &local());
    let dropped = one(Op::Dropout { x: &summed, p }, l);
    one(Op::Add(residual, &dropped), &local())
}

/// Panics unless `got` and `want` hold the same bits.
fn assert_bits(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let differ = bits(got).iter().zip(bits(want)).position(|(g, w)| *g != w);
    if let Some(i) = differ {
        panic!(
            "{what}: element {i} is {}, want {}",
            got.data[i], want.data[i]
        );
    }
}

#[test]
fn fused_bias_dropout_add_is_the_three_ops_to_the_bit() {
    let Some(dev) = device("bias_dropout_add") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(31);
    // Whole tensors and shards along each axis (the masks of the full tensor), odd last axes.
    let cases = [
        (&[3, 200][..], None, None, 0u64),
        (&[3, 200], Some(vec![6, 400]), Some(vec![3, 200]), 11),
        (
            &[2, 5, 37],
            Some(vec![4, 5, 37]),
            Some(vec![2, 0, 0]),
            1 << 33,
        ),
        (&[2, 5, 37], Some(vec![2, 10, 37]), Some(vec![0, 5, 0]), 3),
    ];
    use Storage::{Bf16, F32 as S32};
    // Each operand's storage: uniform, and mixed (the sum of a bf16 `x` and bias is stored as
    // bf16 before an f32 residual is added).
    let storages = [
        [S32, S32, S32],
        [Bf16, Bf16, Bf16],
        [Bf16, Bf16, S32],
        [S32, Bf16, Bf16],
        [Bf16, S32, Bf16],
    ];
    for (shape, full, offsets, seed) in cases {
        let l = KernelCtx {
            full_shape: full.clone(),
            offsets: offsets.clone(),
            dropout_seed: seed,
            ..KernelCtx::default()
        };
        let last = shape[shape.len() - 1];
        let host = [
            rand(&mut rng, shape),
            rand(&mut rng, &[last]),
            rand(&mut rng, shape),
        ];
        for p in [0.0, 0.1, 0.3] {
            let name = format!("BiasDropoutAdd {shape:?} p {p} full {full:?} at {offsets:?}");
            for storage in storages {
                let what = format!("{name} {storage:?}");
                let [x, bias, residual] =
                    [0, 1, 2].map(|i| gpu::upload(&dev, &host[i], storage[i]).expect("upload"));
                let operands = (&x, &bias, &residual);
                let fused = gpu::bias_dropout_add(&dev, operands, p, &l.at()).expect(&what);
                let unfused = bias_dropout_add_unfused(&dev, operands, p, &l);
                assert_eq!(fused.dtype(), unfused.dtype(), "{what}: stored as");
                let got = gpu::download(&dev, &fused).expect("download");
                let want = gpu::download(&dev, &unfused).expect("download");
                assert_bits(&format!("{what} against the unfused ops"), &got, &want);
                // And the CPU's: its one-pass kernel in f32; in bf16 its three ops, each
                // output rounded to bf16 as the GPU stores it.
                let want = match storage {
                    [S32, S32, S32] => {
                        let h = (&host[0], &host[1], &host[2]);
                        cpu::bias_dropout_add(h, p, &l.at(), 2).expect("the CPU's")
                    }
                    [Bf16, Bf16, Bf16] => {
                        let [x, bias, residual] = host.each_ref().map(round_bf16);
                        let one = |op: Op<&Tensor, Dim>, l: &KernelCtx| {
                            round_bf16(&cpu::eval(&op, l).expect("the CPU's")[0])
                        };
                        let summed = one(Op::Add(&x, &bias), &local());
                        let dropped = one(Op::Dropout { x: &summed, p }, &l);
                        one(Op::Add(&residual, &dropped), &local())
                    }
                    _ => continue,
                };
                assert_bits(&format!("{what} against the CPU"), &got, &want);
            }
        }
    }
    // The backend's override is this kernel.
    let l = KernelCtx {
        full_shape: Some(vec![6, 400]),
        offsets: Some(vec![3, 200]),
        dropout_seed: 11,
        ..KernelCtx::default()
    };
    let host = [
        rand(&mut rng, &[3, 200]),
        rand(&mut rng, &[200]),
        rand(&mut rng, &[3, 200]),
    ];
    for dtype in [S32, Bf16] {
        let cuda = Cuda::new(0, 1, dtype).expect("a backend on GPU 0");
        let [x, bias, residual] = host
            .each_ref()
            .map(|t| gpu::upload(&dev, t, dtype).unwrap());
        let operands = (&x, &bias, &residual);
        let got = cuda
            .bias_dropout_add(operands, 0.3, &l.at())
            .expect("fused");
        let want = bias_dropout_add_unfused(&dev, operands, 0.3, &l);
        let (got, want) = (cuda.download(&got).unwrap(), cuda.download(&want).unwrap());
        assert_bits(&format!("Cuda::bias_dropout_add {dtype:?}"), &got, &want);
    }
}

#[test]
fn fused_bias_dropout_add_refuses_as_the_cpu() {
    let Some(dev) = device("bias_dropout_add errors") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(32);
    let shard = |full: Option<Vec<usize>>, offsets: Option<Vec<usize>>| KernelCtx {
        full_shape: full,
        offsets,
        ..KernelCtx::default()
    };
    // (what, the shapes of x, bias and residual, p, placement)
    let (good, short): (&[usize], &[usize]) = (&[3, 200], &[200]);
    let cases = [
        ("a short bias", [good, &[199], good], 0.1, local()),
        ("a matrix bias", [good, &[1, 200], good], 0.1, local()),
        ("a vector input", [short, short, short], 0.1, local()),
        ("another residual", [good, short, &[3, 199]], 0.1, local()),
        ("a broadcast residual", [good, short, short], 0.1, local()),
        ("p 1", [good, short, good], 1.0, local()),
        (
            "a misfit shard",
            [good, short, good],
            0.1,
            shard(Some(vec![3, 200]), Some(vec![1, 0])),
        ),
        (
            "offsets without the full shape",
            [good, short, good],
            0.1,
            shard(None, Some(vec![0, 0])),
        ),
    ];
    for (what, shapes, p, l) in cases {
        let inputs = shapes.map(|s| fl(rand(&mut rng, s)));
        check_with(
            &dev,
            &format!("BiasDropoutAdd {what}"),
            &inputs,
            F32,
            true,
            |h| cpu::bias_dropout_add((&h[0], &h[1], &h[2]), p, &l.at(), 2).map(|t| vec![t]),
            |d| gpu::bias_dropout_add(&dev, (&d[0], &d[1], &d[2]), p, &l.at()).map(|t| vec![t]),
        );
        let on_dev = upload_all(&dev, &inputs, Storage::F32);
        let err = gpu::bias_dropout_add(&dev, (&on_dev[0], &on_dev[1], &on_dev[2]), p, &l.at())
            .expect_err(what);
        assert!(
            matches!(
                err,
                KernelError::Invalid {
                    op: "BiasDropoutAdd",
                    ..
                }
            ),
            "{what}: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Matmul

#[test]
fn matmul_transposes_and_broadcasts_as_the_cpu() {
    let Some(dev) = device("matmul") else { return };
    let mut rng = fastrand::Rng::with_seed(5);
    // (a, b, transpose_a, transpose_b)
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[3, 5], &[5, 7], false, false),
        (&[5, 3], &[5, 7], true, false),
        (&[3, 5], &[7, 5], false, true),
        (&[5, 3], &[7, 5], true, true),
        (&[50, 783], &[783, 33], false, false),
        (&[2, 3, 4, 5], &[2, 3, 5, 6], false, false),
        (&[2, 3, 5, 4], &[2, 3, 6, 5], true, true),
        (&[2, 3, 4, 5], &[5, 6], false, false),
        (&[2, 3, 5, 4], &[5, 6], true, false),
        (&[2, 1, 4, 5], &[3, 5, 6], false, false),
        (&[4, 5], &[2, 5, 3], false, false),
        (&[2, 1, 4, 5], &[1, 3, 5, 6], false, false),
        (&[3, 1, 2, 4, 5], &[2, 1, 6, 5], false, true),
        (&[1, 64], &[64, 1], false, false),
        (&[0, 5], &[5, 3], false, false),
        (&[3, 0], &[0, 4], false, false),
        (&[128, 256], &[256, 128], false, false),
    ];
    // Shapes as stored: a transposed operand's last two axes are swapped in the product.
    for &(sa, sb, ta, tb) in cases {
        let (a, b) = (rand(&mut rng, sa), rand(&mut rng, sb));
        let op = Op::MatMul {
            a: 0,
            b: 1,
            transpose_a: ta,
            transpose_b: tb,
        };
        let n = format!(
            "MatMul {sa:?}{} · {sb:?}{}",
            if ta { "ᵀ" } else { "" },
            if tb { "ᵀ" } else { "" }
        );
        check(&dev, &n, &op, &[fl(a), fl(b)], &local(), F32_GEMM, false);
    }
    // Refused: inner dimensions that differ, batch axes that do not broadcast.
    for (sa, sb) in [(&[3, 5][..], &[4, 7][..]), (&[2, 3, 5], &[3, 5, 2])] {
        let op = Op::MatMul {
            a: 0,
            b: 1,
            transpose_a: false,
            transpose_b: false,
        };
        let inputs = [fl(rand(&mut rng, sa)), fl(rand(&mut rng, sb))];
        check(
            &dev,
            &format!("MatMul {sa:?} {sb:?}"),
            &op,
            &inputs,
            &local(),
            F32,
            false,
        );
    }
}

#[test]
fn matmul_acc_adds_the_product_into_the_accumulator() {
    let Some(dev) = device("matmul_acc") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(23);
    for dtype in [Storage::F32, Storage::Bf16] {
        // Through the backend, which stores the operands in its own type.
        let cuda = Cuda::new(0, 1, dtype).expect("a backend on GPU 0");
        let host = |x: &Tensor| match dtype {
            Storage::Bf16 => round_bf16(x),
            Storage::F32 => x.clone(),
        };
        let tol = if dtype == Storage::Bf16 {
            BF16
        } else {
            F32_GEMM
        };
        let up = |x: &Tensor| cuda.upload(x, IrDType::F32).expect("upload");
        let back = |x: &CudaTensor| cuda.download(x).expect("download");
        // (m, k, n): odd sizes, a longer contraction, a sum over nothing, an empty product.
        for (m, k, n) in [(5, 3, 7), (33, 64, 17), (4, 0, 3), (0, 5, 3)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let sa = if ta { [k, m] } else { [m, k] };
                let sb = if tb { [n, k] } else { [k, n] };
                let (a, b) = (rand(&mut rng, &sa), rand(&mut rng, &sb));
                let acc = rand(&mut rng, &[m, n]);
                let what = format!(
                    "matmul_acc [{m}, {k}]{}·[{k}, {n}]{} {dtype:?}",
                    if ta { " (aᵀ)" } else { "" },
                    if tb { " (bᵀ)" } else { "" }
                );
                let (ha, hb) = (host(&a), host(&b));
                let op = Op::MatMul {
                    a: &ha,
                    b: &hb,
                    transpose_a: ta,
                    transpose_b: tb,
                };
                let product = cpu::eval(&op, &local()).unwrap().swap_remove(0);
                let mut want = host(&acc);
                for (w, p) in want.data.iter_mut().zip(&product.data) {
                    *w += p;
                }
                let (ad, bd, accd) = (up(&a), up(&b), up(&acc));
                // Another tensor sharing the accumulator's buffer keeps its values.
                let kept = accd.clone();
                let got = cuda.matmul_acc(accd, (&ad, &bd), (ta, tb)).unwrap();
                assert_eq!(got.dtype(), dtype, "{what}: stored as");
                assert_close(&what, &back(&got), &want, tol);
                assert_eq!(back(&kept), host(&acc), "{what}: the shared buffer");
            }
        }
        // The accumulator sharing an operand's buffer: `a + a·b`, `a` itself unchanged.
        let (a, b) = (rand(&mut rng, &[6, 6]), rand(&mut rng, &[6, 6]));
        let (ha, hb) = (host(&a), host(&b));
        let op = Op::MatMul {
            a: &ha,
            b: &hb,
            transpose_a: false,
            transpose_b: false,
        };
        let mut want = cpu::eval(&op, &local()).unwrap().swap_remove(0);
        for (w, x) in want.data.iter_mut().zip(&ha.data) {
            *w += x;
        }
        let (ad, bd) = (up(&a), up(&b));
        let got = cuda
            .matmul_acc(ad.clone(), (&ad, &bd), (false, false))
            .unwrap();
        assert_close(&format!("a + a·b {dtype:?}"), &back(&got), &want, tol);
        assert_eq!(back(&ad), ha, "{dtype:?}: the operand");
    }
    // Mixed storage: the operands compute in the accumulator's type.
    let (a, b, acc) = (
        rand(&mut rng, &[7, 5]),
        rand(&mut rng, &[5, 9]),
        rand(&mut rng, &[7, 9]),
    );
    for (acc_dtype, operands) in [(Storage::F32, Storage::Bf16), (Storage::Bf16, Storage::F32)] {
        let (ha, hb) = match operands {
            Storage::Bf16 => (round_bf16(&a), round_bf16(&b)),
            Storage::F32 => (a.clone(), b.clone()),
        };
        let op = Op::MatMul {
            a: &ha,
            b: &hb,
            transpose_a: false,
            transpose_b: false,
        };
        let mut want = cpu::eval(&op, &local()).unwrap().swap_remove(0);
        let hacc = match acc_dtype {
            Storage::Bf16 => round_bf16(&acc),
            Storage::F32 => acc.clone(),
        };
        for (w, x) in want.data.iter_mut().zip(&hacc.data) {
            *w += x;
        }
        let accd = gpu::upload(&dev, &acc, acc_dtype).unwrap();
        let ad = gpu::upload(&dev, &a, operands).unwrap();
        let bd = gpu::upload(&dev, &b, operands).unwrap();
        let got = gpu::matmul_acc(&dev, accd, (&ad, &bd), (false, false)).unwrap();
        assert_eq!(got.dtype(), acc_dtype, "mixed: stored as");
        // A bf16 accumulator rounds the sum once; its operands' rounding is the GEMM's.
        let tol = if acc_dtype == Storage::Bf16 {
            BF16
        } else {
            F32_GEMM
        };
        let what = format!("matmul_acc: {acc_dtype:?} += {operands:?} · {operands:?}");
        assert_close(&what, &gpu::download(&dev, &got).unwrap(), &want, tol);
    }
    // Refused: an accumulator not of the product's shape, operands that do not multiply (the
    // same error as the product's).
    let up = |x: &Tensor| gpu::upload(&dev, x, Storage::F32).unwrap();
    let (a, b) = (up(&rand(&mut rng, &[3, 5])), up(&rand(&mut rng, &[5, 7])));
    for shape in [[3, 8], [7, 3]] {
        let acc = up(&rand(&mut rng, &shape));
        match gpu::matmul_acc(&dev, acc, (&a, &b), (false, false)) {
            Err(KernelError::Invalid { op: "MatMul", .. }) => {}
            other => panic!("an accumulator {shape:?} for a [3, 7] product: {other:?}"),
        }
    }
    let c = up(&rand(&mut rng, &[4, 7]));
    let acc = up(&rand(&mut rng, &[3, 7]));
    let e = gpu::matmul_acc(&dev, acc, (&a, &c), (false, false)).unwrap_err();
    let op = Op::MatMul {
        a: &a,
        b: &c,
        transpose_a: false,
        transpose_b: false,
    };
    let want = gpu::eval(&dev, &op, &local()).unwrap_err();
    assert_eq!(e, want, "inner dimensions that differ");
    assert!(
        matches!(e, KernelError::Invalid { op: "MatMul", .. }),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Norms and softmax

#[test]
fn norms_forward_and_backward() {
    let Some(dev) = device("norms") else { return };
    let mut rng = fastrand::Rng::with_seed(6);
    for shape in [
        &[4, 7][..],
        &[3, 5, 783],
        &[2, 1],
        &[300, 70],
        &[0, 5],
        &[1, 4096],
    ] {
        let n = shape[shape.len() - 1];
        let x = uniform(&mut rng, shape, -3.0, 5.0);
        let dy = rand(&mut rng, shape);
        let (w, b) = (rand(&mut rng, &[n]), rand(&mut rng, &[n]));
        for (hw, hb) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut inputs = vec![fl(x.clone())];
            let wi = hw.then(|| {
                inputs.push(fl(w.clone()));
                inputs.len() - 1
            });
            let bi = hb.then(|| {
                inputs.push(fl(b.clone()));
                inputs.len() - 1
            });
            let label = format!("{shape:?} weight {hw} bias {hb}");
            let op = Op::LayerNorm {
                x: 0,
                weight: wi,
                bias: bi,
                eps: 1e-5,
            };
            check(
                &dev,
                &format!("LayerNorm {label}"),
                &op,
                &inputs,
                &local(),
                F32,
                false,
            );
            if !hb {
                let op = Op::RmsNorm {
                    x: 0,
                    weight: wi,
                    eps: 1e-6,
                };
                check(
                    &dev,
                    &format!("RmsNorm {label}"),
                    &op,
                    &inputs,
                    &local(),
                    F32,
                    false,
                );
                inputs.push(fl(dy.clone()));
                let dyi = inputs.len() - 1;
                let op = Op::LayerNormGrad {
                    x: 0,
                    weight: wi,
                    dy: dyi,
                    eps: 1e-5,
                };
                check(
                    &dev,
                    &format!("LayerNormGrad {label}"),
                    &op,
                    &inputs,
                    &local(),
                    F32,
                    false,
                );
                let op = Op::RmsNormGrad {
                    x: 0,
                    weight: wi,
                    dy: dyi,
                    eps: 1e-6,
                };
                check(
                    &dev,
                    &format!("RmsNormGrad {label}"),
                    &op,
                    &inputs,
                    &local(),
                    F32,
                    false,
                );
            }
        }
    }
    // Values far from zero (a residual stream's outliers): the statistics in f64, as the CPU.
    let x = uniform(&mut rng, &[6, 300], 995.0, 1005.0);
    let dy = rand(&mut rng, &[6, 300]);
    let op = Op::LayerNorm {
        x: 0,
        weight: None,
        bias: None,
        eps: 1e-5,
    };
    check(
        &dev,
        "LayerNorm offset 1000",
        &op,
        &[fl(x.clone())],
        &local(),
        F32,
        false,
    );
    let op = Op::LayerNormGrad {
        x: 0,
        weight: None,
        dy: 1,
        eps: 1e-5,
    };
    let inputs = [fl(x), fl(dy)];
    check(
        &dev,
        "LayerNormGrad offset 1000",
        &op,
        &inputs,
        &local(),
        F32,
        false,
    );
    // Refused: a weight of the wrong length, a non-positive eps.
    let inputs = [fl(rand(&mut rng, &[3, 4])), fl(rand(&mut rng, &[5]))];
    let op = Op::LayerNorm {
        x: 0,
        weight: Some(1),
        bias: None,
        eps: 1e-5,
    };
    check(
        &dev,
        "LayerNorm bad weight",
        &op,
        &inputs,
        &local(),
        F32,
        false,
    );
    let op = Op::RmsNorm {
        x: 0,
        weight: None,
        eps: 0.0,
    };
    check(&dev, "RmsNorm eps 0", &op, &inputs, &local(), F32, false);
}

#[test]
fn softmax_and_its_gradient() {
    let Some(dev) = device("softmax") else { return };
    let mut rng = fastrand::Rng::with_seed(7);
    let cases: &[(&[usize], bool)] = &[
        (&[3, 7], false),
        (&[2, 3, 5, 7], true),
        (&[2, 4, 4], true),
        (&[2, 3000], false),
        (&[1, 1], true),
        (&[0, 5], false),
        (&[3, 9, 9], true),
        (&[5, 8], true),
    ];
    for &(shape, causal) in cases {
        let x = uniform(&mut rng, shape, -8.0, 8.0);
        let op = Op::Softmax { x: 0, causal };
        let n = format!("Softmax {shape:?} causal {causal}");
        check(&dev, &n, &op, &[fl(x.clone())], &local(), F32, false);
        // The gradient from the softmax's own output.
        if let Ok(y) = cpu::eval(&Op::Softmax { x: &x, causal }, &local()) {
            let op = Op::SoftmaxGrad { y: 0, dy: 1 };
            let inputs = [fl(y[0].clone()), fl(rand(&mut rng, shape))];
            check(
                &dev,
                &format!("{n} grad"),
                &op,
                &inputs,
                &local(),
                F32,
                false,
            );
        }
    }
    // Refused: a causal softmax with more queries than keys.
    let op = Op::Softmax { x: 0, causal: true };
    check(
        &dev,
        "Softmax causal 5x3",
        &op,
        &[fl(rand(&mut rng, &[5, 3]))],
        &local(),
        F32,
        false,
    );
}

// ---------------------------------------------------------------------------------------------
// Fused ops

/// The two ops a fused op replaces, inputs by index: the first on `op`'s inputs, the second
/// reading the first's output as input `n` (one past the fused op's inputs).
fn unfused_pair(op: &Fused<usize>, n: usize) -> (Op<usize, Dim>, Op<usize, Dim>) {
    let act_op = |act: Activation, x: usize| match act {
        Activation::Gelu => Op::Gelu(x),
        Activation::GeluTanh => Op::GeluTanh(x),
        Activation::Silu => Op::Silu(x),
        Activation::Relu => Op::Relu(x),
    };
    match *op {
        Fused::BiasAct { act, x, bias } => (Op::Add(x, bias), act_op(act, n)),
        Fused::BiasActGrad { act, x, bias, dy } => {
            (Op::Add(x, bias), Op::ActGrad { act, x: n, dy })
        }
        Fused::ScaledSoftmax { x, factor, causal } => (
            Op::Scale {
                x,
                factor: Factor::Const(factor),
            },
            Op::Softmax { x: n, causal },
        ),
        Fused::ScaledSoftmaxGrad { y, dy, factor } => (
            Op::SoftmaxGrad { y, dy },
            Op::Scale {
                x: n,
                factor: Factor::Const(factor),
            },
        ),
        Fused::EmbeddingGradAdd {
            acc,
            table,
            ids,
            dy,
        } => (Op::EmbeddingGrad { table, ids, dy }, Op::Add(acc, n)),
        // Not a pair of ops (a chain with a placed dropout): tested in `cuda_attention.rs`.
        Fused::Attention { .. }
        | Fused::AttentionGrad { .. }
        | Fused::OutputLoss { .. }
        | Fused::BiasDropoutAdd { .. } => {
            unreachable!("not a pair of ops: tested through the executor")
        }
    }
}

/// [`check`] for a fused op: `gpu::eval_fused` against `Cpu::default().eval_fused` (values, or the same
/// error); then, in `f32` storage, against the GPU running the unfused pair, which it must
/// equal to the bit (its intermediate is the `f32` value the pair's first kernel stores).
fn check_fused(
    dev: &RankDevice,
    name: &str,
    op: &Fused<usize>,
    inputs: &[Input],
    tol: Tol,
    exact: bool,
) {
    let l = local();
    check_with(
        dev,
        name,
        inputs,
        tol,
        exact,
        |host| {
            Cpu::with_threads(l.threads)
                .eval_fused(&op.map(|&i| &host[i]))
                .map(|t| vec![t])
        },
        |on_dev| gpu::eval_fused(dev, &op.map(|&i| &on_dev[i]), &l).map(|t| vec![t]),
    );
    let on_dev = upload_all(dev, inputs, Storage::F32);
    let Ok(fused) = gpu::eval_fused(dev, &op.map(|&i| &on_dev[i]), &l) else {
        return; // refused, as the CPU (checked above)
    };
    let (first, second) = unfused_pair(op, on_dev.len());
    let first = first.try_map(|&i| Ok::<_, ()>(&on_dev[i]), |x| Ok(x.clone()));
    let mid = gpu::eval(dev, &first.unwrap(), &l).expect("the pair's first op");
    let mut with_mid: Vec<&CudaTensor> = on_dev.iter().collect();
    with_mid.push(&mid[0]);
    let second = second.try_map(|&i| Ok::<_, ()>(with_mid[i]), |x| Ok(x.clone()));
    let pair = gpu::eval(dev, &second.unwrap(), &l).expect("the pair's second op");
    let (got, want) = (
        gpu::download(dev, &fused).expect("download"),
        gpu::download(dev, &pair[0]).expect("download"),
    );
    assert_eq!(got.shape, want.shape, "{name}: fused vs unfused shape");
    let differ = got
        .data
        .iter()
        .zip(&want.data)
        .position(|(g, w)| g.to_bits() != w.to_bits());
    if let Some(i) = differ {
        panic!(
            "{name} (F32): fused element {i} is {}, the unfused pair's {}",
            got.data[i], want.data[i]
        );
    }
}

#[test]
fn fused_bias_activation_and_its_gradient() {
    let Some(dev) = device("fused bias act") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(15);
    let acts = [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Relu,
    ];
    // Extremes of the activations' ranges (the sum crosses them from both sides).
    let special_x = t(
        &[2, 12],
        vec![
            -100.0, -88.0, -87.5, -9.0, -1e-30, 0.0, 1e-30, 0.5, 9.0, 87.9, 88.5, 100.0, 1.0, -1.0,
            0.25, -0.25, 3.0, -3.0, 50.0, -50.0, 0.0, -0.0, 2.0, -2.0,
        ],
    );
    let special_bias = t(
        &[12],
        vec![
            0.0, -0.5, 0.5, 9.0, 1e-30, -0.0, -1e-30, -0.5, -9.0, 0.1, -0.6, 0.0,
        ],
    );
    let mut cases: Vec<(String, Tensor, Tensor)> =
        vec![("special".into(), special_x.clone(), special_bias.clone())];
    for shape in [
        &[2, 50, 7][..],
        &[3, 783],
        &[4, 64],
        &[1, 1],
        &[0, 4],
        &[5, 0],
    ] {
        let x = uniform(&mut rng, shape, -12.0, 12.0);
        let bias = rand(&mut rng, &shape[shape.len() - 1..]);
        cases.push((format!("{shape:?}"), x, bias));
    }
    for (label, x, bias) in &cases {
        let dy = rand(&mut rng, &x.shape);
        for act in acts {
            let op = Fused::BiasAct { act, x: 0, bias: 1 };
            let n = format!("BiasAct {act:?} {label}");
            let inputs = [fl(x.clone()), fl(bias.clone())];
            check_fused(&dev, &n, &op, &inputs, F32, true);
            let op = Fused::BiasActGrad {
                act,
                x: 0,
                bias: 1,
                dy: 2,
            };
            let n = format!("BiasActGrad {act:?} {label}");
            let inputs = [fl(x.clone()), fl(bias.clone()), fl(dy.clone())];
            check_fused(&dev, &n, &op, &inputs, F32, true);
        }
    }
    // Refused as on the CPU: a bias not along the last axis, a rank-1 input, a bias of rank 2,
    // a gradient of another shape.
    let x = rand(&mut rng, &[3, 4]);
    for (label, xs, bs) in [
        ("bias along the first axis", &[3, 4][..], &[3][..]),
        ("rank-1 input", &[4], &[4]),
        ("rank-2 bias", &[3, 4], &[1, 4]),
    ] {
        let (xt, bt) = (rand(&mut rng, xs), rand(&mut rng, bs));
        let op = Fused::BiasAct {
            act: Activation::Gelu,
            x: 0,
            bias: 1,
        };
        let inputs = [fl(xt.clone()), fl(bt.clone())];
        check_fused(&dev, &format!("BiasAct {label}"), &op, &inputs, F32, true);
        let op = Fused::BiasActGrad {
            act: Activation::Silu,
            x: 0,
            bias: 1,
            dy: 2,
        };
        let inputs = [fl(xt.clone()), fl(bt), fl(xt)];
        check_fused(
            &dev,
            &format!("BiasActGrad {label}"),
            &op,
            &inputs,
            F32,
            true,
        );
    }
    let op = Fused::BiasActGrad {
        act: Activation::Relu,
        x: 0,
        bias: 1,
        dy: 2,
    };
    let inputs = [
        fl(x.clone()),
        fl(rand(&mut rng, &[4])),
        fl(rand(&mut rng, &[4, 3])),
    ];
    check_fused(
        &dev,
        "BiasActGrad gradient mismatch",
        &op,
        &inputs,
        F32,
        true,
    );
    // The error itself: the CPU's text.
    let (xd, bd) = (
        gpu::upload(&dev, &x, Storage::F32).unwrap(),
        gpu::upload(&dev, &rand(&mut rng, &[3]), Storage::F32).unwrap(),
    );
    let op = Fused::BiasAct {
        act: Activation::Gelu,
        x: &xd,
        bias: &bd,
    };
    match gpu::eval_fused(&dev, &op, &local()) {
        Err(KernelError::Invalid { op, msg }) => {
            assert_eq!(op, "BiasAct");
            assert_eq!(
                msg,
                "the bias has shape [3], expected [4] (the last axis of the input [3, 4])"
            );
        }
        other => panic!("a bias along the first axis: {other:?}"),
    }
    // Mixed storage (a bf16 input, an f32 bias) computes in f32, as Add does.
    let (x, bias, dy) = (
        rand(&mut rng, &[6, 10]),
        rand(&mut rng, &[10]),
        rand(&mut rng, &[6, 10]),
    );
    let (xd, bd, gd) = (
        gpu::upload(&dev, &x, Storage::Bf16).unwrap(),
        gpu::upload(&dev, &bias, Storage::F32).unwrap(),
        gpu::upload(&dev, &dy, Storage::Bf16).unwrap(),
    );
    let xr = round_bf16(&x);
    let gr = round_bf16(&dy);
    for act in acts {
        let got = gpu::eval_fused(
            &dev,
            &Fused::BiasActGrad {
                act,
                x: &xd,
                bias: &bd,
                dy: &gd,
            },
            &local(),
        )
        .unwrap();
        assert_eq!(got.dtype(), Storage::F32, "bf16 x, f32 bias: stored as");
        let want = Cpu::default()
            .eval_fused(&Fused::BiasActGrad {
                act,
                x: &xr,
                bias: &bias,
                dy: &gr,
            })
            .unwrap();
        let got = gpu::download(&dev, &got).unwrap();
        assert_close(&format!("BiasActGrad {act:?} bf16 + f32"), &got, &want, F32);
    }
}

#[test]
fn fused_scaled_softmax_and_its_gradient() {
    let Some(dev) = device("fused softmax") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(16);
    let cases: &[(&[usize], bool)] = &[
        (&[3, 7], false),
        (&[2, 3, 5, 7], true),
        (&[2, 4, 4], true),
        (&[2, 3000], false),
        (&[1, 1], true),
        (&[0, 5], false),
        (&[3, 9, 9], true),
        (&[5, 8], true),
    ];
    // 1/√64 (attention's), an awkward one, and one that pushes the scores past exp's range.
    for factor in [0.125, 0.37, 30.0] {
        for &(shape, causal) in cases {
            let x = uniform(&mut rng, shape, -8.0, 8.0);
            let op = Fused::ScaledSoftmax {
                x: 0,
                factor,
                causal,
            };
            let n = format!("ScaledSoftmax {shape:?} causal {causal} factor {factor}");
            check_fused(&dev, &n, &op, &[fl(x.clone())], F32, false);
            // The gradient from the softmax's own output.
            let y = Cpu::default().eval_fused(&Fused::ScaledSoftmax {
                x: &x,
                factor,
                causal,
            });
            if let Ok(y) = y {
                let op = Fused::ScaledSoftmaxGrad {
                    y: 0,
                    dy: 1,
                    factor,
                };
                let inputs = [fl(y), fl(rand(&mut rng, shape))];
                check_fused(&dev, &format!("{n} grad"), &op, &inputs, F32, false);
            }
        }
    }
    // Refused: a causal softmax with more queries than keys; a gradient of another shape.
    let op = Fused::ScaledSoftmax {
        x: 0,
        factor: 0.125,
        causal: true,
    };
    let inputs = [fl(rand(&mut rng, &[5, 3]))];
    check_fused(&dev, "ScaledSoftmax causal 5x3", &op, &inputs, F32, false);
    let op = Fused::ScaledSoftmaxGrad {
        y: 0,
        dy: 1,
        factor: 0.125,
    };
    let inputs = [fl(rand(&mut rng, &[3, 4])), fl(rand(&mut rng, &[4, 3]))];
    check_fused(&dev, "ScaledSoftmaxGrad mismatch", &op, &inputs, F32, false);
}

// ---------------------------------------------------------------------------------------------
// Layout

#[test]
fn layout_ops_move_the_same_elements() {
    let Some(dev) = device("layout") else { return };
    let mut rng = fastrand::Rng::with_seed(8);
    let x = rand(&mut rng, &[2, 3, 4, 5]);
    let op = Op::Reshape {
        x: 0,
        shape: ds(&[6, 20]),
    };
    check(&dev, "Reshape", &op, &[fl(x.clone())], &local(), F32, true);
    let perms: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[2, 3, 4, 5], &[0, 1, 3, 2]),
        (&[2, 3, 4, 5], &[3, 2, 1, 0]),
        (&[2, 3, 4, 5], &[1, 0, 2, 3]),
        (&[2, 3, 4, 5], &[0, 1, 2, 3]),
        (&[50, 783], &[1, 0]),
        (&[1, 7, 1, 9], &[3, 2, 1, 0]),
        (&[33, 40, 3], &[2, 0, 1]),
        (&[3, 70, 65], &[0, 2, 1]),
        (&[4, 0, 3], &[2, 1, 0]),
    ];
    for &(shape, perm) in perms {
        let op = Op::Transpose {
            x: 0,
            perm: perm.to_vec(),
        };
        let n = format!("Transpose {shape:?} {perm:?}");
        check(
            &dev,
            &n,
            &op,
            &[fl(rand(&mut rng, shape))],
            &local(),
            F32,
            true,
        );
    }
    let y = rand(&mut rng, &[4, 6, 5]);
    for (axis, start, end) in [
        (1, 2, 5),
        (-1, 0, 5),
        (0, 1, 2),
        (2, 3, 3),
        (2, 1, 4),
        (1, 4, 9),
    ] {
        let op = Op::Slice {
            x: 0,
            dim: axis,
            start: d(start),
            end: d(end),
        };
        let n = format!("Slice axis {axis} {start}..{end}");
        check(&dev, &n, &op, &[fl(y.clone())], &local(), F32, true);
    }
    for (axis, sizes) in [
        (1, vec![1, 2, 3]),
        (-1, vec![5]),
        (0, vec![2, 2]),
        (2, vec![2, 2]),
    ] {
        let op = Op::Split {
            x: 0,
            dim: axis,
            sizes: ds(&sizes),
        };
        let n = format!("Split axis {axis} {sizes:?}");
        check(&dev, &n, &op, &[fl(y.clone())], &local(), F32, true);
    }
    let concats: &[(&[&[usize]], i64)] = &[
        (&[&[2, 1, 5], &[2, 3, 5], &[2, 2, 5]], 1),
        (&[&[2, 3, 1], &[2, 3, 4]], -1),
        (&[&[1, 4], &[3, 4]], 0),
        (&[&[2, 0, 5], &[2, 3, 5]], 1),
        (&[&[2, 3], &[3, 3]], 1),
    ];
    for &(shapes, axis) in concats {
        let inputs: Vec<Input> = shapes.iter().map(|s| fl(rand(&mut rng, s))).collect();
        let op = Op::Concat {
            xs: (0..inputs.len()).collect(),
            dim: axis,
        };
        let n = format!("Concat {shapes:?} axis {axis}");
        check(&dev, &n, &op, &inputs, &local(), F32, true);
    }
    for (axis, before, after) in [(1, 2, 1), (-1, 0, 3), (0, 1, 0), (2, 0, 0)] {
        let op = Op::Pad {
            x: 0,
            dim: axis,
            before: d(before),
            after: d(after),
        };
        let n = format!("Pad axis {axis} {before}+{after}");
        check(&dev, &n, &op, &[fl(y.clone())], &local(), F32, true);
    }
}

#[test]
fn sum_to_reduces_every_broadcast_pattern() {
    let Some(dev) = device("sum_to") else { return };
    let mut rng = fastrand::Rng::with_seed(9);
    let cases: &[(&[usize], &[usize])] = &[
        (&[4, 5, 6], &[6]),
        (&[4, 5, 6], &[5, 1]),
        (&[4, 5, 6], &[]),
        (&[4, 5, 6], &[4, 1, 6]),
        (&[4, 5, 6], &[4, 5, 1]),
        (&[4, 5, 6], &[1, 5, 6]),
        (&[4, 5, 6], &[1, 1, 1]),
        (&[300, 70], &[70]),
        (&[3, 5000], &[3, 1]),
        (&[2, 3000, 4], &[1, 1, 4]),
        (&[7, 9], &[7, 9]),
        (&[1, 7, 9], &[7, 9]),
        (&[20000], &[]),
        (&[64, 3, 2, 5], &[3, 1, 5]),
        (&[0, 4], &[4]),
        (&[4, 5], &[6]),
    ];
    for &(from, to) in cases {
        let op = Op::SumTo {
            x: 0,
            shape: ds(to),
        };
        let n = format!("SumTo {from:?} to {to:?}");
        check(
            &dev,
            &n,
            &op,
            &[fl(rand(&mut rng, from))],
            &local(),
            F32,
            false,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding, rotary

#[test]
fn embedding_lookup_and_gradient() {
    let Some(dev) = device("embedding") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(10);
    // (table rows, width, ids bound, local)
    let whole = KernelCtx::default();
    let parallel = KernelCtx {
        vocab_offset: 20,
        vocab_rows: Some(60),
        ..KernelCtx::default()
    };
    let first_shard = KernelCtx {
        vocab_rows: Some(60),
        ..KernelCtx::default()
    };
    let unbounded = KernelCtx {
        vocab_offset: 40,
        ..KernelCtx::default()
    };
    let cases = [
        (50, 16, 50, &whole),
        (20, 16, 60, &parallel),
        (20, 16, 60, &first_shard),
        (20, 33, 70, &unbounded),
        (7, 1, 7, &whole),
    ];
    for (rows, width, bound, l) in cases {
        let table = rand(&mut rng, &[rows, width]);
        let ids = ints(&mut rng, &[2, 7], bound);
        let label = format!("table [{rows}, {width}] ids < {bound} {l:?}");
        let op = Op::Embedding { table: 0, ids: 1 };
        let inputs = [fl(table.clone()), ix(ids.clone())];
        check(
            &dev,
            &format!("Embedding {label}"),
            &op,
            &inputs,
            l,
            F32,
            true,
        );
        // Repeated ids around the shard's first row (some held here, some not): each row's
        // sum, added in position order as the CPU adds it, so the bits are the CPU's.
        let mut ids = ints(&mut rng, &[3, 9], 6);
        let lo = l.vocab_offset.saturating_sub(2);
        for id in &mut ids.data {
            *id = (*id + lo as f32).min((bound - 1) as f32);
        }
        let dy = rand(&mut rng, &[3, 9, width]);
        let op = Op::EmbeddingGrad {
            table: 0,
            ids: 1,
            dy: 2,
        };
        let inputs = [fl(table), ix(ids), fl(dy)];
        check(
            &dev,
            &format!("EmbeddingGrad {label}"),
            &op,
            &inputs,
            l,
            F32,
            true,
        );
        // No atomics: the CPU's bits, every run.
        let host: Vec<Tensor> = inputs.iter().map(|i| i.t.clone()).collect();
        let want = cpu::eval(
            &op.try_map(|&i| Ok::<_, ()>(&host[i]), |x| Ok(x.clone()))
                .unwrap(),
            l,
        )
        .unwrap();
        let on_dev = upload_all(&dev, &inputs, Storage::F32);
        for run in 0..2 {
            let got = gpu::eval(
                &dev,
                &op.try_map(|&i| Ok::<_, ()>(&on_dev[i]), |x| Ok(x.clone()))
                    .unwrap(),
                l,
            )
            .unwrap();
            let got = gpu::download(&dev, &got[0]).expect("download");
            let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want[0]),
                "EmbeddingGrad {label}, run {run}"
            );
        }
    }
    // Refused, with the CPU's error naming the first bad id: out of range, not an integer,
    // negative, NaN; a shard outside the table.
    let table = rand(&mut rng, &[10, 4]);
    for bad in [10.0, 2.5, -1.0, f32::NAN] {
        let ids = t(&[2, 3], vec![1.0, 2.0, bad, 3.0, bad, 0.0]);
        let op = Op::Embedding { table: 0, ids: 1 };
        let inputs = [fl(table.clone()), ix(ids.clone())];
        check(
            &dev,
            &format!("Embedding id {bad}"),
            &op,
            &inputs,
            &whole,
            F32,
            true,
        );
        let op = Op::EmbeddingGrad {
            table: 0,
            ids: 1,
            dy: 2,
        };
        let inputs = [fl(table.clone()), ix(ids), fl(rand(&mut rng, &[2, 3, 4]))];
        check(
            &dev,
            &format!("EmbeddingGrad id {bad}"),
            &op,
            &inputs,
            &whole,
            F32,
            true,
        );
    }
    let outside = KernelCtx {
        vocab_offset: 55,
        vocab_rows: Some(60),
        ..KernelCtx::default()
    };
    let op = Op::Embedding { table: 0, ids: 1 };
    let inputs = [fl(table), ix(ints(&mut rng, &[4], 10))];
    check(
        &dev,
        "Embedding shard outside",
        &op,
        &inputs,
        &outside,
        F32,
        true,
    );
}

#[test]
fn rotary_rotates_from_the_shards_position() {
    let Some(dev) = device("rotary") else { return };
    let mut rng = fastrand::Rng::with_seed(11);
    for (shape, offsets) in [
        (&[2, 9, 3, 8][..], None),
        (&[2, 9, 3, 8], Some(vec![0, 5, 0, 0])),
        (&[17, 2, 64], None),
        (&[3, 4, 1, 128], Some(vec![0, 1000, 0, 0])),
    ] {
        let x = rand(&mut rng, shape);
        let l = KernelCtx {
            offsets: offsets.clone(),
            ..KernelCtx::default()
        };
        // Llama 3.1's rescaling, its context short enough that every band is met.
        let llama3 = ferrotron_ir::RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 256,
        };
        for inverse in [false, true] {
            for (base, scaling) in [(10000.0, None), (500000.0, None), (500000.0, Some(llama3))] {
                let op = Op::Rotary {
                    x: 0,
                    base,
                    inverse,
                    scaling,
                };
                let n = format!(
                    "Rotary {shape:?} at {offsets:?} base {base} {scaling:?} inverse {inverse}"
                );
                check(&dev, &n, &op, &[fl(x.clone())], &l, F32, false);
            }
        }
    }
    let op = Op::Rotary {
        x: 0,
        base: 10000.0,
        inverse: false,
        scaling: None,
    };
    check(
        &dev,
        "Rotary odd head_dim",
        &op,
        &[fl(rand(&mut rng, &[2, 3, 5]))],
        &local(),
        F32,
        false,
    );
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

#[test]
fn cross_entropy_loss_and_gradient() {
    let Some(dev) = device("cross_entropy") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(12);
    for (shape, classes, shift, parts) in [
        (&[2, 5, 11][..], None, true, 1),
        (&[2, 5, 11], None, false, 1),
        (&[2, 5, 11], Some(9), true, 2),
        (&[2, 3, 5000], None, true, 1),
        (&[4, 1, 7], None, false, 3),
        (&[3, 6], Some(6), true, 1),
    ] {
        let vocab = shape[shape.len() - 1];
        let real = classes.unwrap_or(vocab);
        let logits = uniform(&mut rng, shape, -6.0, 6.0);
        let targets = ints(&mut rng, &shape[..shape.len() - 1], real);
        let l = KernelCtx {
            token_parts: parts,
            ..KernelCtx::default()
        };
        let label = format!("{shape:?} classes {classes:?} shift {shift} parts {parts}");
        let op = Op::CrossEntropy {
            logits: 0,
            targets: 1,
            shift,
            classes: classes.map(d),
        };
        let inputs = [fl(logits.clone()), ix(targets.clone())];
        check(
            &dev,
            &format!("CrossEntropy {label}"),
            &op,
            &inputs,
            &l,
            F32,
            false,
        );
        let op = Op::CrossEntropyGrad {
            logits: 0,
            targets: 1,
            dloss: 2,
            shift,
            classes: classes.map(d),
        };
        let inputs = [fl(logits), ix(targets), fl(t(&[], vec![0.7]))];
        check(
            &dev,
            &format!("CrossEntropyGrad {label}"),
            &op,
            &inputs,
            &l,
            F32,
            false,
        );
    }
    // Refused: a target past the real classes (the first bad one reported), no predicting row.
    let logits = rand(&mut rng, &[2, 4, 6]);
    let targets = t(&[2, 4], vec![0.0, 1.0, 5.0, 2.0, 9.0, 1.0, 7.0, 0.0]);
    let op = Op::CrossEntropy {
        logits: 0,
        targets: 1,
        shift: true,
        classes: Some(d(5)),
    };
    let inputs = [fl(logits), ix(targets)];
    check(
        &dev,
        "CrossEntropy bad target",
        &op,
        &inputs,
        &local(),
        F32,
        false,
    );
    let op = Op::CrossEntropy {
        logits: 0,
        targets: 1,
        shift: true,
        classes: None,
    };
    let inputs = [
        fl(rand(&mut rng, &[3, 1, 4])),
        ix(ints(&mut rng, &[3, 1], 4)),
    ];
    check(
        &dev,
        "CrossEntropy nothing predicts",
        &op,
        &inputs,
        &local(),
        F32,
        false,
    );
}

#[test]
fn vocabulary_parallel_phases_match_the_cpu() {
    let Some(dev) = device("ce phases") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(13);
    // A rank holding global classes 6..11 of 11 padded classes, 9 real (so 3 real locally), and
    // the next rank with none real.
    for (offset, real) in [(6, 9), (0, 9), (10, 9), (0, 5)] {
        let logits = uniform(&mut rng, &[2, 5, 5], -4.0, 4.0);
        let targets = ints(&mut rng, &[2, 5], real);
        for dtype in [Storage::F32, Storage::Bf16] {
            let host = if dtype == Storage::Bf16 {
                round_bf16(&logits)
            } else {
                logits.clone()
            };
            let tol = if dtype == Storage::Bf16 { BF16 } else { F32 };
            let ld = gpu::upload(&dev, &logits, dtype).unwrap();
            let td = gpu::upload(&dev, &targets, Storage::F32).unwrap();
            let what = format!("offset {offset} real {real} {dtype:?}");
            let sh = shard(offset, real, false, 1);
            let max = gpu::ce_row_max(&dev, &ld, &sh).unwrap();
            let want_max = cpu::ce_row_max(&host, &sh, 1).unwrap();
            assert_eq!(max, want_max, "{what}: row max");
            for shift in [true, false] {
                let sh = shard(offset, real, shift, 2);
                let (sum, tl) = gpu::ce_row_sums(&dev, &ld, &max, &td, &sh).unwrap();
                let (want_sum, want_tl) = cpu::ce_row_sums(&host, &max, &targets, &sh, 1).unwrap();
                let as_t = |v: &[f32]| t(&[v.len()], v.to_vec());
                assert_close(&format!("{what}: sums"), &as_t(&sum), &as_t(&want_sum), F32);
                assert_eq!(tl, want_tl, "{what}: target logits");
                // Statistics as the group would have reduced them (any positive sums will do).
                let stats = RowStats {
                    max: max.iter().map(|m| m.max(0.25)).collect(),
                    sum: sum.iter().map(|s| s + 1.5).collect(),
                    target: tl.clone(),
                };
                let got = gpu::ce_grad(&dev, &ld, &td, &stats, &sh, 0.7).unwrap();
                let want = cpu::ce_grad(&host, &targets, &stats, &sh, 0.7, 1).unwrap();
                let got = gpu::download(&dev, &got).unwrap();
                assert_close(&format!("{what}: grad shift {shift}"), &got, &want, tol);

                // The same phases with the statistics kept on the device, the loss computed there
                // and the backward's seed a device scalar.
                let max_d = gpu::ce_row_max_dev(&dev, &ld, &sh).unwrap();
                let back = |x: &CudaTensor| gpu::download(&dev, x).unwrap().data;
                assert_eq!(back(&max_d), max, "{what}: row max on the device");
                let sums_d = gpu::ce_row_sums_dev(&dev, &ld, &max_d, &td, &sh).unwrap();
                assert_eq!(sums_d.shape, [2, sum.len()], "{what}");
                assert_eq!(
                    back(&sums_d),
                    [&sum[..], &tl[..]].concat(),
                    "{what}: on the device"
                );
                let both = [&stats.sum[..], &stats.target[..]].concat();
                let stats_d = CeStats {
                    max: gpu::upload(&dev, &as_t(&stats.max), Storage::F32).unwrap(),
                    sums: gpu::upload(&dev, &t(&[2, sum.len()], both), Storage::F32).unwrap(),
                };
                let loss = gpu::ce_loss_dev(&dev, &stats_d, &logits.shape, &sh).unwrap();
                let want_loss =
                    ferrotron_exec::kernel::ce_loss(&stats, &logits.shape, &sh).unwrap();
                assert_close(
                    &format!("{what}: loss shift {shift}"),
                    &gpu::download(&dev, &loss).unwrap(),
                    &t(&[], vec![want_loss]),
                    F32,
                );
                for seed_dtype in [Storage::F32, Storage::Bf16] {
                    let seed = gpu::upload(&dev, &t(&[], vec![0.75]), seed_dtype).unwrap();
                    let got = gpu::ce_grad_dev(&dev, &ld, &td, &stats_d, &sh, &seed).unwrap();
                    let want = cpu::ce_grad(&host, &targets, &stats, &sh, 0.75, 1).unwrap();
                    let got = gpu::download(&dev, &got).unwrap();
                    let what = format!("{what}: device grad shift {shift} seed {seed_dtype:?}");
                    assert_close(&what, &got, &want, tol);
                }
            }
        }
    }
    // The same errors: maxima of the wrong length, a bad target, token_parts 0.
    let logits = rand(&mut rng, &[2, 3, 4]);
    let targets = t(&[2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 1.0]);
    let (ld, td) = (
        gpu::upload(&dev, &logits, Storage::F32).unwrap(),
        gpu::upload(&dev, &targets, Storage::F32).unwrap(),
    );
    let (shifted, plain) = (shard(0, 4, true, 1), shard(0, 4, false, 1));
    let e = gpu::ce_row_sums(&dev, &ld, &[0.0; 5], &td, &shifted).unwrap_err();
    assert_eq!(
        e,
        cpu::ce_row_sums(&logits, &[0.0; 5], &targets, &shifted, 1).unwrap_err()
    );
    let e = gpu::ce_row_sums(&dev, &ld, &[0.0; 6], &td, &plain).unwrap_err();
    let want = cpu::ce_row_sums(&logits, &[0.0; 6], &targets, &plain, 1).unwrap_err();
    assert_eq!(e, want);
    // Kept on the device, the target check does not wait: the same error comes from the rank's
    // next read from the device, once.
    let max = gpu::upload(&dev, &t(&[6], vec![0.0; 6]), Storage::F32).unwrap();
    let sums = gpu::ce_row_sums_dev(&dev, &ld, &max, &td, &plain).unwrap();
    assert_eq!(gpu::download(&dev, &sums).unwrap_err(), want);
    assert_eq!(gpu::download(&dev, &sums).unwrap().shape, [2, 6]);
    // Good targets: nothing to report.
    let sums = gpu::ce_row_sums_dev(&dev, &ld, &max, &td, &shard(0, 5, false, 1)).unwrap();
    assert!(gpu::download(&dev, &sums).is_ok());
    let stats = RowStats {
        max: vec![0.0; 6],
        sum: vec![1.0; 6],
        target: Vec::new(),
    };
    let no_parts = shard(0, 5, true, 0);
    let e = gpu::ce_grad(&dev, &ld, &td, &stats, &no_parts, 1.0).unwrap_err();
    let want = cpu::ce_grad(&logits, &targets, &stats, &no_parts, 1.0, 1);
    assert_eq!(e, want.unwrap_err());
}

/// Rows `lo..hi` of logits `[.., vocab]`, as `[hi − lo, vocab]`.
fn rows_of(t: &Tensor, lo: usize, hi: usize) -> Tensor {
    let v = t.shape[t.shape.len() - 1];
    Tensor {
        shape: vec![hi - lo, v],
        data: t.data[lo * v..hi * v].to_vec().into(),
    }
}

#[test]
fn cross_entropy_windows_add_up_to_the_whole() {
    let Some(dev) = device("ce windows") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(21);
    let (seq, vocab) = (6, 7);
    let total = 2 * seq;
    // Windows across the sequences' boundary (row 6), the last ending on a sequence's last row.
    let windows = [(0, 5), (5, 9), (9, 12)];
    // Local classes 4..11 of 11 padded ones, 9 real (5 local real, 2 of padding); then a rank
    // whose 7 local classes are all real.
    for (offset, real) in [(4, 9), (0, 9)] {
        let logits = uniform(&mut rng, &[2, seq, vocab], -4.0, 4.0);
        let targets = ints(&mut rng, &[2, seq], real);
        for dtype in [Storage::F32, Storage::Bf16] {
            let tol = if dtype == Storage::Bf16 { BF16 } else { F32 };
            let ld = gpu::upload(&dev, &logits, dtype).unwrap();
            let td = gpu::upload(&dev, &targets, Storage::F32).unwrap();
            let back = |x: &CudaTensor| gpu::download(&dev, x).unwrap();
            let seed = gpu::upload(&dev, &t(&[], vec![0.75]), Storage::F32).unwrap();
            for shift in [true, false] {
                let what = format!("offset {offset} real {real} {dtype:?} shift {shift}");
                let sh = shard(offset, real, shift, 2);
                // The whole logits' phases (held to the CPU's in the test above).
                let max = gpu::ce_row_max_dev(&dev, &ld, &sh).unwrap();
                let sums = gpu::ce_row_sums_dev(&dev, &ld, &max, &td, &sh).unwrap();
                let (max_h, sums_h) = (back(&max).data, back(&sums).data);
                let stats = CeStats { max, sums };
                let loss = gpu::ce_loss_dev(&dev, &stats, &logits.shape, &sh).unwrap();
                let loss = back(&loss).data[0];
                let grad = back(&gpu::ce_grad_dev(&dev, &ld, &td, &stats, &sh, &seed).unwrap());
                let host_stats = RowStats::of(&max_h, &sums_h);
                let host_grad = gpu::ce_grad(&dev, &ld, &td, &host_stats, &sh, 0.75).unwrap();
                let host_grad = back(&host_grad);
                let mut window_losses = 0f64;
                for (lo, hi) in windows {
                    let what = format!("{what} rows {lo}..{hi}");
                    let wsh = windowed(sh, lo, total, seq);
                    let window = rows_of(&logits, lo, hi);
                    let lw = gpu::upload(&dev, &window, dtype).unwrap();
                    let rows = |v: &[f32]| t(&[hi - lo], v[lo..hi].to_vec());
                    let grad_rows = |g: &Tensor| rows_of(g, lo, hi);
                    // On the device, the full targets read at the full rows.
                    let max_w = gpu::ce_row_max_dev(&dev, &lw, &wsh).unwrap();
                    assert_eq!(back(&max_w), rows(&max_h), "{what}: row max");
                    let sums_w = gpu::ce_row_sums_dev(&dev, &lw, &max_w, &td, &wsh).unwrap();
                    let want_s = want_sums(&sums_h, total, lo, hi);
                    assert_eq!(back(&sums_w).data, want_s, "{what}: sums and target logits");
                    let stats_w = CeStats {
                        max: max_w,
                        sums: sums_w,
                    };
                    let loss_w = gpu::ce_loss_dev(&dev, &stats_w, &window.shape, &wsh).unwrap();
                    let loss_w = back(&loss_w);
                    // The host's arithmetic on the same statistics: the window's share.
                    let host_w = RowStats::of(&back(&stats_w.max).data, &back(&stats_w.sums).data);
                    let want = ferrotron_exec::kernel::ce_loss(&host_w, &window.shape, &wsh);
                    let want = t(&[], vec![want.unwrap()]);
                    assert_close(&format!("{what}: loss"), &loss_w, &want, F32);
                    window_losses += loss_w.data[0] as f64;
                    let g = gpu::ce_grad_dev(&dev, &lw, &td, &stats_w, &wsh, &seed).unwrap();
                    let wg = format!("{what}: gradient");
                    assert_close(&wg, &back(&g), &grad_rows(&grad), tol);
                    // The host forms, and the CPU's on the same window.
                    let (sum, tl) = gpu::ce_row_sums(&dev, &lw, &max_h[lo..hi], &td, &wsh).unwrap();
                    assert_eq!([&sum[..], &tl[..]].concat(), want_s, "{what}: host sums");
                    let g = gpu::ce_grad(&dev, &lw, &td, &host_w, &wsh, 0.75).unwrap();
                    let g = back(&g);
                    let wg = format!("{what}: host-stats gradient");
                    assert_close(&wg, &g, &grad_rows(&host_grad), tol);
                    let on_cpu = match dtype {
                        Storage::Bf16 => round_bf16(&window),
                        Storage::F32 => window.clone(),
                    };
                    let max_w = &max_h[lo..hi];
                    let (want_sum, want_tl) =
                        cpu::ce_row_sums(&on_cpu, max_w, &targets, &wsh, 1).unwrap();
                    let as_t = |v: &[f32]| t(&[v.len()], v.to_vec());
                    let ws = format!("{what}: sums as the CPU's");
                    assert_close(&ws, &as_t(&sum), &as_t(&want_sum), F32);
                    assert_eq!(tl, want_tl, "{what}: target logits as the CPU's");
                    let want = cpu::ce_grad(&on_cpu, &targets, &host_w, &wsh, 0.75, 1).unwrap();
                    assert_close(&format!("{wg} as the CPU's"), &g, &want, tol);
                }
                assert_close(
                    &format!("{what}: the windows' losses"),
                    &t(&[], vec![window_losses as f32]),
                    &t(&[], vec![loss]),
                    F32,
                );
            }
        }
    }

    // Refused as invalid, by every phase (the host forms with the CPU's errors): a window past
    // the full rows, a sequence length not dividing them, targets that are not the full rows'.
    let logits = rand(&mut rng, &[2, seq, vocab]);
    let targets = ints(&mut rng, &[2, seq], 9);
    let td = gpu::upload(&dev, &targets, Storage::F32).unwrap();
    let window = rows_of(&logits, 7, 12);
    let lw = gpu::upload(&dev, &window, Storage::F32).unwrap();
    let sh = shard(4, 9, true, 2);
    let max = gpu::upload(&dev, &t(&[5], vec![0.0; 5]), Storage::F32).unwrap();
    let sums = gpu::upload(&dev, &t(&[2, 5], vec![1.0; 10]), Storage::F32).unwrap();
    let stats = CeStats { max, sums };
    let host_stats = RowStats {
        max: vec![0.0; 5],
        sum: vec![1.0; 5],
        target: vec![0.0; 5],
    };
    let seed = gpu::upload(&dev, &t(&[], vec![1.0]), Storage::F32).unwrap();
    let short = t(&[2, 5], vec![0.0; 10]);
    let window_only = t(&[5], vec![0.0; 5]);
    let (short_d, window_only_d) = (
        gpu::upload(&dev, &short, Storage::F32).unwrap(),
        gpu::upload(&dev, &window_only, Storage::F32).unwrap(),
    );
    let invalid = |what: &str, r: Result<(), KernelError>| match r {
        Err(KernelError::Invalid { .. }) => {}
        other => panic!("{what}: {other:?}, expected an invalid-input error"),
    };
    for (what, wsh, (targets, td)) in [
        (
            "rows 9..14 of 12",
            windowed(sh, 9, total, seq),
            (&targets, &td),
        ),
        (
            "rows 0..5 of 12 by 5",
            windowed(sh, 0, total, 5),
            (&targets, &td),
        ),
        (
            "targets [2, 5]",
            windowed(sh, 7, total, seq),
            (&short, &short_d),
        ),
        (
            "targets [5]",
            windowed(sh, 7, total, seq),
            (&window_only, &window_only_d),
        ),
    ] {
        let shape = [5, vocab];
        if !what.starts_with("targets") {
            invalid(what, gpu::ce_row_max_dev(&dev, &lw, &wsh).map(drop));
            let e = gpu::ce_row_max(&dev, &lw, &wsh).unwrap_err();
            assert_eq!(e, cpu::ce_row_max(&window, &wsh, 1).unwrap_err(), "{what}");
            invalid(what, gpu::ce_loss_dev(&dev, &stats, &shape, &wsh).map(drop));
            let loss = ferrotron_exec::kernel::ce_loss(&host_stats, &shape, &wsh);
            invalid(what, loss.map(drop));
        }
        let r = gpu::ce_row_sums_dev(&dev, &lw, &stats.max, td, &wsh);
        invalid(what, r.map(drop));
        let e = gpu::ce_row_sums(&dev, &lw, &host_stats.max, td, &wsh).unwrap_err();
        let want = cpu::ce_row_sums(&window, &host_stats.max, targets, &wsh, 1).unwrap_err();
        assert_eq!(e, want, "{what}");
        invalid(what, Err(e));
        let r = gpu::ce_grad_dev(&dev, &lw, td, &stats, &wsh, &seed);
        invalid(what, r.map(drop));
        let e = gpu::ce_grad(&dev, &lw, td, &host_stats, &wsh, 1.0).unwrap_err();
        let want = cpu::ce_grad(&window, targets, &host_stats, &wsh, 1.0, 1).unwrap_err();
        assert_eq!(e, want, "{what}");
    }
    // A bad target outside the window is still reported (every window's call checks the full
    // targets), as the whole logits' call reports it. (The CPU checks the targets a call reads:
    // it reports this one in the window holding row 9, with the same error.)
    let mut bad = targets.clone();
    bad.data[10] = 9.0;
    let bad = gpu::upload(&dev, &bad, Storage::F32).unwrap();
    let whole = gpu::upload(&dev, &logits, Storage::F32).unwrap();
    let lw = gpu::upload(&dev, &rows_of(&logits, 0, 5), Storage::F32).unwrap();
    let wsh = windowed(sh, 0, total, seq);
    let want = gpu::ce_row_sums(&dev, &whole, &[0.0; 12], &bad, &sh).unwrap_err();
    assert!(
        matches!(want, KernelError::Index { element: 10, .. }),
        "{want}"
    );
    let e = gpu::ce_row_sums(&dev, &lw, &[0.0; 5], &bad, &wsh).unwrap_err();
    assert_eq!(e, want, "a bad target outside the window");
    let sums = gpu::ce_row_sums_dev(&dev, &lw, &stats.max, &bad, &wsh).unwrap();
    assert_eq!(
        gpu::download(&dev, &sums).unwrap_err(),
        want,
        "checked on the device"
    );
}

/// The rows `lo..hi` of `[2, total]` sums: the sums of exponentials, then the target logits.
fn want_sums(sums: &[f32], total: usize, lo: usize, hi: usize) -> Vec<f32> {
    [&sums[lo..hi], &sums[total + lo..total + hi]].concat()
}

/// A downloaded tensor's bits (a bf16 element widens to `f32` exactly, so equal bits are equal
/// device elements in either storage type).
fn bits(t: &Tensor) -> Vec<u32> {
    t.data.iter().map(|x| x.to_bits()).collect()
}

/// Which buffer a tensor holds: the same before and after a call means it wrote in place.
fn buffer_of(t: &CudaTensor) -> usize {
    match &t.data {
        DeviceData::F32(s) => Arc::as_ptr(s) as usize,
        DeviceData::Bf16(s) => Arc::as_ptr(s) as usize,
    }
}

/// Statistics as the group would have reduced them from this rank's (any larger maxima and
/// sums will do), kept on the device.
fn group_stats(dev: &RankDevice, max: &CudaTensor, sums: &CudaTensor) -> CeStats<CudaTensor> {
    let (max, mut sums) = (
        gpu::download(dev, max).unwrap(),
        gpu::download(dev, sums).unwrap(),
    );
    let max = t(&max.shape, max.data.iter().map(|m| m.max(0.25)).collect());
    let rows = max.data.len();
    for s in &mut sums.data[..rows] {
        *s += 1.5;
    }
    CeStats {
        max: gpu::upload(dev, &max, Storage::F32).unwrap(),
        sums: gpu::upload(dev, &sums, Storage::F32).unwrap(),
    }
}

#[test]
fn cross_entropy_gradient_in_place_is_the_new_tensors_to_the_bit() {
    let Some(dev) = device("ce grad in place") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(22);
    let (seq, vocab) = (6, 7);
    let total = 2 * seq;
    // The whole logits, then windows across the sequences' boundary (row 6).
    let windows = [None, Some((0, 5)), Some((5, 9)), Some((9, 12))];
    // Local classes 4..11 of 11 padded ones, 9 real (5 local real, 2 of padding); a rank whose
    // 7 local classes are all real; a rank with none real (its gradient all zeros).
    for (offset, real) in [(4, 9), (0, 9), (14, 9)] {
        let logits = uniform(&mut rng, &[2, seq, vocab], -4.0, 4.0);
        let targets = ints(&mut rng, &[2, seq], real);
        let td = gpu::upload(&dev, &targets, Storage::F32).unwrap();
        for dtype in [Storage::F32, Storage::Bf16] {
            let back = |x: &CudaTensor| gpu::download(&dev, x).unwrap();
            for (shift, window) in [true, false]
                .into_iter()
                .flat_map(|s| windows.map(|w| (s, w)))
            {
                let sh = shard(offset, real, shift, 2);
                let (part, wsh) = match window {
                    None => (logits.clone(), sh),
                    Some((lo, hi)) => (rows_of(&logits, lo, hi), windowed(sh, lo, total, seq)),
                };
                let what =
                    format!("offset {offset} real {real} {dtype:?} shift {shift} {window:?}");
                let lw = gpu::upload(&dev, &part, dtype).unwrap();
                let original = back(&lw);
                let max = gpu::ce_row_max_dev(&dev, &lw, &wsh).unwrap();
                let sums = gpu::ce_row_sums_dev(&dev, &lw, &max, &td, &wsh).unwrap();
                let stats = group_stats(&dev, &max, &sums);
                for seed_dtype in [Storage::F32, Storage::Bf16] {
                    let what = format!("{what} seed {seed_dtype:?}");
                    let seed = gpu::upload(&dev, &t(&[], vec![0.75]), seed_dtype).unwrap();
                    let want = gpu::ce_grad_dev(&dev, &lw, &td, &stats, &wsh, &seed).unwrap();
                    let want = back(&want);
                    assert!(
                        want.data.iter().any(|&g| g != 0.0) || offset >= real,
                        "{what}"
                    );
                    // The logits' own buffer: written over, no second one.
                    let own = gpu::upload(&dev, &part, dtype).unwrap();
                    let at = buffer_of(&own);
                    let got = gpu::ce_grad_in_place_dev(&dev, own, &td, &stats, &wsh, &seed);
                    let got = got.unwrap();
                    assert_eq!(buffer_of(&got), at, "{what}: in the logits' buffer");
                    assert_eq!(got.dtype(), dtype, "{what}: stored as");
                    let got = back(&got);
                    assert_eq!(got.shape, want.shape, "{what}: shape");
                    assert_eq!(bits(&got), bits(&want), "{what}: the gradient");
                    // A buffer shared with another tensor: copied first, the other keeps the
                    // logits.
                    let got = gpu::ce_grad_in_place_dev(&dev, lw.clone(), &td, &stats, &wsh, &seed);
                    let got = got.unwrap();
                    assert_ne!(buffer_of(&got), buffer_of(&lw), "{what}: a copy");
                    assert_eq!(
                        bits(&back(&got)),
                        bits(&want),
                        "{what}: from a shared buffer"
                    );
                    assert_eq!(
                        bits(&back(&lw)),
                        bits(&original),
                        "{what}: the shared buffer"
                    );
                }
            }
        }
    }

    // Through the backend, with its storage type's seed (bf16 under bf16).
    let logits = uniform(&mut rng, &[2, seq, vocab], -4.0, 4.0);
    let targets = ints(&mut rng, &[2, seq], 9);
    for dtype in [Storage::F32, Storage::Bf16] {
        let cuda = Cuda::new(0, 1, dtype).expect("a backend on GPU 0");
        let back = |x: &CudaTensor| cuda.download(x).expect("download");
        let ld = cuda.upload(&logits, IrDType::F32).unwrap();
        let td = cuda.upload(&targets, IrDType::I64).unwrap();
        let seed = cuda.upload(&t(&[], vec![0.5]), IrDType::F32).unwrap();
        let sh = shard(4, 9, true, 1);
        let max = cuda.ce_row_max(&ld, &sh).unwrap();
        let sums = cuda.ce_row_sums(&ld, &max, &td, &sh).unwrap();
        let stats = CeStats { max, sums };
        let want = back(&cuda.ce_grad(&ld, &td, &stats, &sh, &seed).unwrap());
        let kept = back(&ld);
        let got = cuda.ce_grad_in_place(ld.clone(), &td, &stats, &sh, &seed);
        assert_eq!(
            bits(&back(&got.unwrap())),
            bits(&want),
            "{dtype:?}: backend"
        );
        assert_eq!(
            bits(&back(&ld)),
            bits(&kept),
            "{dtype:?}: the shared buffer"
        );
        let at = buffer_of(&ld);
        let got = cuda.ce_grad_in_place(ld, &td, &stats, &sh, &seed).unwrap();
        assert_eq!(buffer_of(&got), at, "{dtype:?}: in the logits' buffer");
        assert_eq!(
            bits(&back(&got)),
            bits(&want),
            "{dtype:?}: backend, in place"
        );
    }

    // The same refusals as the new tensor's, before anything is written: a shared buffer is
    // left as it was.
    let ld = gpu::upload(&dev, &logits, Storage::F32).unwrap();
    let td = gpu::upload(&dev, &targets, Storage::F32).unwrap();
    let sh = shard(4, 9, true, 2);
    let up = |x: &Tensor, dtype| gpu::upload(&dev, x, dtype).unwrap();
    let stats = CeStats {
        max: up(&t(&[total], vec![0.5; total]), Storage::F32),
        sums: up(&t(&[2, total], vec![1.5; 2 * total]), Storage::F32),
    };
    let seed = up(&t(&[], vec![1.0]), Storage::F32);
    let lw = up(&rows_of(&logits, 7, 12), Storage::F32);
    let bad_len = CudaTensor {
        shape: vec![2, seq, vocab + 1],
        data: ld.data.clone(),
    };
    let flat = CudaTensor {
        shape: vec![2 * seq * vocab],
        data: ld.data.clone(),
    };
    let stats_with = |max: Option<CudaTensor>, sums: Option<CudaTensor>| CeStats {
        max: max.unwrap_or_else(|| stats.max.clone()),
        sums: sums.unwrap_or_else(|| stats.sums.clone()),
    };
    // The logits, the targets, the statistics, the seed.
    let refused = |what: &str,
                   args: (CudaTensor, &CudaTensor, &CeStats<CudaTensor>, &CudaTensor),
                   wsh: VocabShard| {
        let (logits_d, targets_d, stats, seed) = args;
        let want = gpu::ce_grad_dev(&dev, &logits_d, targets_d, stats, &wsh, seed);
        let want = want.unwrap_err();
        let got = gpu::ce_grad_in_place_dev(&dev, logits_d, targets_d, stats, &wsh, seed);
        assert_eq!(got.unwrap_err(), want, "{what}");
    };
    let good = stats_with(None, None);
    let short_max = stats_with(Some(up(&t(&[11], vec![0.0; 11]), Storage::F32)), None);
    refused("maxima [11]", (ld.clone(), &td, &short_max, &seed), sh);
    let bf16_max = stats_with(
        Some(up(&t(&[total], vec![0.0; total]), Storage::Bf16)),
        None,
    );
    refused("maxima in bf16", (ld.clone(), &td, &bf16_max, &seed), sh);
    let flat_sums = stats_with(None, Some(up(&t(&[total], vec![1.0; total]), Storage::F32)));
    refused("sums [12]", (ld.clone(), &td, &flat_sums, &seed), sh);
    let seed_1 = up(&t(&[1], vec![1.0]), Storage::F32);
    refused("seed [1]", (ld.clone(), &td, &good, &seed_1), sh);
    let bf16_targets = up(&targets, Storage::Bf16);
    refused(
        "targets in bf16",
        (ld.clone(), &bf16_targets, &good, &seed),
        sh,
    );
    let short_targets = up(&t(&[2, 5], vec![0.0; 10]), Storage::F32);
    refused(
        "targets [2, 5]",
        (ld.clone(), &short_targets, &good, &seed),
        sh,
    );
    let no_parts = shard(4, 9, true, 0);
    refused("token parts 0", (ld.clone(), &td, &good, &seed), no_parts);
    refused("a buffer not the shape's", (bad_len, &td, &good, &seed), sh);
    refused("logits of one axis", (flat, &td, &good, &seed), sh);
    let past = windowed(sh, 9, total, seq);
    refused("rows 9..14 of 12", (lw.clone(), &td, &good, &seed), past);
    let by_5 = windowed(sh, 0, total, 5);
    refused(
        "rows 0..5 of 12 by 5",
        (lw.clone(), &td, &good, &seed),
        by_5,
    );
    assert_eq!(
        gpu::download(&dev, &ld).unwrap(),
        logits,
        "the refused calls' shared buffer"
    );
    assert_eq!(
        gpu::download(&dev, &lw).unwrap(),
        rows_of(&logits, 7, 12),
        "the refused windows' shared buffer"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors and collectives

#[test]
fn refusals_match_the_cpu() {
    let Some(dev) = device("errors") else { return };
    let mut rng = fastrand::Rng::with_seed(14);
    let x = rand(&mut rng, &[3, 4]);
    let cases: Vec<(&str, Op<usize, Dim>)> = vec![
        (
            "AllReduce",
            Op::AllReduce {
                x: 0,
                axis: MeshAxis::Tp,
            },
        ),
        (
            "F",
            Op::F {
                x: 0,
                axis: MeshAxis::Tp,
            },
        ),
        (
            "G",
            Op::G {
                x: 0,
                axis: MeshAxis::Dp,
            },
        ),
        (
            "LocalSlice",
            Op::LocalSlice {
                x: 0,
                dim: 0,
                axis: MeshAxis::Tp,
                parts: 3,
            },
        ),
        (
            "Reshape",
            Op::Reshape {
                x: 0,
                shape: ds(&[5, 2]),
            },
        ),
        (
            "Transpose",
            Op::Transpose {
                x: 0,
                perm: vec![0, 0],
            },
        ),
        (
            "Slice",
            Op::Slice {
                x: 0,
                dim: 2,
                start: d(0),
                end: d(1),
            },
        ),
        (
            "Split",
            Op::Split {
                x: 0,
                dim: 1,
                sizes: ds(&[1, 2]),
            },
        ),
        (
            "SumTo",
            Op::SumTo {
                x: 0,
                shape: ds(&[2]),
            },
        ),
        (
            "Expand",
            Op::Expand {
                x: 0,
                shape: ds(&[3, 5]),
            },
        ),
        (
            "Scale InvSqrt 0",
            Op::Scale {
                x: 0,
                factor: Factor::InvSqrt(d(0)),
            },
        ),
    ];
    for (name, op) in cases {
        check(&dev, name, &op, &[fl(x.clone())], &local(), F32, true);
    }
    // A tensor whose buffer does not fill its shape.
    let good = gpu::upload(&dev, &x, Storage::F32).unwrap();
    let bad = CudaTensor {
        shape: vec![4, 4],
        data: good.data.clone(),
    };
    let e = gpu::eval(&dev, &Op::Relu(&bad), &local()).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { op: "Relu", .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Around eval: moving tensors, communicators, optimizer

#[test]
fn upload_download_cast() {
    let Some(dev) = device("upload") else { return };
    let mut rng = fastrand::Rng::with_seed(15);
    let mut x = uniform(&mut rng, &[3, 7, 5], -1e4, 1e4);
    x.data[0] = f32::NAN;
    x.data[1] = f32::INFINITY;
    x.data[2] = -0.0;
    x.data[3] = 1e-40; // subnormal
    let f = gpu::upload(&dev, &x, Storage::F32).unwrap();
    let back = gpu::download(&dev, &f).unwrap();
    assert_eq!(
        back.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let b = gpu::upload(&dev, &x, Storage::Bf16).unwrap();
    assert_eq!(b.dtype(), Storage::Bf16);
    let want = round_bf16(&x);
    let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&gpu::download(&dev, &b).unwrap()), bits(&want));
    // The device's rounding (cast) is the host's (upload).
    let cast = gpu::cast(&dev, &f, Storage::Bf16).unwrap();
    assert_eq!(bits(&gpu::download(&dev, &cast).unwrap()), bits(&want));
    let wide = gpu::cast(&dev, &b, Storage::F32).unwrap();
    assert_eq!(wide.dtype(), Storage::F32);
    assert_eq!(bits(&gpu::download(&dev, &wide).unwrap()), bits(&want));
    let s = gpu::scalar(&dev, 2.5).unwrap();
    let s = gpu::download(&dev, &s).unwrap();
    assert_eq!((s.shape.len(), s.data.as_slice()), (0, &[2.5f32][..]));
    for dtype in [Storage::F32, Storage::Bf16] {
        let z = gpu::zeros(&dev, &[4, 0, 3], dtype).unwrap();
        assert_eq!(gpu::download(&dev, &z).unwrap().data.len(), 0);
        let z = gpu::zeros(&dev, &[4, 3], dtype).unwrap();
        assert!(gpu::download(&dev, &z)
            .unwrap()
            .data
            .iter()
            .all(|&v| v == 0.0));
    }
    let e = gpu::upload(
        &dev,
        &Tensor {
            shape: vec![2, 2],
            data: vec![1.0].into(),
        },
        Storage::F32,
    );
    assert!(e.is_err());
}

#[test]
fn slices_and_interleaving_for_the_collectives() {
    let Some(dev) = device("interleave") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(16);
    let x = rand(&mut rng, &[4, 6, 5]);
    for dtype in [Storage::F32, Storage::Bf16] {
        let host = if dtype == Storage::Bf16 {
            round_bf16(&x)
        } else {
            x.clone()
        };
        let xd = gpu::upload(&dev, &x, dtype).unwrap();
        for (dim, parts) in [(0, 2), (1, 3), (2, 5), (1, 1)] {
            for index in 0..parts {
                let got = gpu::local_slice(&dev, &xd, dim, index, parts).unwrap();
                let want = Cpu::default()
                    .local_slice(&host, dim, index, parts)
                    .unwrap();
                assert_eq!(
                    gpu::download(&dev, &got).unwrap(),
                    want,
                    "{dim} {index}/{parts}"
                );
            }
            // deinterleave: the parts one after another; interleave puts them back.
            let chunks = gpu::deinterleave(&dev, &xd, dim, parts).unwrap();
            let mut flat = Vec::new();
            for index in 0..parts {
                flat.extend(
                    Cpu::default()
                        .local_slice(&host, dim, index, parts)
                        .unwrap()
                        .data,
                );
            }
            let got = gpu::download(&dev, &chunks).unwrap();
            assert_eq!(got.data, flat, "deinterleave {dim} {parts}");
            assert_eq!(got.shape[0], parts);
            let mut local_shape = x.shape.clone();
            local_shape[dim] /= parts;
            let back = gpu::interleave(&dev, &chunks, &local_shape, dim, parts).unwrap();
            assert_eq!(
                gpu::download(&dev, &back).unwrap(),
                host,
                "interleave {dim} {parts}"
            );
        }
    }
    assert!(
        gpu::local_slice(&dev, &gpu::upload(&dev, &x, Storage::F32).unwrap(), 3, 0, 2).is_err()
    );
    let xd = gpu::upload(&dev, &x, Storage::F32).unwrap();
    assert!(gpu::deinterleave(&dev, &xd, 1, 4).is_err());
    assert!(gpu::interleave(&dev, &xd, &[4, 6, 5], 1, 2).is_err());
}

#[test]
fn reductions_fold_in_rank_order() {
    let Some(dev) = device("reduce") else { return };
    let mut rng = fastrand::Rng::with_seed(17);
    let shape = [3, 50, 7];
    for members in [1, 2, 3, 16, 17, 20, 33] {
        let xs: Vec<Tensor> = (0..members).map(|_| rand(&mut rng, &shape)).collect();
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let mut want = xs[0].clone();
            for x in &xs[1..] {
                for (a, &b) in want.data.iter_mut().zip(&x.data) {
                    *a = match op {
                        ReduceOp::Sum => *a + b,
                        ReduceOp::Max => a.max(b),
                    };
                }
            }
            let on_dev: Vec<CudaTensor> = xs
                .iter()
                .map(|x| gpu::upload(&dev, x, Storage::F32).unwrap())
                .collect();
            let refs: Vec<&CudaTensor> = on_dev.iter().collect();
            let mut out = gpu::zeros(&dev, &shape, Storage::F32).unwrap();
            gpu::reduce_buffers(&dev, &mut out, &refs, op).unwrap();
            let got = gpu::download(&dev, &out).unwrap();
            assert_eq!(got, want, "{members} members {op:?}: bit-identical in f32");
            // Into a buffer shared with an input: the input is left as it was.
            let mut shared = on_dev[0].clone();
            gpu::reduce_buffers(&dev, &mut shared, &refs, op).unwrap();
            assert_eq!(gpu::download(&dev, &shared).unwrap(), want);
            assert_eq!(gpu::download(&dev, &on_dev[0]).unwrap(), xs[0]);
            // bf16: accumulated in f32 (per 16 inputs), rounded once per pass.
            let on_dev: Vec<CudaTensor> = xs
                .iter()
                .map(|x| gpu::upload(&dev, x, Storage::Bf16).unwrap())
                .collect();
            let refs: Vec<&CudaTensor> = on_dev.iter().collect();
            let mut out = gpu::zeros(&dev, &shape, Storage::Bf16).unwrap();
            gpu::reduce_buffers(&dev, &mut out, &refs, op).unwrap();
            let got = gpu::download(&dev, &out).unwrap();
            let mut want = round_bf16(&xs[0]);
            for x in &xs[1..] {
                let x = round_bf16(x);
                for (a, &b) in want.data.iter_mut().zip(&x.data) {
                    *a = match op {
                        ReduceOp::Sum => *a + b,
                        ReduceOp::Max => a.max(b),
                    };
                }
            }
            let tol = Tol {
                rtol: 1e-2,
                floor: 2e-2,
            };
            assert_close(&format!("{members} members {op:?} bf16"), &got, &want, tol);
        }
    }
    // NaN loses against a number in Max (f32::max), as the CPU communicator.
    let a = t(&[3], vec![f32::NAN, 1.0, f32::NAN]);
    let b = t(&[3], vec![2.0, f32::NAN, f32::NAN]);
    let (ad, bd) = (
        gpu::upload(&dev, &a, Storage::F32).unwrap(),
        gpu::upload(&dev, &b, Storage::F32).unwrap(),
    );
    let mut out = gpu::zeros(&dev, &[3], Storage::F32).unwrap();
    gpu::reduce_buffers(&dev, &mut out, &[&ad, &bd], ReduceOp::Max).unwrap();
    let got = gpu::download(&dev, &out).unwrap();
    assert_eq!(&got.data[..2], &[2.0, 1.0]);
    assert!(got.data[2].is_nan());
    let mut wrong = gpu::zeros(&dev, &[4], Storage::F32).unwrap();
    assert!(gpu::reduce_buffers(&dev, &mut wrong, &[&ad], ReduceOp::Sum).is_err());
}

#[test]
fn first_non_finite_finds_the_first() {
    let Some(dev) = device("non-finite") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(18);
    for dtype in [Storage::F32, Storage::Bf16] {
        let mut x = rand(&mut rng, &[5000]);
        let d0 = gpu::upload(&dev, &x, dtype).unwrap();
        assert_eq!(gpu::first_non_finite(&dev, &d0).unwrap(), None);
        x.data[4321] = f32::NAN;
        x.data[1234] = f32::NEG_INFINITY;
        let d1 = gpu::upload(&dev, &x, dtype).unwrap();
        assert_eq!(
            gpu::first_non_finite(&dev, &d1).unwrap(),
            Some(f32::NEG_INFINITY)
        );
        x.data[7] = f32::NAN;
        let d2 = gpu::upload(&dev, &x, dtype).unwrap();
        assert!(gpu::first_non_finite(&dev, &d2).unwrap().unwrap().is_nan());
        let empty = gpu::zeros(&dev, &[0], dtype).unwrap();
        assert_eq!(gpu::first_non_finite(&dev, &empty).unwrap(), None);
    }
}

/// One AdamW update with the test's settings.
fn update([lr, beta1, beta2, eps, weight_decay]: [f64; 5], step: u32, clip: f64) -> AdamW {
    AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        grad_scale: clip,
    }
}

#[test]
fn adamw_and_clipping_match_the_host_update_to_the_bit() {
    let Some(dev) = device("adamw") else { return };
    let mut rng = fastrand::Rng::with_seed(19);
    let shape = [37, 29];
    let mut w = rand(&mut rng, &shape);
    let (mut m, mut v) = (Tensor::zeros(shape.to_vec()), Tensor::zeros(shape.to_vec()));
    let mut wd = gpu::upload(&dev, &w, Storage::F32).unwrap();
    let mut md = gpu::upload(&dev, &m, Storage::F32).unwrap();
    let mut vd = gpu::upload(&dev, &v, Storage::F32).unwrap();
    let hyper = [1e-3, 0.9, 0.95, 1e-8, 0.1];
    for step in 1..=5u32 {
        let g = rand(&mut rng, &shape);
        let gd = gpu::upload(&dev, &g, Storage::F32).unwrap();
        let clip = if step % 2 == 0 { 0.37 } else { 1.0 };
        let u = update(hyper, step, clip);
        gpu::adamw(&dev, &mut wd, &gd, (&mut md, &mut vd), u).unwrap();
        adamw_host(&mut w.data, &g.data, &mut m.data, &mut v.data, u);
        assert_eq!(
            gpu::download(&dev, &wd).unwrap(),
            w,
            "weights after step {step}"
        );
        assert_eq!(gpu::download(&dev, &md).unwrap(), m, "m after step {step}");
        assert_eq!(gpu::download(&dev, &vd).unwrap(), v, "v after step {step}");
    }
    // A bf16 gradient is widened exactly.
    let g = rand(&mut rng, &shape);
    let gd = gpu::upload(&dev, &g, Storage::Bf16).unwrap();
    gpu::adamw(
        &dev,
        &mut wd,
        &gd,
        (&mut md, &mut vd),
        update(hyper, 6, 1.0),
    )
    .unwrap();
    let gr = round_bf16(&g);
    let u = update(hyper, 6, 1.0);
    adamw_host(&mut w.data, &gr.data, &mut m.data, &mut v.data, u);
    assert_eq!(gpu::download(&dev, &wd).unwrap(), w);
    // A weight shared with another tensor is copied, not written through.
    let keep = wd.clone();
    let before = gpu::download(&dev, &keep).unwrap();
    gpu::adamw(
        &dev,
        &mut wd,
        &gd,
        (&mut md, &mut vd),
        update(hyper, 7, 1.0),
    )
    .unwrap();
    assert_eq!(gpu::download(&dev, &keep).unwrap(), before);
    // Step 0 (a 0-based count passed by mistake) is refused.
    assert!(gpu::adamw(
        &dev,
        &mut wd,
        &gd,
        (&mut md, &mut vd),
        update(hyper, 0, 1.0)
    )
    .is_err());
    // scale_in_place: (v as f64 * factor) as f32.
    for dtype in [Storage::F32, Storage::Bf16] {
        let x = rand(&mut rng, &[1000]);
        let mut xd = gpu::upload(&dev, &x, dtype).unwrap();
        gpu::scale_in_place(&dev, &mut xd, 0.123).unwrap();
        let base = if dtype == Storage::Bf16 {
            round_bf16(&x)
        } else {
            x
        };
        let mut want = Tensor {
            shape: base.shape.clone(),
            data: base
                .data
                .iter()
                .map(|&v| (v as f64 * 0.123) as f32)
                .collect(),
        };
        if dtype == Storage::Bf16 {
            want = round_bf16(&want);
        }
        assert_eq!(gpu::download(&dev, &xd).unwrap(), want, "{dtype:?}");
    }
}

/// Indices past 2^31, all on the device: a fill, a pad, a division that leaves one NaN as the
/// very last element (found by the non-finite search), a slice at the far end, a sum (about
/// 18 GB of GPU memory; skipped on smaller GPUs).
#[test]
fn tensors_past_two_to_the_31_elements() {
    let Some(dev) = device("large") else { return };
    let n = (1usize << 31) + 1000;
    let free = dev
        .gpu
        .ctx
        .mem_get_info()
        .map(|(free, _)| free)
        .unwrap_or(0);
    if free < 24 << 30 {
        say(&format!(
            "SKIPPED: {:.1} GB free, the large-tensor test needs 24 GB",
            free as f64 / 1e9
        ));
        return;
    }
    let one = |op: Op<&CudaTensor, Dim>| gpu::eval(&dev, &op, &local()).unwrap().remove(0);
    let x = one(Op::Fill {
        shape: ds(&[n - 1]),
        value: 0.5,
        dtype: IrDType::F32,
    });
    // [0.5, ..., 0.5, 0]
    let z = one(Op::Pad {
        x: &x,
        dim: 0,
        before: d(0),
        after: d(1),
    });
    drop(x);
    // 1 everywhere but the last element: 0 / 0.
    let q = one(Op::Div(&z, &z));
    let found = gpu::first_non_finite(&dev, &q).unwrap();
    assert!(found.is_some_and(|v| v.is_nan()), "{found:?}");
    let tail = one(Op::Slice {
        x: &q,
        dim: 0,
        start: d(n - 1000),
        end: d(n),
    });
    let tail = gpu::download(&dev, &tail).unwrap();
    assert!(
        tail.data[..999].iter().all(|&v| v == 1.0),
        "the last elements"
    );
    assert!(tail.data[999].is_nan());
    drop(q);
    let total = one(Op::SumTo {
        x: &z,
        shape: vec![],
    });
    let total = gpu::download(&dev, &total).unwrap().data[0] as f64;
    // An f32 sum of 2^31 elements: only the coverage is checked, not the rounding.
    let want = 0.5 * (n - 1) as f64;
    assert!(
        (total - want).abs() <= 1e-3 * want,
        "sum {total}, want {want}"
    );
}

/// The gradient norm's squares of several tensors in one wait: the same bits as one call per
/// tensor added in order, and the host's `f64` sum to within rounding (empty and bf16 tensors
/// among them).
#[test]
fn the_squared_norm_of_many_tensors_is_each_ones_added() {
    let Some(dev) = device("sum of squares") else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(21);
    let hosts: Vec<Tensor> = [&[3, 5][..], &[0, 4], &[1000], &[7, 33, 9]]
        .iter()
        .map(|s| rand(&mut rng, s))
        .collect();
    let mut ts: Vec<CudaTensor> = hosts
        .iter()
        .map(|h| gpu::upload(&dev, h, Storage::F32).unwrap())
        .collect();
    ts.push(gpu::upload(&dev, &hosts[2], Storage::Bf16).unwrap());
    let refs: Vec<&CudaTensor> = ts.iter().collect();
    let all = gpu::sum_squares_all(&dev, &refs).unwrap();
    let each: f64 = refs
        .iter()
        .map(|t| gpu::sum_squares(&dev, t).unwrap())
        .sum();
    assert_eq!(all.to_bits(), each.to_bits());
    let bf16_part = gpu::sum_squares(&dev, &ts[4]).unwrap();
    let host: f64 = hosts
        .iter()
        .flat_map(|h| &h.data)
        .map(|&x| f64::from(x) * f64::from(x))
        .sum();
    assert!(
        ((all - bf16_part) - host).abs() <= 1e-9 * host,
        "{all} vs {host}"
    );
    assert_eq!(gpu::sum_squares_all(&dev, &[]).unwrap(), 0.0);
}
