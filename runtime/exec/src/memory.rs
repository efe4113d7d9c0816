//! The memory plan: a rank's program walked at compile time exactly as the rank program will
//! hold its tensors, giving every intermediate value its lifetime, the buffer it shares with an
//! input where the step runs in place, an offset in one arena, and the rank's peak.
//!
//! ```text
//! Executable (steps in order, fused; last uses; kept values; the stage's schedule)
//!   ─► plan(stage): per pass of a micro-batch in the schedule, per step of the stage
//!      + received values, + outputs (into a free input's buffer where the step runs in
//!      place), − inputs at their last use, − outputs nothing reads or another stage takes,
//!      gradients into their sums over the micro-batches
//!   ─► lifetimes (in positions: a step on a micro-batch) ─► offsets (a few orders, lowest fit)
//!   ─► MemoryPlan { peak (weights + inputs + live values), arena (the placed values) }
//! ```
//!
//! The walk follows the rank program's own rules ([`crate::rank`]): a reshape, a `g` or an
//! all-reduce takes over its input's buffer, and a sum the buffer of an addend of its shape, when
//! that input is read for the last time and not kept; a tied embedding's gradient is added into
//! the other gradient's buffer likewise; a dropout's gradient does not hold the dropout's output
//! ([`ferrotron_ir::Op::data_inputs`]); a fused output layer holds its chunks' scratch while it
//! runs ([`crate::fuse::Program::scratch_bytes`]). Over pipeline stages, each micro-batch's
//! values are apart: what another stage sends arrives before its first reader, what this stage
//! sends and no longer reads goes at once, and a micro-batch's gradients are added into the
//! first micro-batch's. So its peak is the peak the rank measures, to the byte, on every stage
//! (`runtime/cpu/tests/memory_plan.rs`). The arena is where the intermediates live: values whose
//! lifetimes overlap never share bytes, and a buffer taken over in place keeps its offset. A
//! value that crosses stages is not placed (the other stage holds it for as long as it needs).
//!
//! On a backend that uses an arena ([`crate::Backend::uses_arena`]: the CPU's in host memory,
//! CUDA's one device allocation per rank), the rank program places the values there
//! ([`Placements`], [`crate::arena`]): allocated once, so a steady-state step allocates nothing
//! but the values that cross stages. Places are planned with the bytes the backend stores each
//! dtype in (CUDA's bf16 values take 2 per element).

use crate::arena::{ElementSizes, Placements};
use crate::fuse::{Fused, StepOp};
use crate::program::Executable;
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{DType, Op, ValueDef, ValueId};
use ferrotron_partitioner::pipeline::PipeStep;
use std::collections::HashMap;
use std::sync::Arc;

/// One value's place in the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The value (the plan's, or a [`crate::fuse::Saved`] one of the program's); `None`: the
    /// scratch a step holds while it runs ([`crate::fuse::Program::scratch_bytes`]).
    pub value: Option<ValueId>,
    /// The micro-batch whose value it is.
    pub micro_batch: u32,
    /// Its bytes.
    pub bytes: u64,
    /// Its offset in the arena (0 for a value not in it: see [`Slot::placed`]).
    pub offset: u64,
    /// The position in the stage's run ([`MemoryPlan::positions`]) of the step that makes it
    /// (its buffer's first step, for a value made in place).
    pub from: usize,
    /// The last position that holds it ([`MemoryPlan::positions`] for a value kept to the end).
    pub to: usize,
    /// The slot whose buffer it took over, if its step ran in place.
    pub reuses: Option<usize>,
    /// Whether it lives in the rank's arena: not a value another stage sent (its buffer is the
    /// sender's), nor one this stage sends away (the receiver holds it past this stage's use),
    /// nor a value made in place in such a buffer.
    pub placed: bool,
}

/// A rank's memory, planned before it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The weights the rank holds (resident).
    pub weights: u64,
    /// The step's inputs the rank reads (held until their last reader), one micro-batch's.
    pub inputs: u64,
    /// The most bytes held at once: weights, inputs and live values.
    pub peak: u64,
    /// The most bytes of the inputs and intermediate values live at once: what no arena can go
    /// below, where every value is placed.
    pub live_peak: u64,
    /// The buffer of every input and intermediate value, in the order the stage makes them,
    /// and the scratch of each step that holds some while it runs.
    pub slots: Vec<Slot>,
    /// The arena the placed slots' offsets span.
    pub arena: u64,
    /// The steps the stage runs, in order: `(micro-batch, step)` at each position (a step of a
    /// stage runs once per micro-batch).
    pub positions: Vec<(u32, usize)>,
}

