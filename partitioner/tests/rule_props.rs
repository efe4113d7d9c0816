//! Property tests of the sharding rules: random ops, shapes and input layouts, checked against
//! the reference evaluator.
//!
//! Each case evaluates the unpartitioned op with [`eval_op`], then, for every rank of `p`
//! (2, 3 or 4), evaluates the same op on that rank's local inputs (its slice of a `Split` input,
//! its addend of a `Partial` one, the whole of a `Replicated` one; size attributes such as a
//! reshape's target localized to the layout the rule claims), and combines the rank results as the
//! rule's output layout says: concatenated along `d` for `Split(d)`, summed for `Partial`, each
//! equal to the whole for `Replicated`. Whenever a rule accepts its inputs, the combination must
//! be the unpartitioned result (to 1e-9, relative). A rejection is always allowed (rules may be
//! conservative); each test asserts that enough cases were accepted to mean something, and prints
//! its counts (`cargo test --test rule_props -- --nocapture`).
//!
//! Two ops run with a per-rank emulation of what the runtime does, not the plain op: the
//! vocabulary-parallel embedding (and its gradient), where each rank offsets the ids into its rows
//! and zeroes the lookups outside them, and the batch-split cross-entropy, whose local mean is
//! over the global token count (`1/p` of the local mean). Vocabulary-parallel cross-entropy and
//! dropout (whose mask is a function of the global element index) are left out: the first needs
//! communication inside the op, the second a per-rank mask offset.

use fastrand::Rng;
use ferrotron_ir::op::{Activation, Factor};
use ferrotron_ir::reference::{eval_op, Tensor};
use ferrotron_ir::{DType, Dim, Op, Shape, TensorType};
use ferrotron_partitioner::layout::Layout;
use ferrotron_partitioner::rules::{output_layouts, Sharded};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use Layout::*;

/// One input of a case: its full value and how it is held.
struct Input {
    full: Tensor,
    int: bool,
    layout: Layout,
}

impl Input {
    fn sharded(&self) -> Sharded {
        let sizes: Vec<u64> = self.full.shape.iter().map(|&s| s as u64).collect();
        let dtype = if self.int { DType::I64 } else { DType::F32 };
        Sharded {
            ty: TensorType::new(dtype, Shape::from_sizes(&sizes)),
            layout: self.layout,
        }
    }
}

/// A case: an op over input indices.
struct Case {
    op: Op<usize, Dim>,
    inputs: Vec<Input>,
}

/// The random source of cases for one mesh size.
struct Gen {
    rng: Rng,
    p: usize,
}

impl Gen {
    /// A dimension size: mostly divisible by `p`, sometimes 1 (to broadcast), sometimes not.
    fn dim(&mut self) -> usize {
        match self.rng.u8(0..10) {
            0..=5 => self.p * self.rng.usize(1..=2),
            6..=7 => 1,
            _ => self.rng.usize(2..=5),
        }
    }

    fn shape(&mut self, rank: usize) -> Vec<usize> {
        (0..rank).map(|_| self.dim()).collect()
    }

    fn floats(&mut self, shape: &[usize]) -> Tensor {
        Tensor::from_fn(shape.to_vec(), |_| self.rng.f64() * 4.0 - 2.0)
    }

    /// Floats bounded away from zero (denominators).
    fn nonzero(&mut self, shape: &[usize]) -> Tensor {
        Tensor::from_fn(shape.to_vec(), |_| {
            let m = 0.5 + self.rng.f64() * 1.5;
            if self.rng.bool() {
                m
            } else {
                -m
            }
        })
    }

    fn ints(&mut self, shape: &[usize], bound: usize) -> Tensor {
        Tensor::from_fn(shape.to_vec(), |_| self.rng.usize(0..bound) as f64)
    }

    fn splittable(&self, shape: &[usize]) -> Vec<usize> {
        (0..shape.len())
            .filter(|&d| shape[d] > 0 && shape[d].is_multiple_of(self.p))
            .collect()
    }

