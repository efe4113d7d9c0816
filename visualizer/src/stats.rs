//! The numbers the viewer's panels show: the FLOPs and bytes of a node (full and per rank) for
//! the property panel, and the bars of the summary chart (parameters and memory per rank,
//! collectives per step by kind and bytes).
//!
//! FLOPs come from the IR's per-op counts ([`node_flops`], the figures the partitioner's cost
//! model and reports use); the collectives and memory from the partitioner's [`Report`]. *Per
//! rank* is what one GPU runs: the op on the plan's shard-local shapes. *Full* is the same op on
//! the unpartitioned tensors (every value's global shape, [`Mesh::global_sizes`]), which covers
//! the whole step: every data-parallel replica's batch together. A replicated op is thus the
//! same per tensor-parallel rank as in full (each rank repeats it); a split one is `1/tp` of it.
//!
//! [`Mesh::global_sizes`]: ferrotron_partitioner::Mesh::global_sizes

use ferrotron_ir::count::node_flops;
use ferrotron_ir::{Graph, MeshAxis, NodeId, Op, ValueId};
use ferrotron_partitioner::{Plan, Report};

/// The cost of a node (or of several, summed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Floating-point operations (forward figure of the op; a backward op counts its own).
    pub flops: u128,
    /// Bytes read and written: every input and output once, as a memory-bound op moves them.
    pub bytes: u128,
    /// Bytes a collective works on (the full buffer, NCCL's convention, as in [`Report`]);
    /// 0 for other ops and for a group of one.
    pub communicated: u128,
}

impl Cost {
    fn add(&mut self, o: Cost) {
        self.flops = self.flops.saturating_add(o.flops);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.communicated = self.communicated.saturating_add(o.communicated);
    }
}

/// A node's cost in full and on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// On the unpartitioned tensors.
    pub full: Cost,
    /// On one rank's shards.
    pub per_rank: Cost,
}

/// Prices the nodes of one plan. Holds a copy of the plan's graph with every value at its
/// global shape, made once per plan.
pub struct NodeCosts {
    global: Graph,
}

impl NodeCosts {
    /// Prepares `plan`.
    pub fn new(plan: &Plan) -> NodeCosts {
        let mut global = plan.graph.clone();
        for (v, value) in global.values.iter_mut() {
            let local = value.ty.shape.sizes();
            let full = plan.mesh.global_sizes(&local, plan.layouts[v]);
            for (dim, size) in value.ty.shape.0.iter_mut().zip(full) {
                dim.size = size;
            }
        }
        NodeCosts { global }
    }

    /// The cost of one node of `plan` (the plan this was made for).
    pub fn node(&self, plan: &Plan, n: NodeId) -> Costs {
        Costs {
            full: cost(&self.global, plan, n),
            per_rank: cost(&plan.graph, plan, n),
        }
    }

    /// The summed cost of several nodes (a collapsed layer).
    pub fn nodes(&self, plan: &Plan, nodes: &[NodeId]) -> Costs {
        let mut sum = Costs::default();
        for &n in nodes {
            let c = self.node(plan, n);
            sum.full.add(c.full);
            sum.per_rank.add(c.per_rank);
        }
        sum
    }

    /// The bytes of one value: full and on one rank.
    pub fn value_bytes(&self, plan: &Plan, v: ValueId) -> (u64, u64) {
        (
            self.global.ty(v).size_bytes(),
            plan.graph.ty(v).size_bytes(),
        )
    }
}

fn cost(g: &Graph, plan: &Plan, n: NodeId) -> Cost {
    let node = &g.nodes[n];
    let (matmul, other) = node_flops(g, &node.op, &node.outputs);
    let bytes = |v: ValueId| g.ty(v).size_bytes() as u128;
    let moved: u128 = node.op.inputs().iter().map(|&&v| bytes(v)).sum::<u128>()
        + node.outputs.iter().map(|&v| bytes(v)).sum::<u128>();
    let group = |axis: &MeshAxis| plan.mesh.size(*axis) > 1;
    let communicated = match &node.op {
        Op::G { x, axis } | Op::AllReduce { x, axis } if group(axis) => bytes(*x),
        Op::ReduceScatter { x, axis, .. } if group(axis) => bytes(*x),
        Op::AllGather { axis, .. } if group(axis) => node.outputs.first().map_or(0, |&v| bytes(v)),
        _ => 0,
    };
    Cost {
        flops: matmul.saturating_add(other),
        bytes: moved,
        communicated,
    }
}

