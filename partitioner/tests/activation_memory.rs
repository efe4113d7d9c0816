//! Activation memory per layer, to the byte, against Korthikanti et al. (2022), *Reducing
//! Activation Recomputation in Large Transformer Models*, section 4: a GPT-2 layer partitioned at
//! tp = 1, 2, 4, with and without sequence parallelism, with no, selective and full
//! recomputation; its saved activations ([`layer_activations`]: the forward values made inside
//! the layer that the backward pass reads) listed value by value and summed.
//!
//! Both sides are priced at 2 bytes per value, the paper's 16-bit activations (the model files
//! are `f32`, so a plan's own bytes are twice these). `s` sequence, `b` micro-batch, `h` hidden,
//! `a` heads, `t` tensor-parallel degree; under sequence parallelism the residual stream is
//! split `t` ways along the sequence.
//!
//! | configuration | the paper | ferrotron |
//! |---|---|---|
//! | none | `sbh(10 + 24/t) + 5as²b/t` | `sbh(12 + 24/t) + 4as²b/t` |
//! | none, SP | `34sbh/t + 5as²b/t` | `sbh(4 + 32/t) + 4as²b/t` |
//! | selective | `sbh(10 + 24/t)` | `sbh(12 + 24/t)` |
//! | selective, SP | `34sbh/t` | `sbh(4 + 32/t)` |
//! | full | `2sbh` | `2sbh` |
//! | full, SP | `2sbh` | `2sbh/t` |
//!
//! At t = 1 the first row is the paper's `sbh(34 + 5as/h)` against ferrotron's `sbh(36 + 4as/h)`.
//! Term by term (bytes; "same" means ferrotron keeps the paper's value at the paper's size):
//!
//! | the paper's term | the paper | ferrotron | why |
//! |---|---|---|---|
//! | LayerNorm 1 input | `2sbh` | same: the previous layer's `y` | LayerNorm's backward reads its input and recomputes the statistics; the layer's input is made, and counted, by the layer before, and this layer counts its own output `y` (the next one's input) instead: the same size |
//! | LayerNorm 2 input | `2sbh` | same: `res1` | as above |
//! | QKV matmul input (LayerNorm 1 output) | `2sbh`; `2sbh/t` with SP | `ln1.f`: `2sbh`; with SP `ln1.all_gather_f`, `2sbh` | with SP, Megatron keeps its `1/t` sequence shard and all-gathers it again in the backward; ferrotron keeps the gathered value (no second all-gather): `+2sbh(1 − 1/t)` |
//! | Q and K (for `QKᵀ`) | `4sbh/t` | same: `q_t`, `k_t` | |
//! | V (for the context matmul) | `2sbh/t` | same: `v_t` | |
//! | `QKᵀ` scores | not kept | not kept | the scaling keeps nothing, the softmax's backward reads its output |
//! | softmax output | `2as²b/t` | same: `probs`; recomputed under selective | |
//! | attention dropout mask | `as²b/t` (1 byte) | not kept: `−as²b/t` | ferrotron's dropout draws its mask from the element's index in the full tensor (and a seed), so the backward regenerates it |
//! | attention dropout output | `2as²b/t`; recomputed under selective | same: `probs_drop`; recomputed under selective | selective recomputation remakes the core from `QKᵀ` through the context matmul, whose backward (`dV = Pᵀ·dctx`) then reads the remade dropout output |
//! | output projection input | `2sbh/t` | same: `ctx_flat` | |
//! | attention-output dropout mask | `sbh` (1 byte); `sbh/t` with SP | `attn_drop`, the dropout's output: `2sbh` (`2sbh/t`) | no mask is kept, but the dropout's gradient names its forward output (for its shape and the shard's place in the full tensor, from which it regenerates the mask), so that output is read by the backward and kept (the runtime frees a value after its last reader, so it holds it too): 2 bytes per value where the paper keeps 1 |
//! | MLP first matmul input (LayerNorm 2 output) | `2sbh`; `2sbh/t` with SP | `ln2.f` / `ln2.all_gather_f`: `2sbh` | as for the QKV input |
//! | GELU input | `8sbh/t` | same: `fc` | the GELU's backward reads its input |
//! | MLP second matmul input | `8sbh/t` | same: `act` | |
//! | MLP dropout mask | `sbh` (1 byte); `sbh/t` with SP | `mlp_drop`: `2sbh` (`2sbh/t`) | as for the attention-output dropout |
//! | full recomputation: the layer input | `2sbh` | `y`: `2sbh`; `2sbh/t` with SP | under SP the value crossing layers is itself sequence-split; nothing else of the layer is kept |
//!
//! So ferrotron = the paper `+ 2sbh/t_s` (residual-branch dropout outputs instead of masks,
//! `t_s` = t with SP, 1 without) `− as²b/t` (no attention mask; without recomputation)
//! `+ 4sbh(1 − 1/t)` (the two
//! gathered LayerNorm outputs under SP), and under full recomputation with SP `− 2sbh(1 − 1/t)`.
//! [`reconciles_with_the_paper`] checks that sum for every configuration. The value lists are
//! exact, so anything that changes what the backward keeps fails here.

