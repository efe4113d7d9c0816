//! The CPU runtime computes what the model computes: for the tiny GPT, BERT and Llama-style
//! models, every plan (tp = 1, 2, 3, 4, 8, dp = 2, with and without sequence parallelism) run on
//! threads gives the unpartitioned model's loss, outputs and every gradient within the f32
//! tolerances; the unpartitioned run itself matches the f64 reference evaluator; and a broken
//! plan is caught with the first diverging op named.

use ferrotron_cpu::Cpu;
use ferrotron_exec::init::{random_batch, test_params};
use ferrotron_exec::verify::{self, reference_plan, rel_error, rel_error_floor, Tolerances};
use ferrotron_exec::{run, RunOptions, Tensor};
use ferrotron_ir::reference::{self, eval_graph};
use ferrotron_ir::{backward, load_model, Graph, LoadOptions, Op, ValueId};
use ferrotron_partitioner::Plan;
use ferrotron_partitioner::{partition, PartitionOptions};
use std::collections::HashMap;

/// `plan` and `reference` run on the CPU on the same weights and batch, compared.
fn compare(
    plan: &Plan,
    reference: &Plan,
    params: &HashMap<String, Tensor>,
    batch: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<verify::Verification, verify::VerifyError> {
    let ours = run(Cpu::default(), plan, params, batch, opts)?;
    let theirs = run(Cpu::default(), reference, params, batch, opts)?;
    verify::compare(&ours, &theirs, params, batch, opts, Tolerances::F32)
}
use std::path::PathBuf;

fn model(name: &str, dims: &[(&str, u64)]) -> Graph {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/")).join(name);
    let opts = LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn opts(tp: u64, dp: u64, sp: bool) -> PartitionOptions {
    PartitionOptions {
        tp,
        dp,
        sequence_parallel: sp,
        ..PartitionOptions::default()
    }
}

/// Partitions, runs and compares with the unpartitioned model; panics with the comparison on a
/// mismatch.
fn check(g: &Graph, o: PartitionOptions) {
    let cfg = format!(
        "{} tp={} dp={} sp={}",
        g.name, o.tp, o.dp, o.sequence_parallel
    );
    let plan = partition(g, &o).unwrap_or_else(|e| panic!("{cfg}: {e}"));
    let reference = reference_plan(g).unwrap();
    let params = test_params(g, 7);
    let batch = random_batch(g, 7);
    let v = compare(&plan, &reference, &params, &batch, &RunOptions::default())
        .unwrap_or_else(|e| panic!("{cfg}: {e}"));
    assert!(
        v.passed(),
        "{cfg}: {:#?}",
        v.entries.iter().filter(|e| !e.ok()).collect::<Vec<_>>()
    );
    assert!(v.entries.len() > 3, "{cfg}: compared too little");
    eprintln!("{cfg}: max relative error {:.2e}", v.max_rel_error());
}

#[test]
fn tiny_gpt_at_every_degree() {
    let g = model("tiny-gpt.ron", &[("batch", 4)]);
    for tp in [1, 2, 4] {
        check(&g, opts(tp, 1, false));
    }
    check(&g, opts(2, 2, false));
    check(&g, opts(2, 1, true));
    check(&g, opts(4, 2, true));
    // tp = 8 needs 8 heads; tp = 3 needs heads and hidden divisible by 3.
    check(&model("tiny-gpt.ron", &[("heads", 8)]), opts(8, 1, false));
    let odd = model("tiny-gpt.ron", &[("hidden", 96), ("heads", 3), ("seq", 12)]);
    check(&odd, opts(3, 1, false));
    check(&odd, opts(3, 1, true));
}

#[test]
fn tiny_bert_and_llama() {
    let bert = model("tiny-bert.ron", &[("batch", 4)]);
    for (tp, dp, sp) in [(1, 1, false), (2, 1, false), (4, 2, false), (2, 2, true)] {
        check(&bert, opts(tp, dp, sp));
    }
    let llama = model("tiny-llama.ron", &[]);
    for (tp, dp, sp) in [(1, 1, false), (2, 1, false), (2, 2, true), (1, 2, false)] {
        check(&llama, opts(tp, dp, sp));
    }
    // tp = 8 needs 8 heads (and an ffn that divides).
    check(&model("tiny-bert.ron", &[("heads", 8)]), opts(8, 1, false));
    check(
        &model(
            "tiny-llama.ron",
            &[("heads", 8), ("kv_heads", 8), ("ffn", 128)],
        ),
        opts(8, 1, false),
    );
    // Fewer key/value heads than ranks.
    let mqa = model(
        "tiny-llama.ron",
        &[("heads", 4), ("kv_heads", 1), ("ffn", 32)],
    );
    check(&mqa, opts(4, 1, false));
}

/// The unpartitioned run against the f64 reference evaluator and autodiff, so the runtime's
/// kernels are checked end to end and not only against themselves.
#[test]
fn the_unpartitioned_run_matches_the_f64_reference() {
    for file in ["tiny-gpt.ron", "tiny-bert.ron", "tiny-llama.ron"] {
        let g = model(file, &[]);
        let params = test_params(&g, 3);
        let batch = random_batch(&g, 3);
        let plan = reference_plan(&g).unwrap();
        let ours = run(
            Cpu::default(),
            &plan,
            &params,
            &batch,
            &RunOptions::default(),
        )
        .unwrap();

        let mut g2 = g.clone();
        let loss = g2.output("loss").unwrap();
        let bw = backward(&mut g2, loss).unwrap();
        let to64 = |t: &Tensor| reference::Tensor {
            shape: t.shape.clone(),
            data: t.data.iter().map(|&x| f64::from(x)).collect(),
        };
        let mut feed: HashMap<ValueId, reference::Tensor> = HashMap::new();
        for p in g2.params.values() {
            feed.insert(p.value, to64(&params[&p.name]));
        }
        for &v in &g2.inputs {
            feed.insert(v, to64(&batch[&g2.values[v].name]));
        }
        let env = eval_graph(&g2, &feed).unwrap();
        let to32 = |t: &reference::Tensor| Tensor {
            shape: t.shape.clone(),
            data: t.data.iter().map(|&x| x as f32).collect(),
        };
        let want = to32(&env[&loss]);
        let got = Tensor::full(Vec::new(), ours.loss().unwrap());
        assert!(
            rel_error(&got, &want) < 1e-5,
            "{file}: loss {got:?} vs {want:?}"
        );
        let floor = bw
            .param_grads
            .iter()
            .map(|(_, g)| env[g].data.iter().fold(0.0f64, |m, x| m.max(x.abs())))
            .fold(0.0, f64::max)
            * 1e-3;
        for &(p, grad) in &bw.param_grads {
            let name = &g2.params[p].name;
            let err = rel_error_floor(&ours.grad(name).unwrap(), &to32(&env[&grad]), floor);
            assert!(err < 1e-4, "{file}: d/d `{name}` off by {err:e}");
        }
    }
}

/// A plan whose second layer's activation is swapped for another computes another function:
/// the comparison fails and names that op as the first to diverge.
#[test]
fn a_broken_plan_is_caught_and_the_first_divergence_named() {
    let g = model("tiny-gpt.ron", &[]);
    let mut plan = partition(&g, &opts(2, 1, false)).unwrap();
    let n = plan.graph.node_named("h.1.act").unwrap();
    if let Op::GeluTanh(x) = plan.graph.nodes[n].op.clone() {
        plan.graph.nodes[n].op = Op::Gelu(x);
    }
    let reference = reference_plan(&g).unwrap();
    let v = compare(
        &plan,
        &reference,
        &test_params(&g, 1),
        &random_batch(&g, 1),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(!v.passed());
    let (node, _) = v.first_divergence.expect("a divergence is named");
    assert_eq!(node, "h.1.act");
}