    /// A random layout for a tensor of `shape`: replicated, split along a divisible dimension, or
    /// (when allowed) partial.
    fn layout(&mut self, shape: &[usize], partial: bool) -> Layout {
        let dims = self.splittable(shape);
        match self.rng.u8(0..10) {
            0..=2 => Replicated,
            3..=7 if !dims.is_empty() => Split(dims[self.rng.usize(..dims.len())]),
            8..=9 if partial => Partial,
            _ => Replicated,
        }
    }

    fn input(&mut self, full: Tensor) -> Input {
        let layout = self.layout(&full.shape, true);
        Input {
            full,
            int: false,
            layout,
        }
    }

    fn float_input(&mut self, shape: &[usize]) -> Input {
        let full = self.floats(shape);
        self.input(full)
    }

    fn int_input(&mut self, shape: &[usize], bound: usize) -> Input {
        let full = self.ints(shape, bound);
        let layout = self.layout(shape, false);
        Input {
            full,
            int: true,
            layout,
        }
    }

    fn replicated(full: Tensor) -> Input {
        Input {
            full,
            int: false,
            layout: Replicated,
        }
    }

    /// A shape that broadcasts to `out`: a suffix of it with some dimensions set to 1.
    fn broadcast_from(&mut self, out: &[usize]) -> Vec<usize> {
        let rank = self.rng.usize(0..=out.len());
        out[out.len() - rank..]
            .iter()
            .map(|&s| if self.rng.u8(0..4) == 0 { 1 } else { s })
            .collect()
    }
}

/// How a case ended.
enum Outcome {
    Accepted,
    Rejected,
    Skipped(&'static str),
}

/// Counts over one test's cases.
#[derive(Default)]
struct Stats {
    accepted: usize,
    rejected: usize,
    skipped: BTreeMap<&'static str, usize>,
    /// Accepted cases by the layout of their first output.
    outputs: BTreeMap<String, usize>,
}

impl Stats {
    fn total(&self) -> usize {
        self.accepted + self.rejected + self.skipped.values().sum::<usize>()
    }