use ferrotron_ir::{load_model, DType, Graph, LoadOptions, Op};
use ferrotron_partitioner::report::{layer_activation_bytes, layer_activations, saved_activations};
use ferrotron_partitioner::{partition, PartitionOptions, Plan, Recompute, Report};
use std::path::PathBuf;

/// `(model file, dimension overrides)`: GPT-2 small as released, two layers; and an odd small
/// one (`as/h` = 1.2) where no term's coefficient can stand in for another's.
const MODELS: [(&str, &[(&str, u64)]); 2] = [
    ("gpt2-small.ron", &[("layers", 2)]),
    (
        "gpt2-small.ron",
        &[
            ("layers", 2),
            ("hidden", 40),
            ("heads", 4),
            ("seq", 12),
            ("positions", 12),
            ("batch", 3),
            ("vocab", 97),
        ],
    ),
];

const RECOMPUTE: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

/// Bytes per value in both formulas.
const BYTES: u64 = 2;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The formulas' letters.
#[derive(Clone, Copy, Debug)]
struct Dims {
    s: u64,
    b: u64,
    h: u64,
    a: u64,
}

impl Dims {
    fn of(g: &Graph) -> Dims {
        let dim = |name: &str| {
            g.dims
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no dim {name}"))
                .1
        };
        Dims {
            s: dim("seq"),
            b: dim("batch"),
            h: dim("hidden"),
            a: dim("heads"),
        }
    }

    fn sbh(self) -> u64 {
        self.s * self.b * self.h
    }

    /// `as²b`: one attention-probability tensor over all heads.
    fn as2b(self) -> u64 {
        self.a * self.s * self.s * self.b
    }
}

/// One configuration of the tables.
#[derive(Clone, Copy, Debug)]
struct Config {
    t: u64,
    sp: bool,
    recompute: Recompute,
}

impl Config {
    fn all() -> impl Iterator<Item = Config> {
        RECOMPUTE.into_iter().flat_map(|recompute| {
            [false, true].into_iter().flat_map(move |sp| {
                [1, 2, 4]
                    .into_iter()
                    .map(move |t| Config { t, sp, recompute })
            })
        })
    }

    /// The sequence split of the residual stream.
    fn ts(self) -> u64 {
        if self.sp {
            self.t
        } else {
            1
        }
    }

    fn plan(self, g: &Graph) -> Plan {
        let opts = PartitionOptions {
            tp: self.t,
            sequence_parallel: self.sp,
            recompute: self.recompute,
            ..PartitionOptions::default()
        };
        partition(g, &opts).unwrap_or_else(|e| panic!("{} {self:?}: {e}", g.name))
    }
}

/// `x / t`, which must be exact.
fn over(x: u64, t: u64) -> u64 {
    assert_eq!(x % t, 0, "{x} is not divisible by {t}");
    x / t
}

