//! The memory plan: a rank's program walked at compile time exactly as the rank program will
//! hold its tensors, giving every intermediate value its lifetime, the buffer it shares with an
//! input where the step runs in place, an offset in one arena, and the rank's peak.
//!
//! ```text
//! Executable (steps in order, fused; last uses; kept values) ─► plan(): per step
//!   + outputs (into a free input's buffer where the step runs in place), − inputs at their
//!   last use, − outputs nothing reads ─► lifetimes ─► offsets (largest first, lowest fit)
//!   ─► MemoryPlan { peak (weights + inputs + live values), arena (the intermediates) }
//! ```
//!
//! The walk follows the rank program's own rules ([`crate::rank`]): a reshape, a `g` or an
//! all-reduce takes over its input's buffer, and a sum the buffer of an addend of its shape, when
//! that input is read for the last time and not kept; a tied embedding's gradient is added into
//! the other gradient's buffer likewise; a dropout's gradient does not hold the dropout's output
//! ([`ferrotron_ir::Op::data_inputs`]); a fused output layer holds its chunks' scratch while it
//! runs ([`crate::fuse::Program::scratch_bytes`]). So its peak is the peak the rank measures, to the byte
//! (`runtime/cpu/tests/memory_plan.rs`). The arena is where the intermediates would live if
//! each had its offset: values whose lifetimes overlap never share bytes, and a buffer taken
//! over in place keeps its offset.
//!
//! On a backend that uses an arena ([`crate::Backend::uses_arena`]: the CPU's in host memory,
//! CUDA's one device allocation per rank), the rank program places the values there
//! ([`Placements`], [`crate::arena`]): allocated once, so a steady-state step allocates nothing.
//! Places are planned in 4-byte elements: a backend storing a value in 2 bytes (CUDA's bf16)
//! uses the first half of its place.
//!
//! Planned for one micro-batch without pipeline stages (a schedule of several micro-batches
//! holds several at once, as its schedule says): [`plan`] gives `None` otherwise.

use crate::arena::Placements;
use crate::fuse::{Fused, StepOp};
use crate::program::Executable;
use ferrotron_ir::graph::{EntityRef, SecondaryMap};
use ferrotron_ir::{DType, Op, ValueDef, ValueId};
use std::sync::Arc;

/// One value's place in the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The value (the plan's, or a [`crate::fuse::Saved`] one of the program's); `None`: the
    /// scratch a step holds while it runs ([`crate::fuse::Program::scratch_bytes`]).
    pub value: Option<ValueId>,
    /// Its bytes.
    pub bytes: u64,
    /// Its offset in the arena.
    pub offset: u64,
    /// The step that makes it (its buffer's first step, for a value made in place).
    pub from: usize,
    /// The last step that holds it (the program's length for a value kept to the end).
    pub to: usize,
    /// The value whose buffer it took over, if its step ran in place.
    pub reuses: Option<ValueId>,
}

/// A rank's memory, planned before it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The weights the rank holds (resident).
    pub weights: u64,
    /// The step's inputs the rank reads (held until their last reader).
    pub inputs: u64,
    /// The most bytes held at once: weights, inputs and live values.
    pub peak: u64,
    /// The most bytes of the inputs and intermediate values live at once: what no arena can go
    /// below.
    pub live_peak: u64,
    /// The buffer of every input and intermediate value, in the order the program makes them,
    /// and the scratch of each step that holds some while it runs.
    pub slots: Vec<Slot>,
    /// The arena the slots' offsets span.
    pub arena: u64,
}

/// Where a rank places `exe`'s values in its arena, planned once per
/// executable: `None` with [`crate::RunOptions::arena`] off, and where there is no memory plan
/// (pipeline stages, several micro-batches).
pub fn placements(exe: &Executable) -> Option<Arc<Placements>> {
    if !exe.opts.arena {
        return None;
    }
    exe.placements
        .get_or_init(|| Some(Arc::new(plan(exe, &|_| 4)?.placements(exe))))
        .clone()
}

impl MemoryPlan {
    /// This plan's slots as [`Placements`] for `exe`'s program (the plan made for it with 4
    /// bytes per element).
    pub fn placements(&self, exe: &Executable) -> Placements {
        let steps = exe.program.steps.len();
        let inputs = &exe.plan.graph.inputs;
        let place = |s: &Slot| ((s.offset / 4) as usize, (s.bytes / 4) as usize);
        let mut out = Placements {
            elements: self.arena.div_ceil(4) as usize,
            outputs: vec![Vec::new(); steps],
            inputs: Vec::new(),
            scratch: vec![None; steps],
        };
        for s in &self.slots {
            match s.value {
                Some(v) if inputs.contains(&v) => out.inputs.push((v, place(s))),
                Some(_) if s.reuses.is_none() && s.from < steps => {
                    out.outputs[s.from].push(place(s))
                }
                Some(_) => {}
                None if s.from < steps => out.scratch[s.from] = Some(place(s)),
                None => {}
            }
        }
        out
    }
}