/// One bar of the summary chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    /// What it measures (`weights`, `all_reduce forward [tp]`).
    pub label: String,
    /// Its size in the unit of its group (bytes, or parameter elements).
    pub value: u64,
    /// Its length relative to the longest bar of its group, in `0..=1`.
    pub fraction: f32,
    /// The value as the chart prints it (`121.4 MiB`, `×28, 600.1 MiB`).
    pub text: String,
}

/// A titled group of bars, one scale for all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct BarGroup {
    /// The group's title with its total (`memory per rank: 5.7 GiB`).
    pub title: String,
    /// The bars, in drawing order.
    pub bars: Vec<Bar>,
}

/// The summary chart: parameters per rank, memory per rank by kind, collectives per step by
/// kind with their count and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryChart {
    /// Parameters: per rank against the model's total.
    pub parameters: BarGroup,
    /// Memory per rank: weights, gradients, optimizer state, activations.
    pub memory: BarGroup,
    /// Collectives per step, by kind, direction and axis; bars by bytes.
    pub collectives: BarGroup,
}

/// Bytes as `121.4 MiB` (binary units).
pub fn human_bytes(bytes: u128) -> String {
    ferrotron_partitioner::report::human_bytes(bytes, 1)
}

/// A count as `1.21 G` (decimal units, three significant digits).
pub fn human_count(n: u128) -> String {
    const UNITS: [&str; 7] = ["", " k", " M", " G", " T", " P", " E"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        n.to_string()
    } else if x >= 100.0 {
        format!("{x:.0}{}", UNITS[u])
    } else if x >= 10.0 {
        format!("{x:.1}{}", UNITS[u])
    } else {
        format!("{x:.2}{}", UNITS[u])
    }
}

fn group(title: String, bars: Vec<(String, u64, String)>) -> BarGroup {
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    BarGroup {
        title,
        bars: bars
            .into_iter()
            .map(|(label, value, text)| Bar {
                label,
                value,
                fraction: (value as f64 / max) as f32,
                text,
            })
            .collect(),
    }
}

/// The summary chart of `plan`, from its `report`.
pub fn summary_chart(plan: &Plan, report: &Report) -> SummaryChart {
    let r = &report.per_rank;
    let total: u64 = plan
        .params
        .iter()
        .map(|p| p.shape.iter().product::<u64>())
        .fold(0u64, u64::saturating_add);
    let share = if total > 0 {
        format!(" ({:.1}%)", 100.0 * r.parameters as f64 / total as f64)
    } else {
        String::new()
    };
    let parameters = group(
        format!("parameters per rank: {}", human_count(r.parameters as u128)),
        vec![
            (
                "per rank".to_string(),
                r.parameters,
                format!("{}{share}", human_count(r.parameters as u128)),
            ),
            (
                "model".to_string(),
                total,
                human_count(total as u128).to_string(),
            ),
        ],
    );
    let mem = |label: &str, b: u64| (label.to_string(), b, human_bytes(b as u128));
    let memory = group(
        format!("memory per rank: {}", human_bytes(r.memory_bytes as u128)),
        vec![
            mem("weights", r.weights_bytes),
            mem("gradients", r.gradients_bytes),
            mem("optimizer", r.optimizer_bytes),
            mem("activations", r.activations_bytes),
        ],
    );
    let bytes: u64 = report.collectives.iter().map(|c| c.bytes_per_rank).sum();
    let count: u64 = report.collectives.iter().map(|c| c.count).sum();
    let collectives = group(
        format!(
            "collectives per step: {count}, {}",
            human_bytes(bytes as u128)
        ),
        report
            .collectives
            .iter()
            .map(|c| {
                (
                    format!("{} {} [{}]", c.kind, c.direction, c.axis),
                    c.bytes_per_rank,
                    format!("×{}, {}", c.count, human_bytes(c.bytes_per_rank as u128)),
                )
            })
            .collect(),
    );
    SummaryChart {
        parameters,
        memory,
        collectives,
    }
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, human_count};

    #[test]
    fn units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(1_207_959_552), "1.21 G");
        assert_eq!(human_count(31_825_152), "31.8 M");
        assert_eq!(human_count(124_000), "124 k");
    }
}