/// The values ferrotron keeps for one layer (named as in the layer), with their elements on a
/// rank: the second column of the module's term table, value by value.
fn ferrotron_values(d: Dims, c: Config) -> Vec<(&'static str, u64)> {
    let (sbh, as2b, t, ts) = (d.sbh(), d.as2b(), c.t, c.ts());
    if c.recompute == Recompute::Full {
        return vec![("y", over(sbh, ts))];
    }
    let (ln1_out, ln2_out) = if c.sp {
        ("ln1.all_gather_f", "ln2.all_gather_f")
    } else {
        ("ln1.f", "ln2.f")
    };
    let mut kept = vec![
        (ln1_out, sbh),
        ("q_t", over(sbh, t)),
        ("k_t", over(sbh, t)),
        ("v_t", over(sbh, t)),
    ];
    if c.recompute == Recompute::None {
        kept.push(("probs", over(as2b, t)));
        kept.push(("probs_drop", over(as2b, t)));
    }
    kept.extend([
        ("ctx_flat", over(sbh, t)),
        ("attn_drop", over(sbh, ts)),
        ("res1", over(sbh, ts)),
        (ln2_out, sbh),
        ("fc", over(4 * sbh, t)),
        ("act", over(4 * sbh, t)),
        ("mlp_drop", over(sbh, ts)),
        ("y", over(sbh, ts)),
    ]);
    kept
}

/// Ferrotron's closed form, bytes at [`BYTES`] per value: the third column of the module's
/// first table.
fn ferrotron_formula(d: Dims, c: Config) -> u64 {
    let (sbh, as2b, t) = (d.sbh(), d.as2b(), c.t);
    let per_value = match (c.recompute, c.sp) {
        (Recompute::Full, _) => over(sbh, c.ts()),
        // sbh(6 + 12/t) + 2as²b/t values: sbh(12 + 24/t) + 4as²b/t bytes.
        (Recompute::None, false) => 6 * sbh + over(12 * sbh, t) + over(2 * as2b, t),
        // sbh(2 + 16/t) + 2as²b/t values: sbh(4 + 32/t) + 4as²b/t bytes.
        (Recompute::None, true) => 2 * sbh + over(16 * sbh, t) + over(2 * as2b, t),
        // sbh(6 + 12/t) values: sbh(12 + 24/t) bytes.
        (Recompute::Selective, false) => 6 * sbh + over(12 * sbh, t),
        // sbh(2 + 16/t) values: sbh(4 + 32/t) bytes.
        (Recompute::Selective, true) => 2 * sbh + over(16 * sbh, t),
    };
    BYTES * per_value
}

/// Korthikanti et al.'s per-layer activation bytes (16-bit values, 1-byte dropout masks).
fn paper_formula(d: Dims, c: Config) -> u64 {
    let (sbh, as2b, t) = (d.sbh(), d.as2b(), c.t);
    match (c.recompute, c.sp) {
        (Recompute::Full, _) => 2 * sbh,
        // sbh(10 + 24/t + 5as/(ht)) (t = 1: sbh(34 + 5as/h)).
        (Recompute::None, false) => 10 * sbh + over(24 * sbh, t) + over(5 * as2b, t),
        // sbh/t · (34 + 5as/h).
        (Recompute::None, true) => over(34 * sbh, t) + over(5 * as2b, t),
        // sbh(10 + 24/t).
        (Recompute::Selective, false) => 10 * sbh + over(24 * sbh, t),
        // sbh · 34/t.
        (Recompute::Selective, true) => over(34 * sbh, t),
    }
}

/// Ferrotron minus the paper, one named term at a time (the module's last paragraph).
fn differences(d: Dims, c: Config) -> Vec<(&'static str, i64)> {
    let (sbh, as2b, t) = (d.sbh() as i64, d.as2b() as i64, c.t as i64);
    let ts = c.ts() as i64;
    let mut terms = Vec::new();
    if c.recompute == Recompute::Full {
        if c.sp {
            terms.push((
                "the layer input kept sequence-split",
                -2 * sbh + 2 * sbh / ts,
            ));
        }
        return terms;
    }
    terms.push((
        "two residual-branch dropout outputs (2 bytes) instead of masks (1 byte)",
        2 * sbh / ts,
    ));
    if c.recompute == Recompute::None {
        terms.push(("no attention dropout mask", -as2b / t));
    }
    if c.sp {
        terms.push((
            "the two LayerNorm outputs kept gathered",
            4 * sbh - 4 * sbh / t,
        ));
    }
    terms
}