/// Where a rank of pipeline stage `stage` places `exe`'s values in its arena, with
/// `element_bytes` the bytes of one element of each dtype as its backend stores it: planned
/// once per executable, stage and storage; `None` with [`crate::RunOptions::arena`] off.
pub fn placements(
    exe: &Executable,
    stage: usize,
    element_bytes: &dyn Fn(DType) -> u64,
) -> Option<Arc<Placements>> {
    if !exe.opts.arena {
        return None;
    }
    let storage = ElementSizes::of(element_bytes);
    let mut cached = exe
        .placements
        .get(stage)?
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cached.iter().find(|(s, _)| *s == storage) {
        return Some(p.clone());
    }
    let p = Arc::new(plan(exe, stage, element_bytes).placements(exe));
    cached.push((storage, p.clone()));
    Some(p)
}

impl MemoryPlan {
    /// This plan's placed slots as [`Placements`] for `exe`'s program.
    pub fn placements(&self, exe: &Executable) -> Placements {
        let inputs = &exe.plan.graph.inputs;
        let place = |s: &Slot| (s.offset as usize, s.bytes as usize);
        let positions = self.positions.len();
        let mut out = Placements {
            bytes: self.arena as usize,
            outputs: vec![Vec::new(); positions],
            inputs: Vec::new(),
            scratch: vec![None; positions],
            sent_after: Vec::new(),
        };
        for s in self.slots.iter().filter(|s| s.placed) {
            match s.value {
                Some(v) if inputs.contains(&v) => out.inputs.push((s.micro_batch, v, place(s))),
                Some(_) if s.from == positions => out.sent_after.push(place(s)),
                Some(_) if s.reuses.is_none() && s.from < positions => {
                    out.outputs[s.from].push(place(s))
                }
                Some(_) => {}
                None if s.from < positions => out.scratch[s.from] = Some(place(s)),
                None => {}
            }
        }
        out
    }
}

/// The memory plan of `exe` on a rank of pipeline stage `stage` (0 without a pipeline), with
/// `element_bytes` the bytes of one element of a value of each dtype as the backend stores it
/// (the program's saved values are `f32`): the stage's schedule walked as the rank program
/// runs it, every micro-batch's values apart.
pub fn plan(exe: &Executable, stage: usize, element_bytes: &dyn Fn(DType) -> u64) -> MemoryPlan {
    let plan = exe.plan;
    let g = &plan.graph;
    let program = &exe.program;
    let size = |v: ValueId| -> u64 {
        let shape = program.value_shape(plan, v);
        let elements: u64 = shape.iter().product();
        // Kept in `f32` whatever the backend's storage: the program's saved statistics (the
        // attention's log-sum-exps), scalars (the loss, its gradient's seed) and constants.
        let def = g.values.get(v).map(|d| &d.def);
        let constant = matches!(def, Some(ValueDef::Node { node, .. })
            if matches!(g.nodes[*node].op, Op::Fill { .. }));
        let param = matches!(def, Some(ValueDef::Param(_)));
        let statistic =
            program.saved_value(plan, v).is_some() || (shape.is_empty() && !param) || constant;
        match statistic {
            true => elements * 4,
            false => elements * element_bytes(g.ty(v).dtype),
        }
    };
    let weights: u64 = plan
        .params_on(stage)
        .iter()
        .map(|&p| size(g.params[p].value))
        .sum();
    // The inputs the stage reads, uploaded at a micro-batch's first forward step.
    let mut reads: SecondaryMap<ValueId, bool> = SecondaryMap::new();
    for (i, step) in program.steps.iter().enumerate() {
        if exe.stage_of[i] == stage {
            for v in step.inputs(plan) {
                reads[v] = true;
            }
        }
    }
    let read: Vec<ValueId> = g.inputs.iter().copied().filter(|&v| reads[v]).collect();
    let mut walk = Walk {
        exe,
        stage,
        size: &size,
        element_bytes,
        slots: Vec::new(),
        positions: Vec::new(),
        live: weights,
        peak: weights,
        intermediates: 0,
        live_peak: 0,
        stores: HashMap::new(),
        sums: HashMap::new(),
    };
    let (steps, bw) = (program.steps.len(), program.backward_start);
    let chunks = plan
        .pipeline
        .as_ref()
        .map_or(1, |p| p.virtual_stages.max(1));
    for (step, chunk) in exe.schedule(stage) {
        match step {
            PipeStep::Forward(m) => {
                if !walk.stores.contains_key(&m) {
                    let mut store = SecondaryMap::new();
                    for &v in &read {
                        store[v] = Some(walk.make(Some(v), m, size(v), true));
                    }
                    walk.stores.insert(m, store);
                }
                walk.steps(m, 0..bw, chunk);
                if exe.opts.forward_only && chunk + 1 == chunks {
                    walk.keep(m);
                }
            }
            PipeStep::Backward(_) if exe.opts.forward_only => {}
            PipeStep::Backward(m) => {
                walk.steps(m, bw..steps, chunk);
                if chunk == 0 {
                    walk.keep(m);
                }
            }
        }
    }
    let end = walk.positions.len();
    let Walk {
        mut slots,
        positions,
        peak,
        live_peak,
        ..
    } = walk;
    // What stays to the end: every slot not freed (sums, kept values).
    for s in slots.iter_mut().filter(|s| s.to == usize::MAX) {
        s.to = end;
    }
    // After its last step, the stage that completes a tied parameter's gradient sends a copy of
    // it to each other stage holding the parameter, which keeps it through its optimizer step:
    // the first copy's place, beside what stays to the end.
    let tied = plan.pipeline.as_ref().map_or(&[][..], |p| &p.tied[..]);
    for t in tied
        .iter()
        .filter(|t| t.owner as usize == stage && t.holders.len() > 1)
    {
        if let Some(&(_, grad)) = plan.grads.iter().find(|(p, _)| *p == t.param) {
            slots.push(Slot {
                value: Some(grad),
                micro_batch: 0,
                bytes: size(grad),
                offset: 0,
                from: end,
                to: end,
                reuses: None,
                placed: true,
            });
        }
    }
    let arena = assign_offsets(&mut slots);
    MemoryPlan {
        weights,
        inputs: read.iter().map(|&v| size(v)).sum(),
        peak,
        live_peak,
        slots,
        arena,
        positions,
    }
}

