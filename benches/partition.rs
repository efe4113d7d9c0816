//! Benchmark: partitioning the Megatron paper's 8.3B model (tp = 8, dp = 64, batch 512) with
//! autodiff, at 72, 720 and 7,200 layers, to show the cost and that it grows linearly with depth.
//! `cargo bench --bench partition`; results go in BENCHMARKS.md.
//!
//! Timed: `partition` (strategy, SPMD lowering, autodiff, gradient reductions; the plan is
//! checked as it is built). Reported apart: loading the model file, and re-verifying the finished
//! plan from scratch with `verify_plan`.

use ferrotron_ir::{load_model, LoadOptions};
use ferrotron_partitioner::{partition, verify_plan, PartitionOptions};
use std::path::Path;
use std::time::{Duration, Instant};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/megatron-8.3b.ron");
    let options = PartitionOptions {
        tp: 8,
        dp: 64,
        ..PartitionOptions::default()
    };
    println!("megatron-8.3b, tp = 8, dp = 64, batch 512 (median of the runs)");
    println!(
        "{:>7} {:>7} {:>9} {:>10} {:>16} {:>12} {:>11}",
        "layers", "runs", "load ms", "nodes", "partition ms", "µs / layer", "verify ms"
    );
    for (layers, runs) in [(72u64, 21), (720, 7), (7200, 3)] {
        let opts = LoadOptions {
            overrides: vec![("layers".into(), layers), ("batch".into(), 512)],
            ..LoadOptions::default()
        };
        let t = Instant::now();
        let graph = load_model(&model, &opts).expect("the model loads");
        let load = t.elapsed();
        let mut times = Vec::new();
        let mut nodes = 0;
        let mut verify = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let plan = partition(&graph, &options).expect("the model partitions");
            times.push(t.elapsed());
            nodes = plan.graph.order.len();
            let t = Instant::now();
            verify_plan(&plan).expect("the plan verifies");
            verify.push(t.elapsed());
        }
        let t = median(times);
        println!(
            "{:>7} {:>7} {:>9.1} {:>10} {:>16.2} {:>12.1} {:>11.2}",
            layers,
            runs,
            load.as_secs_f64() * 1e3,
            nodes,
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e6 / layers as f64,
            median(verify).as_secs_f64() * 1e3
        );
    }
}