    /// Prints the counts and asserts that at least `min_accepted` of the cases were accepted and
    /// that every layout in `must_see` was produced by some accepted case.
    fn finish(&self, what: &str, min_accepted: f64, must_see: &[&str]) {
        println!(
            "{what}: {} cases, {} accepted, {} rejected, skipped {:?}; accepted outputs {:?}",
            self.total(),
            self.accepted,
            self.rejected,
            self.skipped,
            self.outputs
        );
        assert!(
            self.accepted as f64 >= min_accepted * self.total() as f64,
            "{what}: only {} of {} cases accepted",
            self.accepted,
            self.total()
        );
        for kind in must_see {
            assert!(
                self.outputs.keys().any(|k| k.starts_with(kind)),
                "{what}: no accepted case produced a {kind} output ({:?})",
                self.outputs
            );
        }
    }
}

fn run(stats: &mut Stats, g: &mut Gen, case: Case) {
    match check(&case, g) {
        Outcome::Accepted => stats.accepted += 1,
        Outcome::Rejected => stats.rejected += 1,
        Outcome::Skipped(why) => *stats.skipped.entry(why).or_default() += 1,
    }
}

/// Runs `cases` cases from `make` for each of p = 2, 3, 4, seeded by `seed`.
fn property(
    what: &str,
    seed: u64,
    cases: usize,
    min_accepted: f64,
    must_see: &[&str],
    mut make: impl FnMut(&mut Gen) -> Case,
) {
    let mut stats = Stats::default();
    for p in [2, 3, 4] {
        let mut g = Gen {
            rng: Rng::with_seed(seed * 31 + p as u64),
            p,
        };
        for _ in 0..cases {
            let case = make(&mut g);
            let layout = case_first_layout(&case).unwrap_or_default();
            let before = stats.accepted;
            run(&mut stats, &mut g, case);
            if stats.accepted > before {
                *stats.outputs.entry(layout).or_default() += 1;
            }
        }
    }
    stats.finish(what, min_accepted, must_see);
}

fn case_first_layout(case: &Case) -> Option<String> {
    let op = sharded_op(case);
    output_layouts(&op).ok().map(|ls| match ls[0] {
        Split(_) => "split".to_string(),
        l => l.to_string(),
    })
}

fn sharded_op(case: &Case) -> Op<Sharded, Dim> {
    case.op
        .try_map::<_, _, (), _, _>(|&i| Ok(case.inputs[i].sharded()), |d| Ok(d.clone()))
        .unwrap()
}

fn eval_on(op: &Op<usize, Dim>, values: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let op = op
        .try_map::<_, _, (), _, _>(|&i| Ok(&values[i]), |d| Ok(d.clone()))
        .unwrap();
    eval_op(&op).map_err(|e| e.to_string())
}

fn eval1(op: Op<&Tensor, Dim>) -> Tensor {
    eval_op(&op).unwrap().remove(0)
}

/// Rank `r`'s slice of `x` along `d` (of `p` equal slices).
fn chunk(x: &Tensor, d: usize, r: usize, p: usize) -> Tensor {
    let n = x.shape[d] / p;
    eval1(Op::Slice {
        x,
        dim: d as i64,
        start: Dim::new((r * n) as u64),
        end: Dim::new(((r + 1) * n) as u64),
    })
}

/// `p` random addends summing to `x`.
fn addends(g: &mut Gen, x: &Tensor) -> Vec<Tensor> {
    let mut parts: Vec<Tensor> = (1..g.p).map(|_| g.floats(&x.shape)).collect();
    let mut last = x.clone();
    for a in &parts {
        last = eval1(Op::Sub(&last, a));
    }
    parts.push(last);
    parts
}

/// How the rank results of one output combine under `layout`, or why they cannot.
fn combine(layout: Layout, parts: &[Tensor], full: &Tensor) -> Result<Tensor, String> {
    match layout {
        Replicated => {
            for (r, part) in parts.iter().enumerate() {
                if !close(part, full) {
                    return Err(format!(
                        "rank {r} differs from the whole: {}",
                        diff(part, full)
                    ));
                }
            }
            Ok(full.clone())
        }
        Split(d) => {
            if parts.iter().any(|t| d >= t.rank()) {
                return Err(format!("split({d}) of a rank-{} result", parts[0].rank()));
            }
            eval_op(&Op::Concat {
                xs: parts.iter().collect(),
                dim: d as i64,
            })
            .map(|mut v| v.remove(0))
            .map_err(|e| format!("the rank results do not concatenate: {e}"))
        }
        Partial => {
            let mut sum = parts[0].clone();
            for t in &parts[1..] {
                sum = eval_op(&Op::Add(&sum, t))
                    .map_err(|e| format!("the rank results do not add up: {e}"))?
                    .remove(0);
            }
            if sum.shape != full.shape {
                return Err(format!("partial sums of shape {:?}", sum.shape));
            }
            Ok(sum)
        }
    }
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    let scale = 1f64.max(b.max_abs());
    a.max_abs_diff(b).is_some_and(|d| d <= 1e-9 * scale)
}

fn diff(a: &Tensor, b: &Tensor) -> String {
    match a.max_abs_diff(b) {
        Some(d) => format!("max |Δ| = {d:e}"),
        None => format!("shape {:?} vs {:?}", a.shape, b.shape),
    }
}

/// Every layout that the rank results would be consistent with (for failure reports).
fn consistent(parts: &[Tensor], full: &Tensor) -> Vec<Layout> {
    let mut candidates = vec![Replicated, Partial];
    candidates.extend((0..full.rank()).map(Split));
    candidates
        .into_iter()
        .filter(|&l| combine(l, parts, full).is_ok_and(|t| close(&t, full)))
        .collect()
}

/// The op with its size attributes made local to what the rule claims, or why that cannot be.
fn localize(
    op: &Op<usize, Dim>,
    outs: &[Layout],
    full_outs: &[Tensor],
    p: usize,
) -> Result<Op<usize, Dim>, &'static str> {
    // A claimed split must cut its dimension into equal parts.
    for (l, t) in outs.iter().zip(full_outs) {
        if let Split(d) = *l {
            if d < t.rank() && !t.shape[d].is_multiple_of(p) {
                return Err("claimed split of an indivisible output dimension");
            }
        }
    }
    let mut op = op.clone();
    match &mut op {
        Op::Reshape { shape, .. } | Op::SumTo { shape, .. } => {
            if let Split(j) = outs[0] {
                if let Some(s) = shape.get_mut(j) {
                    *s = Dim::new(s.size / p as u64);
                }
            }
        }
        _ => {}
    }
    Ok(op)
}