/// The stage's run being walked: the live bytes and their peak, each micro-batch's values'
/// slots, the sums over the micro-batches.
struct Walk<'a, 'p> {
    exe: &'a Executable<'p>,
    stage: usize,
    size: &'a dyn Fn(ValueId) -> u64,
    element_bytes: &'a dyn Fn(DType) -> u64,
    slots: Vec<Slot>,
    positions: Vec<(u32, usize)>,
    live: u64,
    peak: u64,
    intermediates: u64,
    live_peak: u64,
    /// Per micro-batch, the slot of each value it holds.
    stores: HashMap<u32, SecondaryMap<ValueId, Option<usize>>>,
    /// The slot of each value's sum over the micro-batches (the first micro-batch's buffer,
    /// which the others are added into).
    sums: HashMap<ValueId, usize>,
}

impl Walk<'_, '_> {
    /// The position the next step runs at.
    fn now(&self) -> usize {
        self.positions.len()
    }

    /// A new live slot of `bytes` from the next position on.
    fn make(&mut self, value: Option<ValueId>, m: u32, bytes: u64, placed: bool) -> usize {
        self.live += bytes;
        self.intermediates += bytes;
        self.peak = self.peak.max(self.live);
        self.live_peak = self.live_peak.max(self.intermediates);
        self.slots.push(Slot {
            value,
            micro_batch: m,
            bytes,
            offset: 0,
            from: self.now(),
            to: usize::MAX,
            reuses: None,
            placed,
        });
        self.slots.len() - 1
    }

    /// Frees slot `s` after position `at`.
    fn free(&mut self, s: usize, at: usize) {
        self.live -= self.slots[s].bytes;
        self.intermediates -= self.slots[s].bytes;
        self.slots[s].to = at;
    }

