//! The planner prices every tensor-parallel degree the GPUs allow (with and without sequence
//! parallelism and recomputation), ranks the feasible ones by throughput, and says why.

use ferrotron_ir::{load_model, DType, LoadOptions};
use ferrotron_partitioner::cost::{Cluster, EstimateOptions};
use ferrotron_partitioner::planner::choose;
use std::path::Path;

fn root(p: &str) -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(p)
}

#[test]
fn the_planner_ranks_every_degree_and_explains_the_winner() {
    let text = std::fs::read_to_string(root("clusters/dgx2h.ron")).unwrap();
    let cluster = Cluster::from_ron(&text, "dgx2h.ron").unwrap();
    let load = |batch: Option<u64>| {
        let mut overrides = vec![("layers".to_owned(), 8)];
        overrides.extend(batch.map(|b| ("batch".to_owned(), b)));
        let opts = LoadOptions {
            overrides,
            ..LoadOptions::default()
        };
        load_model(&root("models/megatron-8.3b.ron"), &opts).map_err(|e| e.to_string())
    };
    let opts = EstimateOptions {
        compute_dtype: Some(DType::F16),
        ..EstimateOptions::default()
    };
    let choice = choose(load, &cluster, 64, Some(64), &opts).unwrap();
    // tp ∈ {1, 2, 4, 8, 16, 32} partition (× SP × recompute); 64 (more ranks than heads) is
    // listed with the partitioner's error.
    let priced: Vec<u64> = choice
        .candidates
        .iter()
        .filter(|c| c.estimate.is_some())
        .map(|c| c.tp)
        .collect();
    for tp in [1, 2, 4, 8, 16, 32] {
        assert_eq!(priced.iter().filter(|&&t| t == tp).count(), 4, "tp = {tp}");
    }
    let refused = choice.candidates.iter().find(|c| c.tp == 64).unwrap();
    assert!(refused.error.as_deref().unwrap().contains("valid tp sizes"));
    // Feasible candidates first, by throughput; the winner is explained.
    let best = &choice.candidates[0];
    assert!(best.feasible());
    for w in choice.candidates.windows(2) {
        if w[0].feasible() == w[1].feasible() {
            assert!(w[0].tokens_per_second >= w[1].tokens_per_second);
        } else {
            assert!(w[0].feasible());
        }
    }
    assert!(
        choice
            .explanation
            .starts_with(&format!("tp = {}, dp = {}", best.tp, best.dp)),
        "{}",
        choice.explanation
    );
}