/// Checks one case (see the module docs).
fn check(case: &Case, g: &mut Gen) -> Outcome {
    let p = g.p;
    let Ok(outs) = output_layouts(&sharded_op(case)) else {
        return Outcome::Rejected;
    };
    let full: Vec<Tensor> = case.inputs.iter().map(|x| x.full.clone()).collect();
    let full_outs = eval_on(&case.op, &full)
        .unwrap_or_else(|e| panic!("bad case {}: {e}", describe(case, p, &outs)));
    assert_eq!(outs.len(), full_outs.len(), "{}", describe(case, p, &outs));

    // The emulated ops.
    let mut vocab_rows = None;
    let mut ce_scale = 1.0;
    match &case.op {
        Op::Embedding { table, .. } | Op::EmbeddingGrad { table, .. }
            if case.inputs[*table].layout == Split(0) =>
        {
            vocab_rows = Some(case.inputs[*table].full.shape[0] / p);
        }
        Op::CrossEntropy { logits, .. } | Op::CrossEntropyGrad { logits, .. } => {
            let x = &case.inputs[*logits];
            match x.layout {
                Split(d) if d + 1 == x.full.rank() => {
                    return Outcome::Skipped("vocabulary-parallel cross-entropy communicates");
                }
                Split(_) => ce_scale = 1.0 / p as f64,
                _ => {}
            }
        }
        _ => {}
    }

    let local_op = match localize(&case.op, &outs, &full_outs, p) {
        Ok(op) => op,
        Err(why) => return Outcome::Skipped(why),
    };
    let addends: Vec<Option<Vec<Tensor>>> = case
        .inputs
        .iter()
        .map(|x| (x.layout == Partial).then(|| addends(g, &x.full)))
        .collect();

    let mut per_rank: Vec<Vec<Tensor>> = Vec::with_capacity(p);
    for r in 0..p {
        let mut locals: Vec<Tensor> = case
            .inputs
            .iter()
            .zip(&addends)
            .map(|(x, parts)| match (x.layout, parts) {
                (Split(d), _) => chunk(&x.full, d, r, p),
                (Partial, Some(parts)) => parts[r].clone(),
                _ => x.full.clone(),
            })
            .collect();
        // Vocabulary-parallel embedding: ids into this rank's rows, the others masked.
        let mut masked = Vec::new();
        if let (Some(rows), Op::Embedding { ids, .. } | Op::EmbeddingGrad { ids, .. }) =
            (vocab_rows, &case.op)
        {
            let lo = (r * rows) as f64;
            for (k, id) in locals[*ids].data.iter_mut().enumerate() {
                if *id >= lo && *id < lo + rows as f64 {
                    *id -= lo;
                } else {
                    *id = 0.0;
                    masked.push(k);
                }
            }
            if let Op::EmbeddingGrad { dy, .. } = &case.op {
                let w = locals[*dy].shape.last().copied().unwrap_or(0);
                for &k in &masked {
                    locals[*dy].data[k * w..(k + 1) * w].fill(0.0);
                }
            }
        }
        let mut got = eval_on(&local_op, &locals).unwrap_or_else(|e| {
            panic!(
                "the rule accepted {}, but rank {r} cannot evaluate it: {e}",
                describe(case, p, &outs)
            )
        });
        if let Op::Embedding { .. } = &case.op {
            let w = got[0].shape.last().copied().unwrap_or(0);
            for &k in &masked {
                got[0].data[k * w..(k + 1) * w].fill(0.0);
            }
        }
        for t in &mut got {
            t.data.iter_mut().for_each(|v| *v *= ce_scale);
        }
        per_rank.push(got);
    }

    for (k, (&layout, full)) in outs.iter().zip(&full_outs).enumerate() {
        let parts: Vec<Tensor> = per_rank.iter().map(|o| o[k].clone()).collect();
        let verdict = match combine(layout, &parts, full) {
            Ok(t) if close(&t, full) => continue,
            Ok(t) => diff(&t, full),
            Err(e) => e,
        };
        panic!(
            "rule bug: {}\n  output {k}: the rule says {layout}, but {verdict}; the rank \
             results are consistent with {:?}",
            describe(case, p, &outs),
            consistent(&parts, full)
        );
    }
    Outcome::Accepted
}