/// The memory plan of `exe` on any of its ranks, with `element_bytes` the bytes of one element of a value of each dtype as the backend stores it
/// (the program's saved values are `f32`). `None` for a plan of several micro-batches or
/// pipeline stages.
pub fn plan(exe: &Executable, element_bytes: &dyn Fn(DType) -> u64) -> Option<MemoryPlan> {
    let plan = exe.plan;
    if plan.pipeline.is_some() || plan.micro_batches() > 1 {
        return None;
    }
    let g = &plan.graph;
    let program = &exe.program;
    let steps = &program.steps;
    let end = if exe.opts.forward_only {
        program.backward_start
    } else {
        steps.len()
    };
    let size = |v: ValueId| -> u64 {
        let elements: u64 = program.value_shape(plan, v).iter().product();
        let dtype = match program.saved_value(plan, v) {
            Some(_) => DType::F32,
            None => g.ty(v).dtype,
        };
        elements * element_bytes(dtype)
    };
    let is_param =
        |v: ValueId| v.index() < g.values.len() && matches!(g.values[v].def, ValueDef::Param(_));
    // The inputs the program reads, uploaded before the first step.
    let mut reads: SecondaryMap<ValueId, bool> = SecondaryMap::new();
    for step in &steps[..end] {
        for v in step.inputs(plan) {
            reads[v] = true;
        }
    }
    let weights: u64 = g.params.values().map(|p| size(p.value)).sum();
    // Each live value's slot (its index in `slots`); the inputs are the first, held from the
    // start and freed at their last use like any value.
    let mut slot_of: SecondaryMap<ValueId, Option<usize>> = SecondaryMap::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut inputs = 0;
    for &v in g.inputs.iter().filter(|&&v| reads[v]) {
        inputs += size(v);
        slot_of[v] = Some(slots.len());
        slots.push(Slot {
            value: Some(v),
            bytes: size(v),
            offset: 0,
            from: 0,
            to: 0,
            reuses: None,
        });
    }
    let mut live = weights + inputs;
    let mut peak = live;
    let (mut intermediates, mut live_peak) = (inputs, inputs);
    // A value a step may take over or free: not a weight, read for the last time, not kept.
    let free = |v: ValueId, i: usize| !is_param(v) && exe.is_last_use(0, v, i) && !exe.keep[v];
    for (i, step) in steps[..end].iter().enumerate() {
        let node = &g.nodes[step.node];
        let outputs = step.outputs(plan);
        // The input whose buffer the output takes over, as the rank program decides.
        let reused = match &step.op {
            StepOp::Node => match &node.op {
                Op::Reshape { x, .. }
                | Op::F { x, .. }
                | Op::G { x, .. }
                | Op::AllReduce { x, .. }
                    if free(*x, i) =>
                {
                    Some(*x)
                }
                Op::Add(a, b) if a != b => {
                    let out = g.ty(outputs[0]);
                    let whole =
                        |v: ValueId| g.ty(v).shape == out.shape && g.ty(v).dtype == out.dtype;
                    if !(whole(*a) && whole(*b)) {
                        None
                    } else if free(*a, i) {
                        Some(*a)
                    } else if free(*b, i) {
                        Some(*b)
                    } else {
                        None
                    }
                }
                _ => None,
            },
            StepOp::Fused {
                op: Fused::EmbeddingGradAdd { acc, .. },
                ..
            } if free(*acc, i) => Some(*acc),
            StepOp::Fused { .. } => None,
        };
        // What the step holds while it runs (a fused output layer's chunks), before its outputs.
        let scratch = program.scratch_bytes(plan, i, element_bytes);
        if scratch > 0 {
            peak = peak.max(live + scratch);
            live_peak = live_peak.max(intermediates + scratch);
            // The scratch holds the outputs as they are made; their own slots start here.
            let made: u64 = outputs.iter().map(|&v| size(v)).sum();
            slots.push(Slot {
                value: None,
                bytes: scratch.saturating_sub(made),
                offset: 0,
                from: i,
                to: i,
                reuses: None,
            });
        }
        if let Some(x) = reused {
            live -= size(x);
            intermediates -= size(x);
        }
        for (k, &v) in outputs.iter().enumerate() {
            let bytes = size(v);
            live += bytes;
            intermediates += bytes;
            peak = peak.max(live);
            live_peak = live_peak.max(intermediates);
            let taken = if k == 0 { reused } else { None };
            let from = taken.and_then(|x| slot_of[x]).map_or(i, |s| slots[s].from);
            slot_of[v] = Some(slots.len());
            slots.push(Slot {
                value: Some(v),
                bytes,
                offset: 0,
                from,
                to: i,
                reuses: taken,
            });
            if let Some(s) = taken.and_then(|x| slot_of[x].take()) {
                slots[s].to = i;
            }
        }
        // Free what no later step reads (unless kept).
        for v in step.inputs(plan) {
            if Some(v) != reused && free(v, i) {
                if let Some(s) = slot_of[v].take() {
                    live -= slots[s].bytes;
                    intermediates -= slots[s].bytes;
                    slots[s].to = i;
                }
            }
        }
        for &v in outputs {
            if !exe.keep[v] && !exe.is_read_after(0, v, i) {
                if let Some(s) = slot_of[v].take() {
                    live -= slots[s].bytes;
                    intermediates -= slots[s].bytes;
                    slots[s].to = i;
                }
            }
        }
    }
    // What stays to the end.
    for s in slot_of.values().flatten() {
        slots[*s].to = end;
    }
    let arena = assign_offsets(&mut slots);
    Some(MemoryPlan {
        weights,
        inputs,
        peak,
        live_peak,
        slots,
        arena,
    })
}