    /// Runs the stage's steps of model chunk `chunk` in `range` on micro-batch `m`, as
    /// [`crate::rank`]'s walk does.
    fn steps(&mut self, m: u32, range: std::ops::Range<usize>, chunk: u32) {
        let exe = self.exe;
        let plan = exe.plan;
        let g = &plan.graph;
        let stage = self.stage;
        let mut store = self.stores.remove(&m).unwrap_or_default();
        for i in range {
            if exe.stage_of[i] != stage || exe.chunk_of[i] != chunk {
                continue;
            }
            let step = &exe.program.steps[i];
            let node = &g.nodes[step.node];
            let t = self.now();
            // What another stage sends arrives just before its first reader.
            for v in step.inputs(plan) {
                if store[v].is_none() && exe.receives(stage, v) {
                    store[v] = Some(self.make(Some(v), m, (self.size)(v), false));
                }
            }
            // A value the step may take over or free: the stage's own, read for the last
            // time, not kept.
            let owned = |v: ValueId, store: &SecondaryMap<ValueId, Option<usize>>| {
                store[v].is_some() && exe.is_last_use(stage, v, i) && !exe.keep[v]
            };
            let outputs = step.outputs(plan);
            // The input whose buffer the output takes over, as the rank program decides.
            let reused = match (&step.op, exe.late_add(step.node)) {
                (_, Some(late)) => Some(late.other).filter(|&x| owned(x, &store)),
                (StepOp::Node, None) => match &node.op {
                    Op::Reshape { x, .. }
                    | Op::F { x, .. }
                    | Op::G { x, .. }
                    | Op::AllReduce { x, .. }
                        if owned(*x, &store) =>
                    {
                        Some(*x)
                    }
                    Op::Add(a, b) if a != b => {
                        let out = g.ty(outputs[0]);
                        let whole = |v: ValueId| {
                            g.ty(v).shape == out.shape
                                && g.ty(v).dtype == out.dtype
                                && !exe.receives_any(stage, v)
                        };
                        if !(whole(*a) && whole(*b)) {
                            None
                        } else if owned(*a, &store) {
                            Some(*a)
                        } else if owned(*b, &store) {
                            Some(*b)
                        } else {
                            None
                        }
                    }
                    _ => None,
                },
                (
                    StepOp::Fused {
                        op: Fused::EmbeddingGradAdd { acc, .. },
                        ..
                    },
                    None,
                ) if owned(*acc, &store) && !exe.receives_any(stage, *acc) => Some(*acc),
                (StepOp::Fused { .. }, None) => None,
            };
            // What the step holds while it runs (a fused output layer's chunks), before its
            // outputs: the outputs are made in it, their own slots start here.
            let scratch = exe.program.scratch_bytes(plan, i, self.element_bytes);
            if scratch > 0 {
                self.peak = self.peak.max(self.live + scratch);
                self.live_peak = self.live_peak.max(self.intermediates + scratch);
                let made: u64 = outputs.iter().map(|&v| (self.size)(v)).sum();
                self.slots.push(Slot {
                    value: None,
                    micro_batch: m,
                    bytes: scratch.saturating_sub(made),
                    offset: 0,
                    from: t,
                    to: t,
                    reuses: None,
                    placed: true,
                });
            }
            let taken = reused.and_then(|x| store[x].take());
            if let Some(x) = taken {
                self.free(x, t);
            }
            for (k, &v) in outputs.iter().enumerate() {
                let from = if k == 0 { taken } else { None };
                // A value sent on and not read here any more lives on in the receiver.
                let needed_here = exe.keep[v] || exe.is_read_after(stage, v, i);
                let sent = exe.sends(stage, v) && !needed_here;
                let placed = !sent && from.is_none_or(|x| self.slots[x].placed);
                if sent {
                    // The buffer it took over leaves with it: none of its chain is placed.
                    let mut chain = from;
                    while let Some(x) = chain {
                        self.slots[x].placed = false;
                        chain = self.slots[x].reuses;
                    }
                }
                let s = self.make(Some(v), m, (self.size)(v), placed);
                if let Some(x) = from {
                    self.slots[s].reuses = Some(x);
                    self.slots[s].from = self.slots[x].from;
                }
                if sent {
                    self.free(s, t);
                } else if exe.sums_now(stage, v, i) {
                    self.add_to_sum(v, s, t);
                } else {
                    store[v] = Some(s);
                }
            }
            // Free what no later step of this stage reads (unless kept).
            for v in step.inputs(plan) {
                if exe.is_last_use(stage, v, i) && !exe.keep[v] {
                    if let Some(s) = store[v].take() {
                        self.free(s, t);
                    }
                }
            }
            for &v in outputs {
                if !exe.keep[v] && !exe.is_read_after(stage, v, i) {
                    if let Some(s) = store[v].take() {
                        self.free(s, t);
                    }
                }
            }
            self.positions.push((m, i));
        }
        self.stores.insert(m, store);
    }

    /// Adds slot `s` (micro-batch's value of `v`, made at position `at`) into `v`'s sum over
    /// the micro-batches, in place: the first becomes the sum.
    fn add_to_sum(&mut self, v: ValueId, s: usize, at: usize) {
        match self.sums.get(&v) {
            Some(_) => self.free(s, at),
            None => {
                self.sums.insert(v, s);
            }
        }
    }

    /// Micro-batch `m` done: what is not kept is freed; with several micro-batches the loss
    /// is read and freed, the gradients go into their sums and the outputs stay.
    fn keep(&mut self, m: u32) {
        let exe = self.exe;
        let several = exe.plan.micro_batches() > 1;
        let at = self.now().saturating_sub(1);
        let Some(store) = self.stores.remove(&m) else {
            return;
        };
        for (v, s) in store.iter() {
            let Some(s) = *s else { continue };
            if !exe.keep[v] || (several && v == exe.plan.loss) {
                self.free(s, at);
            } else if several && exe.accumulate[v] {
                self.add_to_sum(v, s, at);
            }
        }
    }
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
    // union of theirs. Slots not in the arena take no part.
    let mut root: Vec<usize> = (0..slots.len()).collect();
    for k in 0..slots.len() {
        if let Some(from) = slots[k].reuses {
            root[k] = root[from];
        }
    }
    let mut buffers: std::collections::BTreeMap<usize, (u64, usize, usize)> = Default::default();
    for (k, s) in slots.iter().enumerate().filter(|(_, s)| s.placed) {
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
        s.offset = offset_of.get(&root[k]).copied().unwrap_or(0);
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