fn describe(case: &Case, p: usize, outs: &[Layout]) -> String {
    let op = case
        .op
        .try_map::<usize, u64, (), _, _>(|&i| Ok(i), |d| Ok(d.size))
        .unwrap();
    let mut s = format!("{op:?} over p = {p}, inputs");
    for (i, x) in case.inputs.iter().enumerate() {
        let _ = write!(s, " #{i} {:?} {}", x.full.shape, x.layout);
    }
    let _ = write!(s, " → claimed {outs:?}");
    s
}

// ---------------------------------------------------------------------------------------------
// The properties, one op family each.

#[test]
fn elementwise_binary_ops_with_broadcasting() {
    property(
        "Add/Sub/Mul/Div",
        1,
        250,
        0.2,
        &["split", "partial", "replicated"],
        |g| {
            let rank = g.rng.usize(1..=4);
            let out = g.shape(rank);
            let (sa, sb) = (g.broadcast_from(&out), g.broadcast_from(&out));
            let a = g.float_input(&sa);
            let which = g.rng.u8(0..4);
            let b = if which == 3 {
                // Denominators away from zero.
                let full = g.nonzero(&sb);
                g.input(full)
            } else {
                g.float_input(&sb)
            };
            let op = match which {
                0 => Op::Add(0, 1),
                1 => Op::Sub(0, 1),
                2 => Op::Mul(0, 1),
                _ => Op::Div(0, 1),
            };
            Case {
                op,
                inputs: vec![a, b],
            }
        },
    );
}

#[test]
fn scale_and_activations() {
    property(
        "Scale/Gelu/GeluTanh/Silu/Relu",
        2,
        200,
        0.4,
        &["split", "partial"],
        |g| {
            let rank = g.rng.usize(0..=4);
            let shape = g.shape(rank);
            let x = g.float_input(&shape);
            let op = match g.rng.u8(0..6) {
                0 => Op::Scale {
                    x: 0,
                    factor: Factor::Const(g.rng.f64() * 3.0 - 1.5),
                },
                1 => Op::Scale {
                    x: 0,
                    factor: Factor::InvSqrt(Dim::new(g.rng.u64(1..100))),
                },
                2 => Op::Gelu(0),
                3 => Op::GeluTanh(0),
                4 => Op::Silu(0),
                _ => Op::Relu(0),
            };
            Case {
                op,
                inputs: vec![x],
            }
        },
    );
}

#[test]
fn softmax_causal_and_not() {
    property("Softmax", 3, 250, 0.3, &["split", "replicated"], |g| {
        let causal = g.rng.bool();
        let rank = g.rng.usize(if causal { 2 } else { 1 }..=4);
        let mut shape = g.shape(rank);
        if causal {
            let (q, k) = (shape[rank - 2], shape[rank - 1]);
            shape[rank - 2] = q.min(k);
            shape[rank - 1] = q.max(k);
        }
        Case {
            op: Op::Softmax { x: 0, causal },
            inputs: vec![g.float_input(&shape)],
        }
    });
}