/// Every offset in the arena is a multiple of this many bytes, as every allocation `cudaMalloc`
/// makes: cuBLAS picks its fastest kernels only for aligned operands, and the host's vector
/// loads gain from whole cache lines.
pub const ALIGN: u64 = 256;

/// Gives each slot an offset (a multiple of [`ALIGN`]), the largest first, each at the lowest offset where it overlaps
/// no placed slot that is live at the same time (a value made in place continues its input's
/// buffer: it keeps that offset). Returns the arena's size.
fn assign_offsets(slots: &mut [Slot]) -> u64 {
    // A chain of in-place steps is one buffer: its slots share an offset, its lifetime the
    // union of theirs.
    let mut root: Vec<usize> = (0..slots.len()).collect();
    let index: std::collections::HashMap<ValueId, usize> = slots
        .iter()
        .enumerate()
        .filter_map(|(k, s)| Some((s.value?, k)))
        .collect();
    for k in 0..slots.len() {
        if let Some(&from) = slots[k].reuses.as_ref().and_then(|x| index.get(x)) {
            root[k] = root[from];
        }
    }
    let mut buffers: std::collections::BTreeMap<usize, (u64, usize, usize)> = Default::default();
    for (k, s) in slots.iter().enumerate() {
        let b = buffers.entry(root[k]).or_insert((0, s.from, s.to));
        b.0 = b.0.max(s.bytes);
        b.1 = b.1.min(s.from);
        b.2 = b.2.max(s.to);
    }
    // Sizes rounded up to whole alignments keep every offset aligned.
    let buffers: Vec<Buffer> = buffers
        .into_iter()
        .map(|(root, (bytes, from, to))| Buffer {
            root,
            bytes: bytes.div_ceil(ALIGN) * ALIGN,
            from,
            to,
        })
        .collect();
    // Placing buffers one by one is a heuristic (the best packing is NP-hard): a few orders
    // are tried and the smallest arena kept. Largest first is the usual; longest-lived first
    // and in order of birth each pack some programs tighter.
    let orders: [OrderKey; 4] = [
        |b| (u64::MAX - b.bytes, b.root),
        |b| (u64::MAX - (b.to - b.from) as u64, b.root),
        |b| {
            (
                u64::MAX - b.bytes.saturating_mul((b.to - b.from + 1) as u64),
                b.root,
            )
        },
        |b| (b.from as u64, b.root),
    ];
    let (arena, offset_of) = orders
        .iter()
        .map(|key| {
            let mut order: Vec<&Buffer> = buffers.iter().collect();
            order.sort_by_key(|b| key(b));
            place_lowest(&order)
        })
        .min_by_key(|(arena, _)| *arena)
        .unwrap_or_default();
    for (k, s) in slots.iter_mut().enumerate() {
        s.offset = offset_of[&root[k]];
    }
    arena
}

/// A sort key for the order buffers are placed in (ties broken by their first slot).
type OrderKey = fn(&Buffer) -> (u64, usize);

/// A buffer of the arena: the in-place chain of slots it holds (by its first slot), its size
/// and its lifetime in steps.
struct Buffer {
    root: usize,
    bytes: u64,
    from: usize,
    to: usize,
}

/// Places `order`'s buffers one after the other, each at the lowest offset where it overlaps
/// no placed buffer live at the same time; the arena's size and each buffer's offset by root.
fn place_lowest(order: &[&Buffer]) -> (u64, std::collections::HashMap<usize, u64>) {
    let mut placed: Vec<(u64, &Buffer)> = Vec::with_capacity(order.len());
    let mut offset_of = std::collections::HashMap::with_capacity(order.len());
    let mut arena = 0u64;
    for &b in order {
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .filter(|(_, p)| p.from <= b.to && b.from <= p.to)
            .map(|&(at, p)| (at, at + p.bytes))
            .collect();
        busy.sort();
        let mut offset = 0u64;
        for (start, stop) in busy {
            if offset + b.bytes <= start {
                break;
            }
            offset = offset.max(stop);
        }
        placed.push((offset, b));
        offset_of.insert(b.root, offset);
        arena = arena.max(offset + b.bytes);
    }
    (arena, offset_of)
}
