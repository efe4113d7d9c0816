//! The partitioner's structure, proved against counts derived by hand from the Megatron paper:
//! which parameters are split and how, how many collectives of what size each layer runs
//! forward and backward (with and without sequence parallelism), parameters per rank, vocabulary
//! padding, divisibility errors, data parallelism, plan files, and the layout verifier's
//! rejections of deliberately wrong plans.

use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{load_model, Graph, LoadOptions, MeshAxis, Op, ScopeId, ValueId};
use ferrotron_partitioner::rules::RuleError;
use ferrotron_partitioner::{
    partition, verify_plan, Layout, PartitionError, PartitionOptions, Plan, PlanError, Report,
};
use std::path::PathBuf;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn options(tp: u64, dp: u64, sp: bool) -> PartitionOptions {
    PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        ..PartitionOptions::default()
    }
}

fn plan(g: &Graph, tp: u64, dp: u64, sp: bool) -> Plan {
    partition(g, &options(tp, dp, sp))
        .unwrap_or_else(|e| panic!("{} at tp={tp} dp={dp} sp={sp}: {e}", g.name))
}

fn dim(g: &Graph, name: &str) -> u64 {
    g.dims
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no dim {name}"))
        .1
}

/// One collective node of a plan, as the golden counts see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Coll {
    layer: Option<usize>,
    backward: bool,
    kind: &'static str,
    axis: MeshAxis,
    /// Elements of the full buffer (all-reduced tensor, gathered result, scattered input).
    numel: u64,
}

/// The layer (index among the graph's layers) each scope belongs to.
fn layer_of(g: &Graph) -> SecondaryMap<ScopeId, Option<usize>> {
    let mut map: SecondaryMap<ScopeId, Option<usize>> = SecondaryMap::new();
    for (i, (s, _)) in g.layers().enumerate() {
        map[s] = Some(i);
    }
    for (s, data) in g.scopes.iter() {
        let mut cur = Some(s);
        let mut parent = data.parent;
        while map[cur.unwrap()].is_none() {
            match parent {
                Some(p) => {
                    cur = Some(p);
                    parent = g.scopes[p].parent;
                }
                None => break,
            }
        }
        map[s] = map[cur.unwrap()];
    }
    map
}

fn collectives(plan: &Plan) -> Vec<Coll> {
    let g = &plan.graph;
    let layers = layer_of(g);
    let numel = |v: ValueId| g.ty(v).shape.numel().unwrap();
    let mut out = Vec::new();
    for (i, &n) in g.order.iter().enumerate() {
        let node = &g.nodes[n];
        let (kind, axis, numel) = match &node.op {
            Op::G { x, axis } | Op::AllReduce { x, axis } => ("all_reduce", *axis, numel(*x)),
            Op::AllGather { axis, .. } => ("all_gather", *axis, numel(node.outputs[0])),
            Op::ReduceScatter { x, axis, .. } => ("reduce_scatter", *axis, numel(*x)),
            _ => continue,
        };
        out.push(Coll {
            layer: node.scope.and_then(|s| layers[s]),
            backward: i >= plan.backward_start,
            kind,
            axis,
            numel,
        });
    }
    out
}

fn count(colls: &[Coll], layer: Option<usize>, backward: bool, kind: &str, numel: u64) -> usize {
    colls
        .iter()
        .filter(|c| {
            c.layer == layer
                && c.backward == backward
                && c.kind == kind
                && c.numel == numel
                && c.axis == MeshAxis::Tp
        })
        .count()
}

fn in_layer(colls: &[Coll], layer: usize, backward: bool) -> Vec<&Coll> {
    colls
        .iter()
        .filter(|c| c.layer == Some(layer) && c.backward == backward && c.axis == MeshAxis::Tp)
        .collect()
}