#[test]
fn layer_and_rms_norms() {
    property(
        "LayerNorm/RmsNorm",
        4,
        250,
        0.2,
        &["split", "replicated"],
        |g| {
            let rank = g.rng.usize(1..=3);
            let shape = g.shape(rank);
            let n = shape[rank - 1];
            let mut inputs = vec![g.float_input(&shape)];
            let param = |g: &mut Gen, inputs: &mut Vec<Input>| {
                g.rng.u8(0..4).ne(&0).then(|| {
                    // Parameters mostly replicated, as the rules require.
                    let full = g.floats(&[n]);
                    inputs.push(if g.rng.bool() {
                        Gen::replicated(full)
                    } else {
                        g.input(full)
                    });
                    inputs.len() - 1
                })
            };
            let eps = 1e-5;
            let op = if g.rng.bool() {
                let weight = param(g, &mut inputs);
                let bias = param(g, &mut inputs);
                Op::LayerNorm {
                    x: 0,
                    weight,
                    bias,
                    eps,
                }
            } else {
                let weight = param(g, &mut inputs);
                Op::RmsNorm { x: 0, weight, eps }
            };
            Case { op, inputs }
        },
    );
}

#[test]
fn matmul_with_batch_broadcasting_and_transposes() {
    property(
        "MatMul",
        5,
        400,
        0.15,
        &["split", "partial", "replicated"],
        |g| {
            let batch_rank = g.rng.usize(0..=2);
            let batch = g.shape(batch_rank);
            let (m, k, n) = (g.dim(), g.dim(), g.dim());
            let (ta, tb) = (g.rng.bool(), g.rng.bool());
            let mut sa = g.broadcast_from(&batch);
            sa.extend(if ta { [k, m] } else { [m, k] });
            let mut sb = g.broadcast_from(&batch);
            sb.extend(if tb { [n, k] } else { [k, n] });
            Case {
                op: Op::MatMul {
                    a: 0,
                    b: 1,
                    transpose_a: ta,
                    transpose_b: tb,
                },
                inputs: vec![g.float_input(&sa), g.float_input(&sb)],
            }
        },
    );
}

/// Two groupings of the same factors: a reshape's source and target shapes.
fn regroup(g: &mut Gen) -> (Vec<usize>, Vec<usize>) {
    let count = g.rng.usize(1..=4);
    let factors: Vec<usize> = (0..count).map(|_| g.dim()).collect();
    let group = |g: &mut Gen| {
        let mut shape = Vec::new();
        let mut acc = 1;
        for (i, &f) in factors.iter().enumerate() {
            acc *= f;
            if i + 1 == factors.len() || g.rng.bool() {
                shape.push(acc);
                acc = 1;
            }
        }
        shape
    };
    (group(g), group(g))
}

#[test]
fn reshape() {
    property("Reshape", 6, 300, 0.3, &["split", "partial"], |g| {
        let (from, to) = regroup(g);
        Case {
            op: Op::Reshape {
                x: 0,
                shape: to.iter().map(|&s| Dim::new(s as u64)).collect(),
            },
            inputs: vec![g.float_input(&from)],
        }
    });
}

#[test]
fn transpose() {
    property("Transpose", 7, 200, 0.5, &["split", "partial"], |g| {
        let rank = g.rng.usize(1..=4);
        let shape = g.shape(rank);
        let mut perm: Vec<usize> = (0..rank).collect();
        g.rng.shuffle(&mut perm);
        Case {
            op: Op::Transpose { x: 0, perm },
            inputs: vec![g.float_input(&shape)],
        }
    });
}

/// A random axis of a rank-`rank` tensor, sometimes counted from the end.
fn axis(g: &mut Gen, rank: usize) -> (usize, i64) {
    let a = g.rng.usize(..rank);
    let written = if g.rng.bool() {
        a as i64
    } else {
        a as i64 - rank as i64
    };
    (a, written)
}