/// Every layer of `plan` against [`ferrotron_values`] and [`ferrotron_formula`]; `Err` says
/// what differs.
fn check(plan: &Plan, d: Dims, c: Config) -> Result<(), String> {
    let g = &plan.graph;
    let mut expected: Vec<(String, u64)> = ferrotron_values(d, c)
        .into_iter()
        .map(|(n, e)| (n.to_owned(), e))
        .collect();
    expected.sort();
    for (layer, scope) in g.layers() {
        let prefix = format!("{}.", scope.name);
        let mut kept: Vec<(String, u64)> = layer_activations(plan, layer)
            .into_iter()
            .map(|v| {
                let name = &g.values[v].name;
                let name = name.strip_prefix(&prefix).unwrap_or(name).to_owned();
                (name, g.ty(v).shape.numel().unwrap_or(0))
            })
            .collect();
        kept.sort();
        if kept != expected {
            return Err(format!(
                "{c:?}, layer {}: kept {kept:?}, expected {expected:?}",
                scope.name
            ));
        }
        let bytes = layer_activation_bytes(plan, layer, DType::BF16);
        if bytes != ferrotron_formula(d, c) {
            return Err(format!(
                "{c:?}, layer {}: {bytes} bytes, the formula says {}",
                scope.name,
                ferrotron_formula(d, c)
            ));
        }
    }
    Ok(())
}

#[test]
fn each_layer_keeps_exactly_the_values_of_the_formula() {
    for (file, dims) in MODELS {
        let g = model(file, dims);
        let d = Dims::of(&g);
        for c in Config::all() {
            let plan = c.plan(&g);
            assert_eq!(plan.graph.layers().count(), 2);
            if let Err(e) = check(&plan, d, c) {
                panic!("{d:?}: {e}");
            }
            // The plan's own `f32` values are twice the 16-bit price.
            for (layer, _) in plan.graph.layers() {
                assert_eq!(
                    layer_activation_bytes(&plan, layer, DType::F32),
                    2 * layer_activation_bytes(&plan, layer, DType::BF16)
                );
            }
        }
    }
}

#[test]
fn reconciles_with_the_paper() {
    for (file, dims) in MODELS {
        let d = Dims::of(&model(file, dims));
        for c in Config::all() {
            let paper = paper_formula(d, c) as i64;
            let terms = differences(d, c);
            let ours = ferrotron_formula(d, c) as i64;
            assert_eq!(
                paper + terms.iter().map(|(_, x)| x).sum::<i64>(),
                ours,
                "{d:?} {c:?}: the paper's {paper} bytes and {terms:?} do not make ferrotron's {ours}"
            );
        }
    }
}

/// The paper's headline reductions hold in ferrotron's counts too, where its terms say they
/// should: sequence parallelism divides everything but the gathered LayerNorm outputs by t, and
/// selective recomputation removes both `as²b` values (the softmax and dropout outputs).
#[test]
fn at_gpt2_small_the_paper_and_ferrotron_differ_only_by_the_named_terms() {
    let (file, dims) = MODELS[0];
    let d = Dims::of(&model(file, dims));
    let c = |t, sp, recompute| Config { t, sp, recompute };
    // No parallelism: the paper's sbh(34 + 5as/h) against sbh(36 + 4as/h).
    assert_eq!(
        paper_formula(d, c(1, false, Recompute::None)),
        d.sbh() * 34 + 5 * d.as2b()
    );
    assert_eq!(
        ferrotron_formula(d, c(1, false, Recompute::None)),
        d.sbh() * 36 + 4 * d.as2b()
    );
    // At t = 1 sequence parallelism changes nothing, in either.
    for r in RECOMPUTE {
        assert_eq!(
            ferrotron_formula(d, c(1, true, r)),
            ferrotron_formula(d, c(1, false, r))
        );
    }
    // Selective recomputation removes 4as²b/t bytes here (the softmax and dropout outputs),
    // 5as²b/t in the paper (which keeps a 1-byte mask too).
    for t in [1, 2, 4] {
        let none = ferrotron_formula(d, c(t, false, Recompute::None));
        let selective = ferrotron_formula(d, c(t, false, Recompute::Selective));
        assert_eq!(none - selective, over(4 * d.as2b(), t));
    }
}