#[test]
fn gpt_layer_has_two_all_reduces_each_way() {
    // Megatron 1.2B's shapes (hidden 1536, 16 heads) at 3 layers: tp up to 16 divides.
    let g = model("megatron-1.2b.ron", &[("layers", 3)]);
    let (b, s, h) = (dim(&g, "batch"), dim(&g, "seq"), dim(&g, "hidden"));
    for tp in [2, 4, 8] {
        let plan = plan(&g, tp, 1, false);
        let colls = collectives(&plan);
        for layer in 0..3 {
            for backward in [false, true] {
                let here = in_layer(&colls, layer, backward);
                assert_eq!(
                    here.len(),
                    2,
                    "tp={tp} layer {layer} backward={backward}: {here:?}"
                );
                assert!(here
                    .iter()
                    .all(|c| c.kind == "all_reduce" && c.numel == b * s * h));
            }
        }
        // The embedding's g forward; the f in front of the tied output layer backward.
        assert_eq!(count(&colls, None, false, "all_reduce", b * s * h), 1);
        assert_eq!(count(&colls, None, true, "all_reduce", b * s * h), 1);
        // Nothing else communicates, and no node ever gathers the logits.
        assert_eq!(colls.len(), 3 * 4 + 2, "tp={tp}: {colls:?}");

        // The report adds the vocabulary-parallel cross-entropy's per-token all-reduces of its
        // f32 row statistics, in the forward only: the maxima, then the sums of exponentials
        // with the target logits.
        let report = Report::of(&plan);
        let fwd = report.find("all_reduce", "forward", "tp").unwrap();
        assert_eq!(fwd.count, 2 * 3 + 1 + 2);
        assert_eq!(
            fwd.bytes_per_rank,
            (2 * 3 + 1) * b * s * h * 4 + 3 * b * s * 4
        );
        let bwd = report.find("all_reduce", "backward", "tp").unwrap();
        assert_eq!(bwd.count, 2 * 3 + 1);
        assert_eq!(bwd.bytes_per_rank, (2 * 3 + 1) * b * s * h * 4);
        assert!(report.find("all_gather", "forward", "tp").is_none());
    }
}

#[test]
fn sequence_parallel_trades_each_all_reduce_for_a_gather_and_a_scatter() {
    let g = model("megatron-1.2b.ron", &[("layers", 2)]);
    let (b, s, h) = (dim(&g, "batch"), dim(&g, "seq"), dim(&g, "hidden"));
    for tp in [2, 4] {
        let plan = plan(&g, tp, 1, true);
        let colls = collectives(&plan);
        for layer in 0..2 {
            for backward in [false, true] {
                for kind in ["all_gather", "reduce_scatter"] {
                    assert_eq!(
                        count(&colls, Some(layer), backward, kind, b * s * h),
                        2,
                        "tp={tp} layer {layer} backward={backward} {kind}: {colls:?}"
                    );
                }
                let big_all_reduces = count(&colls, Some(layer), backward, "all_reduce", b * s * h);
                assert_eq!(big_all_reduces, 0);
            }
            // The LayerNorms and the row-parallel biases run on sequence shards, so their
            // gradients are summed over the group: 2 norms × (weight, bias) + 2 biases, each of
            // `hidden` elements.
            assert_eq!(count(&colls, Some(layer), true, "all_reduce", h), 6);
            assert_eq!(in_layer(&colls, layer, false).len(), 4);
            assert_eq!(in_layer(&colls, layer, true).len(), 10);
        }
    }
}

#[test]
fn llama_and_bert_layers_also_need_two_all_reduces_each_way() {
    for (file, dims, tp) in [
        ("llama3-8b.ron", vec![("layers", 2)], 8),
        ("tiny-llama.ron", vec![], 2),
        ("bert-large.ron", vec![("layers", 2)], 4),
        ("tiny-bert.ron", vec![], 4),
        ("tiny-gpt.ron", vec![], 4),
    ] {
        let g = model(file, &dims);
        let (b, s, h) = (dim(&g, "batch"), dim(&g, "seq"), dim(&g, "hidden"));
        let plan = plan(&g, tp, 1, false);
        let colls = collectives(&plan);
        for layer in 0..2 {
            for backward in [false, true] {
                let here = in_layer(&colls, layer, backward);
                assert_eq!(
                    here.len(),
                    2,
                    "{file} layer {layer} backward={backward}: {here:?}"
                );
                assert!(here
                    .iter()
                    .all(|c| c.kind == "all_reduce" && c.numel == b * s * h));
            }
        }
    }
}