#[test]
fn slice_split_concat_pad() {
    property(
        "Slice/Split/Concat/Pad",
        8,
        300,
        0.3,
        &["split", "partial"],
        |g| {
            let rank = g.rng.usize(1..=4);
            let mut shape = g.shape(rank);
            let (a, written) = axis(g, rank);
            let d = |n: usize| Dim::new(n as u64);
            match g.rng.u8(0..4) {
                0 => {
                    let size = shape[a];
                    let start = g.rng.usize(0..=size);
                    let end = g.rng.usize(start..=size);
                    Case {
                        op: Op::Slice {
                            x: 0,
                            dim: written,
                            start: d(start),
                            end: d(end),
                        },
                        inputs: vec![g.float_input(&shape)],
                    }
                }
                1 => {
                    let mut left = shape[a];
                    let mut sizes = Vec::new();
                    while left > 0 && sizes.len() < 3 {
                        let s = g.rng.usize(1..=left);
                        sizes.push(d(s));
                        left -= s;
                    }
                    if left > 0 || sizes.is_empty() {
                        sizes.push(d(left));
                    }
                    Case {
                        op: Op::Split {
                            x: 0,
                            dim: written,
                            sizes,
                        },
                        inputs: vec![g.float_input(&shape)],
                    }
                }
                2 => {
                    let count = g.rng.usize(1..=3);
                    // Mostly one shared layout (what the rule requires), split off the joined axis.
                    let shared = g.layout(&shape, true);
                    let same = g.rng.u8(0..4) != 0;
                    let inputs = (0..count)
                        .map(|_| {
                            shape[a] = g.dim();
                            let full = g.floats(&shape);
                            let layout = match shared {
                                Split(s) if s == a => Replicated,
                                l if same => l,
                                _ => g.layout(&shape, true),
                            };
                            Input {
                                full,
                                int: false,
                                layout,
                            }
                        })
                        .collect();
                    Case {
                        op: Op::Concat {
                            xs: (0..count).collect(),
                            dim: written,
                        },
                        inputs,
                    }
                }
                _ => Case {
                    op: Op::Pad {
                        x: 0,
                        dim: written,
                        before: d(g.rng.usize(0..=3)),
                        after: d(g.rng.usize(0..=3)),
                    },
                    inputs: vec![g.float_input(&shape)],
                },
            }
        },
    );
}

#[test]
fn rotary_and_its_inverse() {
    property("Rotary", 9, 200, 0.3, &["split", "partial"], |g| {
        let rank = g.rng.usize(3..=4);
        let mut shape = g.shape(rank);
        shape[rank - 1] = 2 * g.rng.usize(1..=g.p);
        Case {
            op: Op::Rotary {
                x: 0,
                base: if g.rng.bool() { 10000.0 } else { 7.0 },
                inverse: g.rng.bool(),
                scaling: None,
            },
            inputs: vec![g.float_input(&shape)],
        }
    });
}

#[test]
fn sum_to() {
    property(
        "SumTo",
        10,
        300,
        0.5,
        &["split", "partial", "replicated"],
        |g| {
            let rank = g.rng.usize(1..=4);
            let shape = g.shape(rank);
            let target = g.broadcast_from(&shape);
            Case {
                op: Op::SumTo {
                    x: 0,
                    shape: target.iter().map(|&s| Dim::new(s as u64)).collect(),
                },
                inputs: vec![g.float_input(&shape)],
            }
        },
    );
}

#[test]
fn act_grad() {
    property("ActGrad", 11, 250, 0.2, &["split", "partial"], |g| {
        let rank = g.rng.usize(0..=3);
        let shape = g.shape(rank);
        let act = [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ][g.rng.usize(..4)];
        Case {
            op: Op::ActGrad { act, x: 0, dy: 1 },
            inputs: vec![g.float_input(&shape), g.float_input(&shape)],
        }
    });
}

#[test]
fn softmax_grad() {
    property("SoftmaxGrad", 12, 250, 0.15, &["split", "partial"], |g| {
        let rank = g.rng.usize(1..=3);
        let shape = g.shape(rank);
        Case {
            op: Op::SoftmaxGrad { y: 0, dy: 1 },
            inputs: vec![g.float_input(&shape), g.float_input(&shape)],
        }
    });
}

