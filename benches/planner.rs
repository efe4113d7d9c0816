//! Benchmark: the planner choosing how to run the paper's 8.3B model on 4,096 GPUs of DGX-2H
//! nodes (every tp × sequence parallelism × recomputation, each partitioned and priced).
//! `cargo bench --bench planner`; results in BENCHMARKS.md.

use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::cost::{Cluster, EstimateOptions};
use ferrotron_partitioner::planner::choose;
use std::path::Path;
use std::time::Instant;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cluster_file = root.join("clusters/dgx2h.ron");
    let text = std::fs::read_to_string(&cluster_file).expect("the cluster file reads");
    let cluster = Cluster::from_ron(&text, "clusters/dgx2h.ron").expect("the cluster parses");
    let model = root.join("models/megatron-8.3b.ron");
    let load = |batch: Option<u64>| {
        let opts = LoadOptions {
            overrides: batch.map(|b| ("batch".to_owned(), b)).into_iter().collect(),
            ..LoadOptions::default()
        };
        load_model(&model, &opts).map_err(|e| e.to_string())
    };
    let opts = EstimateOptions {
        compute_dtype: Some(ferrotron_ir::DType::F16),
        ..EstimateOptions::default()
    };
    let mut times = Vec::new();
    let mut n = 0;
    let mut winner = String::new();
    for _ in 0..7 {
        let t = Instant::now();
        let choice = choose(load, &cluster, 4096, Some(4096), &opts).expect("the planner runs");
        times.push(t.elapsed());
        n = choice.candidates.len();
        winner = choice.explanation;
    }
    times.sort();
    println!(
        "megatron-8.3b on 4096 GPUs: {n} candidates in {:.0} ms (median of 7)",
        times[3].as_secs_f64() * 1e3
    );
    println!("{winner}");
}