/// The parameters each model splits, and along which dimension (the rest are replicated).
fn split_params(plan: &Plan) -> Vec<(String, usize, u32)> {
    plan.params
        .iter()
        .filter_map(|p| match p.layout.tp {
            Layout::Split(d) => Some((p.name.clone(), d, p.blocks)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_megatron_strategy_is_found_from_the_dataflow() {
    // GPT-2: fused q|k|v column-parallel in 3 blocks, with its bias; output projections
    // row-parallel with replicated biases (added after g); MLP column then row; the tied
    // embedding vocabulary-parallel; norms and positions replicated.
    let plan = plan(&model("tiny-gpt.ron", &[]), 2, 1, false);
    let mut expected = vec![("wte".to_string(), 0, 1)];
    for l in 0..2 {
        for (suffix, d, blocks) in [
            ("attn.c_attn.weight", 1, 3),
            ("attn.c_attn.bias", 0, 3),
            ("attn.c_proj.weight", 0, 1),
            ("mlp.c_fc.weight", 1, 1),
            ("mlp.c_fc.bias", 0, 1),
            ("mlp.c_proj.weight", 0, 1),
        ] {
            expected.push((format!("h.{l}.{suffix}"), d, blocks));
        }
    }
    assert_eq!(split_params(&plan), expected);

    // Llama ([out, in] weights): q, k, v, gate and up split by output rows, o and down by
    // input columns; untied embedding and output layer both over the vocabulary.
    let plan = plan_of("tiny-llama.ron", 2);
    let names: Vec<(String, usize, u32)> = split_params(&plan);
    let mut expected = vec![("embed_tokens.weight".to_string(), 0, 1)];
    expected.push(("lm_head.weight".to_string(), 0, 1));
    for l in 0..2 {
        for (suffix, d) in [
            ("self_attn.q_proj.weight", 0),
            ("self_attn.k_proj.weight", 0),
            ("self_attn.v_proj.weight", 0),
            ("self_attn.o_proj.weight", 1),
            ("mlp.gate_proj.weight", 0),
            ("mlp.up_proj.weight", 0),
            ("mlp.down_proj.weight", 1),
        ] {
            expected.push((format!("layers.{l}.{suffix}"), d, 1));
        }
    }
    let mut sorted = names.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected);

    // BERT: the MLM head's transform stays replicated (a LayerNorm follows it), the decoder is
    // the tied word embedding over the vocabulary, and its bias is split with it.
    let plan = plan_of("tiny-bert.ron", 2);
    let split = split_params(&plan);
    let transform = split.iter().any(|(n, ..)| n.contains("transform"));
    assert!(!transform, "{split:?}");
    assert!(split
        .iter()
        .any(|(n, d, _)| n == "embeddings.word_embeddings.weight" && *d == 0));
    assert!(
        split
            .iter()
            .any(|(n, d, _)| n == "cls.predictions.bias" && *d == 0),
        "{split:?}"
    );
    assert!(!split
        .iter()
        .any(|(n, ..)| n.contains("position") || n.contains("token_type")));
}

fn plan_of(file: &str, tp: u64) -> Plan {
    plan(&model(file, &[]), tp, 1, false)
}

#[test]
fn parameters_per_rank_are_the_split_ones_over_tp_plus_the_replicated() {
    for (file, tp) in [
        ("tiny-gpt.ron", 4),
        ("tiny-llama.ron", 2),
        ("tiny-bert.ron", 2),
    ] {
        let g = model(file, &[]);
        let plan = plan(&g, tp, 1, false);
        let mut expected = 0;
        for p in &plan.params {
            let n: u64 = p.shape.iter().product();
            expected += match p.layout.tp {
                Layout::Split(_) => n / tp,
                _ => n,
            };
        }
        assert_eq!(Report::of(&plan).per_rank.parameters, expected, "{file}");
        // And the full parameters are the model's, plus only the vocabulary padding.
        let model_total: u64 = plan
            .params
            .iter()
            .map(|p| p.model_shape.iter().product::<u64>())
            .sum();
        assert_eq!(
            model_total,
            ferrotron_ir::count::count_params(&g).total,
            "{file}"
        );
    }
}

#[test]
fn vocabulary_is_padded_to_128_tp_and_the_loss_ignores_the_padding() {
    let g = model("tiny-gpt.ron", &[]);
    for tp in [1, 2, 4] {
        let plan = plan(&g, tp, 1, false);
        let wte = plan.params.iter().find(|p| p.name == "wte").unwrap();
        assert_eq!(wte.model_shape[0], 97);
        assert_eq!(wte.shape[0], 128 * tp);
        assert_eq!(plan.vocab_padding, Some((97, 128 * tp)));
        let classes = plan.graph.nodes.values().find_map(|n| match &n.op {
            Op::CrossEntropy { classes, .. } => Some(classes.clone()),
            _ => None,
        });
        assert_eq!(classes.flatten().map(|d| d.size), Some(97));
    }
    // A configurable multiple, and none needed when it already divides.
    let plan = partition(
        &g,
        &PartitionOptions {
            vocab_multiple: 1,
            ..options(1, 1, false)
        },
    )
    .unwrap();
    assert_eq!(plan.vocab_padding, None);
}

#[test]
fn odd_tensor_parallel_sizes_work_where_the_dims_divide() {
    // hidden 96 with 3 heads: tp = 3 divides heads, the fused q|k|v blocks and ffn.
    let g = model("tiny-gpt.ron", &[("hidden", 96), ("heads", 3)]);
    let (b, s, h) = (dim(&g, "batch"), dim(&g, "seq"), dim(&g, "hidden"));
    let plan = plan(&g, 3, 1, false);
    let colls = collectives(&plan);
    for layer in 0..2 {
        assert_eq!(
            count(&colls, Some(layer), false, "all_reduce", b * s * h),
            2
        );
        assert_eq!(count(&colls, Some(layer), true, "all_reduce", b * s * h), 2);
    }
    assert_eq!(plan.vocab_padding, Some((97, 384)));
    // tp = 1 is the same program with groups of one.
    let one = plan_of("tiny-gpt.ron", 1);
    assert!(Report::of(&one).collectives.is_empty());
}

#[test]
fn indivisible_sizes_name_the_dimension_and_the_valid_choices() {
    let g = model("tiny-llama.ron", &[]);
    let err = partition(&g, &options(3, 1, false)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PartitionError::Indivisible { .. }), "{msg}");
    assert!(msg.contains("valid tp sizes for this model: 1, 2"), "{msg}");
    assert!(msg.contains("layers.0."), "{msg}");

    let err = partition(&g, &options(1, 4, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("batch=2") && err.contains("valid dp sizes for this model: 1, 2"),
        "{err}"
    );

    let err = partition(&g, &options(0, 1, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn data_parallel_gradients_are_all_reduced_over_dp() {
    let g = model("tiny-gpt.ron", &[]);
    let plan = plan(&g, 2, 2, false);
    let colls = collectives(&plan);
    let dp: Vec<&Coll> = colls.iter().filter(|c| c.axis == MeshAxis::Dp).collect();
    assert_eq!(dp.len(), plan.params.len());
    assert!(dp.iter().all(|c| c.backward && c.kind == "all_reduce"));
    // Each gradient ends up laid out like its parameter, and the local batch is halved.
    for &(p, grad) in &plan.grads {
        let value = plan.graph.params[p].value;
        assert_eq!(plan.layouts[grad].tp, plan.layouts[value].tp);
        assert_eq!(plan.layouts[grad].dp, Layout::Replicated);
    }
    let tokens = plan.graph.inputs[0];
    assert_eq!(plan.graph.ty(tokens).shape.size(0), dim(&g, "batch") / 2);
    assert_eq!(plan.layouts[plan.loss].dp, Layout::Partial);
}

#[test]
fn a_plan_round_trips_through_ron() {
    let plan = plan(&model("tiny-gpt.ron", &[]), 2, 1, true);
    let text = plan.to_ron();
    let back = Plan::from_ron(&text, "mem").unwrap();
    assert_eq!(back, plan);

    let err = Plan::from_ron("Plan(model: 3)", "bad.ron")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bad.ron:1:"), "{err}");
}

#[test]
fn rank_slices_of_a_fused_weight_take_each_block() {
    let plan = plan_of("tiny-gpt.ron", 2);
    let qkv = plan
        .params
        .iter()
        .find(|p| p.name == "h.0.attn.c_attn.weight")
        .unwrap();
    let h = 64;
    let (d, ranges) = qkv.ranges(1, 2).unwrap();
    assert_eq!(d, 1);
    assert_eq!(ranges, vec![32..64, h + 32..h + 64, 2 * h + 32..2 * h + 64]);
    let wte = plan.params.iter().find(|p| p.name == "wte").unwrap();
    let (d, ranges) = wte.ranges(1, 2).unwrap();
    assert_eq!((d, ranges.len(), ranges[0].clone()), (0, 1, 128..256));
    let ln = plan
        .params
        .iter()
        .find(|p| p.name == "ln_f.weight")
        .unwrap();
    assert_eq!(ln.ranges(0, 2), None);
}

#[test]
fn pins_are_honoured_with_the_communication_they_need() {
    let g = model("tiny-gpt.ron", &[]);
    // Keep the first MLP replicated: its two all-reduces disappear, the rest stays.
    let mut opts = options(2, 1, false);
    opts.pins = vec![
        ("h.0.mlp.c_fc.weight".into(), Layout::Replicated),
        ("h.0.mlp.c_proj.weight".into(), Layout::Replicated),
    ];
    let plan = partition(&g, &opts).unwrap();
    let colls = collectives(&plan);
    assert_eq!(in_layer(&colls, 0, false).len(), 1, "{colls:?}");
    assert_eq!(in_layer(&colls, 1, false).len(), 2);
    // A norm weight pinned split is gathered before use.
    opts.pins = vec![("h.1.ln_2.weight".into(), Layout::Split(0))];
    let plan = partition(&g, &opts).unwrap();
    assert!(collectives(&plan)
        .iter()
        .any(|c| c.kind == "all_gather" && c.layer == Some(1) && !c.backward));
    // Unknown names get a suggestion.
    opts.pins = vec![("h.1.ln_2.wieght".into(), Layout::Split(0))];
    let err = partition(&g, &opts).unwrap_err().to_string();
    assert!(err.contains("did you mean `h.1.ln_2.weight`"), "{err}");
}

// ---- The layout verifier rejects deliberately wrong plans, naming the node. ----

/// Replaces input `old` of node `node` by `new`.
fn rewire(plan: &mut Plan, node: &str, old: &str, new: &str) {
    let g = &mut plan.graph;
    let old = g.value_named(old).unwrap();
    let new = g.value_named(new).unwrap();
    let n = g.node_named(node).unwrap();
    g.nodes[n].op = g.nodes[n]
        .op
        .try_map::<ValueId, ferrotron_ir::Dim, (), _, _>(
            |&v| Ok(if v == old { new } else { v }),
            |d| Ok(d.clone()),
        )
        .unwrap();
}

#[test]
fn verifier_rejects_a_partial_sum_reaching_a_nonlinear_op() {
    // A two-matmul MLP with a GeLU after the row-parallel product: the plan all-reduces first.
    let src = r#"Model(
        name: "mlp", dims: {"b": 2, "s": 4, "h": 8, "f": 16, "v": 8},
        inputs: {"tokens": Input(shape: ["b", "s"], dtype: I64)},
        params: {
            "emb": Param(shape: ["v", "h"], init: Normal(std: 0.02)),
            "w1": Param(shape: ["h", "f"], init: Normal(std: 0.02)),
            "w2": Param(shape: ["f", "h"], init: Normal(std: 0.02)),
            "out": Param(shape: ["h", "v"], init: Normal(std: 0.02)),
        },
        body: {
            "x": Embedding(table: "emb", ids: "tokens"),
            "up": MatMul(a: "x", b: "w1"),
            "act": Gelu("up"),
            "down": MatMul(a: "act", b: "w2"),
            "act2": Gelu("down"),
            "logits": MatMul(a: "act2", b: "out"),
            "loss": CrossEntropy(logits: "logits", targets: "tokens"),
        },
        outputs: ["loss"],
    )"#;
    let g = ferrotron_ir::parse_model(src, "mlp.ron", &LoadOptions::default()).unwrap();
    let mut plan = plan(&g, 2, 1, false);
    verify_plan(&plan).unwrap();
    rewire(&mut plan, "act2", "down.g", "down");
    match verify_plan(&plan) {
        Err(PlanError::Rule { node, error }) => {
            assert_eq!(node, "act2");
            assert!(
                matches!(error, RuleError::PartialIntoNonlinear { .. }),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn verifier_rejects_a_normalization_over_a_split_dimension() {
    // At tp = 4 the MLP's split activation [b, s, 4h/4] has the residual stream's local shape.
    let mut plan = plan_of("tiny-gpt.ron", 4);
    rewire(&mut plan, "h.1.ln1", "h.0.y", "h.0.fc");
    match verify_plan(&plan) {
        Err(PlanError::Rule { node, error }) => {
            assert_eq!(node, "h.1.ln1");
            assert!(matches!(error, RuleError::AlongSplitDim { .. }), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn verifier_rejects_replicated_logits_for_the_vocabulary_parallel_loss() {
    let mut plan = plan_of("tiny-gpt.ron", 2);
    let logits = plan.graph.value_named("logits").unwrap();
    plan.layouts[logits].tp = Layout::Replicated;
    let err = verify_plan(&plan).unwrap_err();
    assert!(
        matches!(&err, PlanError::Layout { value, .. } if value == "logits"),
        "{err}"
    );
}

#[test]
fn verifier_rejects_mismatched_shards_of_a_fused_weight() {
    // The fused q|k|v bias sliced contiguously while its weight is sliced per block.
    let mut plan = plan_of("tiny-gpt.ron", 2);
    let bias = plan
        .params
        .iter()
        .position(|p| p.name == "h.0.attn.c_attn.bias")
        .unwrap();
    plan.params[bias].blocks = 1;
    match verify_plan(&plan) {
        Err(PlanError::Rule { node, error }) => {
            assert_eq!(node, "h.0.qkv");
            assert!(
                matches!(error, RuleError::MismatchedBlocks { .. }),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The shard itself must describe the value: a wrong layout is named by parameter.
    let mut plan = plan_of("tiny-gpt.ron", 2);
    plan.params[0].layout.tp = Layout::Replicated;
    let err = verify_plan(&plan).unwrap_err().to_string();
    assert!(err.contains(&plan.params[0].name), "{err}");
}

#[test]
fn a_model_file_pin_is_honoured_and_the_options_override_it() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/gpt2-small.ron"
    ))
    .unwrap()
    .replace(
        r#""mlp.c_fc.weight": Param(shape: ["hidden", "ffn"], init: Normal(std: 0.02)),"#,
        r#""mlp.c_fc.weight": Param(shape: ["hidden", "ffn"], init: Normal(std: 0.02), layout: Replicated),"#,
    );
    assert!(src.contains("layout: Replicated"));
    let opts = LoadOptions {
        overrides: vec![
            ("layers".into(), 2),
            ("hidden".into(), 64),
            ("heads".into(), 4),
        ],
        ..LoadOptions::default()
    };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/pinned.ron");
    let g = ferrotron_ir::parse_model(&src, path, &opts).unwrap();
    let p = plan(&g, 2, 1, false);
    let fc = |p: &Plan, l: usize| {
        let name = format!("h.{l}.mlp.c_fc.weight");
        p.params.iter().find(|s| s.name == name).unwrap().layout.tp
    };
    assert_eq!(
        (fc(&p, 0), fc(&p, 1)),
        (Layout::Replicated, Layout::Replicated)
    );
    // Column-splitting the MLP's second GEMM alone would need its output gathered before the
    // residual add, so the whole MLP stays replicated: one all-reduce per layer, for attention.
    verify_plan(&p).unwrap();
    let colls = collectives(&p);
    assert_eq!(in_layer(&colls, 0, false).len(), 1, "{colls:?}");
    let c_proj = p
        .params
        .iter()
        .find(|s| s.name == "h.0.mlp.c_proj.weight")
        .unwrap();
    assert_eq!(c_proj.layout.tp, Layout::Replicated);
    let mut opts = options(2, 1, false);
    opts.pins = vec![("h.1.mlp.c_fc.weight".into(), Layout::Split(1))];
    let p = partition(&g, &opts).unwrap();
    assert_eq!(
        (fc(&p, 0), fc(&p, 1)),
        (Layout::Replicated, Layout::Split(1))
    );
}

#[test]
fn fewer_key_value_heads_than_ranks_keeps_them_whole_and_slices_per_rank() {
    // Llama 3 8B has 8 key/value heads; at tp = 16 each pair of ranks shares one.
    let g = model("llama3-8b.ron", &[("layers", 2)]);
    let (b, s, h) = (dim(&g, "batch"), dim(&g, "seq"), dim(&g, "hidden"));
    let plan = plan(&g, 16, 1, false);
    let layout = |name: &str| {
        plan.params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name}"))
            .layout
            .tp
    };
    assert_eq!(layout("layers.0.self_attn.q_proj.weight"), Layout::Split(0));
    assert_eq!(
        layout("layers.0.self_attn.k_proj.weight"),
        Layout::Replicated
    );
    assert_eq!(
        layout("layers.0.self_attn.v_proj.weight"),
        Layout::Replicated
    );
    assert_eq!(layout("layers.0.mlp.down_proj.weight"), Layout::Split(1));
    let colls = collectives(&plan);
    for layer in 0..2 {
        assert_eq!(
            count(&colls, Some(layer), false, "all_reduce", b * s * h),
            2
        );
        assert_eq!(in_layer(&colls, layer, false).len(), 2);
        // Backward: the two f's, and the keys' and values' gradients gathered from the ranks
        // that used their slices.
        assert_eq!(count(&colls, Some(layer), true, "all_reduce", b * s * h), 2);
        assert_eq!(count(&colls, Some(layer), true, "all_gather", b * s * h), 2);
    }
    // Query heads still have to divide: 64 ranks for 32 heads is refused, with the sizes that
    // work (16 and 32 included, though the 8 key/value heads do not divide them).
    let err = partition(&g, &options(64, 1, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("valid tp sizes for this model: 1, 2, 4, 8, 16, 32"),
        "{err}"
    );
    // GPT's heads are not repeated for anyone, so too few of them is an error, not a fallback.
    let gpt = model("tiny-gpt.ron", &[]);
    let err = partition(&gpt, &options(8, 1, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("heads=4"), "{err}");
}

/// Backward collectives are issued as soon as their input exists: f's backward all-reduce of dX
/// comes right after the dX matmul, before the weight-gradient matmul that does not need it (so
/// a runtime with a communication stream overlaps the two, as Megatron does), and the
/// data-parallel gradient all-reduces follow their gradients instead of waiting for the end.
#[test]
fn backward_collectives_are_issued_as_soon_as_their_input_is_ready() {
    let g = model("tiny-gpt.ron", &[]);
    for (tp, dp, sp) in [(2, 1, false), (2, 2, false), (4, 2, true)] {
        let plan = plan(&g, tp, dp, sp);
        let pg = &plan.graph;
        let position: std::collections::HashMap<_, _> =
            pg.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let is_collective = |op: &Op<ValueId, ferrotron_ir::Dim>| {
            matches!(
                op,
                Op::AllReduce { .. }
                    | Op::AllGather { .. }
                    | Op::ReduceScatter { .. }
                    | Op::G { .. }
            )
        };
        let mut checked = 0;
        for (i, &n) in pg.order.iter().enumerate().skip(plan.backward_start) {
            let node = &pg.nodes[n];
            if !is_collective(&node.op) {
                continue;
            }
            let producer = node
                .op
                .inputs()
                .into_iter()
                .filter_map(|v| match pg.values[*v].def {
                    ferrotron_ir::ValueDef::Node { node, .. } => Some(position[&node]),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
                .max(plan.backward_start);
            // Only other collectives may stand between the producer and the collective.
            for &m in &pg.order[producer + 1..i] {
                assert!(
                    is_collective(&pg.nodes[m].op),
                    "tp={tp} dp={dp} sp={sp}: `{}` waits behind `{}`",
                    node.name,
                    pg.nodes[m].name
                );
            }
            checked += 1;
        }
        assert!(
            checked > 4,
            "tp={tp} dp={dp}: only {checked} backward collectives"
        );
    }
}

/// Megatron's count of tensor-parallel all-reduces for GPT-2 small at tp = 4: backward `2L + 1`
/// (each layer's two f, the output layer's f; the vocabulary-parallel loss's gradient reuses the
/// row statistics its forward reduced), forward `2L + 1` (each layer's two g, the
/// vocabulary-parallel embedding's) and the loss's two (the row maxima, then the sums of
/// exponentials with the target logits in one call).
#[test]
fn gpt2_small_at_tp_4_has_megatrons_all_reduce_count() {
    let g = model("gpt2-small.ron", &[]);
    let layers = dim(&g, "layers");
    let report = Report::of(&plan(&g, 4, 1, false));
    let count = |direction: &str| {
        report
            .collectives
            .iter()
            .filter(|c| c.kind == "all_reduce" && c.axis == "tp" && c.direction == direction)
            .map(|c| c.count)
            .sum::<u64>()
    };
    assert_eq!(layers, 12);
    assert_eq!(count("backward"), 2 * layers + 1);
    assert_eq!(count("forward"), 2 * layers + 1 + 2);
}