#[test]
fn layer_and_rms_norm_grads() {
    property(
        "LayerNormGrad/RmsNormGrad",
        13,
        300,
        0.15,
        &["split", "partial"],
        |g| {
            let rank = g.rng.usize(1..=3);
            let shape = g.shape(rank);
            let mut inputs = vec![g.float_input(&shape), g.float_input(&shape)];
            let weight = g.rng.bool().then(|| {
                let full = g.floats(&shape[rank - 1..]);
                inputs.push(if g.rng.u8(0..4) != 0 {
                    Gen::replicated(full)
                } else {
                    g.input(full)
                });
                2
            });
            let eps = 1e-5;
            let op = if g.rng.bool() {
                Op::LayerNormGrad {
                    x: 0,
                    weight,
                    dy: 1,
                    eps,
                }
            } else {
                Op::RmsNormGrad {
                    x: 0,
                    weight,
                    dy: 1,
                    eps,
                }
            };
            Case { op, inputs }
        },
    );
}

/// An embedding table `[rows, width]` (rows mostly a multiple of p) and ids into it.
fn table_and_ids(g: &mut Gen) -> (Input, Input) {
    let rows = if g.rng.u8(0..4) != 0 {
        g.p * g.rng.usize(1..=3)
    } else {
        g.rng.usize(1..=7)
    };
    let width = g.dim();
    let table = g.float_input(&[rows, width]);
    let rank = g.rng.usize(0..=2);
    let ids_shape = g.shape(rank);
    let ids = g.int_input(&ids_shape, rows);
    (table, ids)
}

#[test]
fn embedding_vocabulary_parallel() {
    property(
        "Embedding",
        14,
        300,
        0.2,
        &["split", "partial", "replicated"],
        |g| {
            let (table, ids) = table_and_ids(g);
            Case {
                op: Op::Embedding { table: 0, ids: 1 },
                inputs: vec![table, ids],
            }
        },
    );
}

#[test]
fn embedding_grad() {
    property("EmbeddingGrad", 15, 300, 0.15, &["split", "partial"], |g| {
        let (table, ids) = table_and_ids(g);
        let mut dy_shape = ids.full.shape.clone();
        dy_shape.push(table.full.shape[1]);
        // The gradient mostly laid out as the forward output would be.
        let dy = g.float_input(&dy_shape);
        Case {
            op: Op::EmbeddingGrad {
                table: 0,
                ids: 1,
                dy: 2,
            },
            inputs: vec![table, ids, dy],
        }
    });
}

#[test]
fn cross_entropy_split_over_tokens() {
    property(
        "CrossEntropy/Grad",
        16,
        300,
        0.1,
        &["partial", "split"],
        |g| {
            let rank = g.rng.usize(2..=4);
            let mut shape = g.shape(rank);
            let shift = g.rng.bool();
            shape[rank - 2] = shape[rank - 2].max(2);
            let vocab = shape[rank - 1].max(2);
            shape[rank - 1] = vocab;
            let classes = g.rng.bool().then(|| g.rng.usize(1..=vocab));
            let logits = g.float_input(&shape);
            // Targets mostly split like the logits (what the batch-split rule needs).
            let mut targets = g.int_input(&shape[..rank - 1], classes.unwrap_or(vocab));
            if let Split(d) = logits.layout {
                if d < rank - 1 && g.rng.u8(0..4) != 0 {
                    targets.layout = Split(d);
                }
            }
            let classes = classes.map(|c| Dim::new(c as u64));
            let op = if g.rng.bool() {
                Op::CrossEntropy {
                    logits: 0,
                    targets: 1,
                    shift,
                    classes,
                }
            } else {
                Op::CrossEntropyGrad {
                    logits: 0,
                    targets: 1,
                    dloss: 2,
                    shift,
                    classes,
                }
            };
            let mut inputs = vec![logits, targets];
            if let Op::CrossEntropyGrad { .. } = op {
                let dloss = g.floats(&[]);
                inputs.push(if g.rng.u8(0..4) != 0 {
                    Gen::replicated(dloss)
                } else {
                    g.input(dloss)
                });
            }
            Case { op, inputs }
        },
    );
}