/// Under full recomputation a layer keeps only the value crossing into the next layer (the
/// next layer's input), and the next layer's backward reads that value itself.
#[test]
fn full_recomputation_keeps_only_the_layer_input() {
    let (file, dims) = MODELS[1];
    let g = model(file, dims);
    let d = Dims::of(&g);
    for t in [1, 2, 4] {
        for sp in [false, true] {
            let c = Config {
                t,
                sp,
                recompute: Recompute::Full,
            };
            let plan = c.plan(&g);
            let pg = &plan.graph;
            let layers: Vec<_> = pg.layers().collect();
            let kept = layer_activations(&plan, layers[0].0);
            assert_eq!(kept.len(), 1);
            assert_eq!(pg.values[kept[0]].name, "h.0.y");
            assert_eq!(
                pg.ty(kept[0]).shape.numel(),
                Some(over(d.sbh(), c.ts())),
                "{c:?}"
            );
            // Layer 1's input is layer 0's output: read in the backward by layer 1's
            // recomputation, and by nothing of layer 0.
            let input = kept[0];
            let reader = pg.order[plan.backward_start..]
                .iter()
                .find(|&&n| pg.nodes[n].op.inputs().contains(&&input))
                .expect("the layer input is read by the backward");
            let scope = pg.nodes[*reader].scope.expect("a layer node");
            assert_eq!(pg.scopes[scope].name, "h.1", "{c:?}");
        }
    }
}

/// The per-layer lists are the report's own count: every saved value of the plan, at its own
/// dtype, is what `Report::of` gives as the rank's activations.
#[test]
fn the_layers_are_part_of_the_report_total() {
    let (file, dims) = MODELS[1];
    let g = model(file, dims);
    for c in Config::all() {
        let plan = c.plan(&g);
        let pg = &plan.graph;
        let saved = saved_activations(&plan);
        let total: u64 = saved.iter().map(|&v| pg.ty(v).size_bytes()).sum();
        assert_eq!(Report::of(&plan).per_rank.activations_bytes, total, "{c:?}");
        let in_layers: u64 = pg
            .layers()
            .map(|(l, _)| layer_activation_bytes(&plan, l, DType::F32))
            .sum();
        assert!(
            in_layers < total,
            "{c:?}: the embedding and head keep values too"
        );
    }
}

/// The check fails when the backward keeps something else: undoing the selective
/// recomputation of one softmax (its gradient reading the forward's output again) adds that
/// output, `as²b/t` values, to the layer.
#[test]
fn a_change_in_what_the_backward_keeps_fails_the_check() {
    let (file, dims) = MODELS[1];
    let g = model(file, dims);
    let d = Dims::of(&g);
    let c = Config {
        t: 2,
        sp: false,
        recompute: Recompute::Selective,
    };
    let mut plan = c.plan(&g);
    assert_eq!(check(&plan, d, c), Ok(()));
    let pg = &mut plan.graph;
    let probs = pg.value_named("h.1.probs").expect("layer 1's softmax");
    let recomputed = pg
        .value_named("recompute.h.1.probs")
        .expect("its recomputed copy");
    let grad = pg.order[plan.backward_start..]
        .iter()
        .copied()
        .find(|&n| matches!(pg.nodes[n].op, Op::SoftmaxGrad { y, .. } if y == recomputed))
        .expect("the softmax's gradient reads the copy");
    if let Op::SoftmaxGrad { y, .. } = &mut pg.nodes[grad].op {
        *y = probs;
    }
    let layer = plan.graph.layers().nth(1).expect("two layers").0;
    assert_eq!(
        layer_activation_bytes(&plan, layer, DType::BF16),
        ferrotron_formula(d, c) + BYTES * over(d.as2b(), c.t)
    );
    assert!(check(&plan, d, c).is_err());
}
