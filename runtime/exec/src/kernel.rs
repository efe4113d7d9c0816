//! What every backend's kernels share: the error a kernel returns, where a rank's tensors sit in
//! the full ones ([`Placement`], for the few ops whose result depends on it), the shard of the
//! classes a vocabulary-parallel cross-entropy holds ([`VocabShard`]), and the argument checks
//! and host arithmetic whose results must read the same on every backend (the same error for the
//! same bad shapes, the same loss from the same statistics).

use ferrotron_ir::index;

/// Why a kernel cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum KernelError {
    /// Inputs or attributes the op is not defined on: shapes that do not fit, a bad dimension, a
    /// tensor whose data does not fill its shape, a bad probability.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// An index (an embedding id, a class target) that is not an integer in its range.
    #[error("{op}: {what} {value} (element {element}) is not an integer in 0..{bound}")]
    Index {
        op: &'static str,
        what: &'static str,
        value: f32,
        element: usize,
        bound: usize,
    },
    /// A collective or `LocalSlice`: the rank program runs those.
    #[error("{op} is not a local computation: the executor runs it")]
    NotLocal { op: &'static str },
    /// The device failed to run the op (a driver, library or launch error).
    #[error("{op}: on the device: {msg}")]
    Device { op: &'static str, msg: String },
}

/// A [`KernelError::Invalid`] of `op`.
pub fn invalid(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Invalid {
        op,
        msg: msg.into(),
    }
}

/// An integer index held in an `f32` (an embedding id, a class target), checked to be in
/// `0..bound`; `element` is its position in its tensor, for the message.
pub fn checked_index(
    op: &'static str,
    what: &'static str,
    value: f32,
    element: usize,
    bound: usize,
) -> Result<usize, KernelError> {
    index::integer(value as f64, bound).ok_or(KernelError::Index {
        op,
        what,
        value,
        element,
        bound,
    })
}

/// A shape check's message from [`ferrotron_ir::index`] as a [`KernelError::Invalid`] of `op`.
pub trait OrInvalid<T> {
    /// The value, or the message as `op`'s error.
    fn or_invalid(self, op: &'static str) -> Result<T, KernelError>;
}

impl<T> OrInvalid<T> for Result<T, String> {
    fn or_invalid(self, op: &'static str) -> Result<T, KernelError> {
        self.map_err(|msg| invalid(op, msg))
    }
}

/// Where this rank's tensors sit in the full ones, for the ops whose result depends on it.
/// `Placement::default()` describes an unpartitioned run.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// Embedding / EmbeddingGrad with a vocabulary-parallel table: the first full-table row this
    /// rank holds. Ids outside `[offset, offset + local rows)` look up zero rows (Embedding) or
    /// scatter nothing (EmbeddingGrad). A non-zero offset marks the table vocabulary-parallel.
    pub vocab_offset: usize,
    /// Embedding / EmbeddingGrad: `Some(full table rows)` marks the table vocabulary-parallel
    /// (needed on the rank whose offset is 0) and bounds the ids; `None` with offset 0: the
    /// table is whole and every id must index it.
    pub vocab_rows: Option<usize>,
    /// Dropout / DropoutGrad: the full shape of the value, so that a shard's element masks are
    /// those of the full tensor. `None`: the local tensor is the full one.
    pub full_shape: Option<Vec<usize>>,
    /// This shard's offset along each dimension of [`Placement::full_shape`] (all zero when
    /// `None`). Rotary also reads it: positions start at the offset along dimension −3.
    pub offsets: Option<Vec<usize>>,
    /// Dropout / DropoutGrad: the element at flat full-tensor index `i` is kept iff
    /// `dropout_keeps(i.wrapping_add(dropout_seed.wrapping_mul(1 << 40)), p)`
    /// ([`ferrotron_ir::reference::dropout_keeps`]); 0 reproduces the reference evaluator.
    pub dropout_seed: u64,
    /// CrossEntropy / CrossEntropyGrad: the number of equal token shards the mean spans (the
    /// data-parallel degree when the tokens are split over dp): the mean divides by local
    /// predicting positions × token_parts. 0 and 1 mean a plain mean.
    pub token_parts: usize,
}

impl Placement {
    /// [`Placement::token_parts`], at least 1.
    pub fn n_token_parts(&self) -> usize {
        self.token_parts.max(1)
    }
}

/// What one rank holds of a vocabulary-parallel cross-entropy's classes, and how its mean is
/// taken: the phases of [`crate::Backend::ce_row_max`], [`crate::Backend::ce_row_sums`] and
/// [`crate::Backend::ce_grad`] all read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabShard {
    /// The full class index of this rank's first local class.
    pub class_offset: usize,
    /// Classes below this are real; the rest are vocabulary padding, excluded everywhere.
    pub real_classes: usize,
    /// Next-token prediction: row `t` of each sequence uses target `t + 1`, and the last
    /// position of each sequence predicts nothing.
    pub shift: bool,
    /// As [`Placement::token_parts`].
    pub token_parts: usize,
    /// `None`: the logits are every row. `Some`: they are a window of consecutive rows of
    /// larger logits (a chunk of a fused output layer, [`crate::fuse::Fused::OutputLoss`]):
    /// targets, sequence positions and the mean are those of the full rows.
    pub window: Option<RowWindow>,
}

/// Rows `first..first + n` of logits with `total` rows of sequences of `seq`, where `n` is the
/// window's own logits' leading size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowWindow {
    /// The full row of the window's row 0.
    pub first: usize,
    /// The full logits' rows (the product of their leading dimensions).
    pub total: usize,
    /// The full logits' sequence length (their dimension −2).
    pub seq: usize,
}

impl VocabShard {
    /// The number of this rank's real classes among its `vocab` local ones.
    pub fn local_real(&self, vocab: usize) -> usize {
        self.real_classes
            .saturating_sub(self.class_offset)
            .min(vocab)
    }
}

/// A bias (of shape `bias`) must be a vector along the last dimension of `x` (a shape of rank
/// ≥ 2).
pub fn check_bias(name: &'static str, x: &[usize], bias: &[usize]) -> Result<(), KernelError> {
    match x.last() {
        Some(&n) if x.len() >= 2 && bias == [n] => Ok(()),
        _ => Err(invalid(
            name,
            format!(
                "the bias has shape {:?}, expected [{}] (the last axis of the input {:?})",
                bias,
                x.last().copied().unwrap_or(0),
                x
            ),
        )),
    }
}

/// An embedding table's `(rows, width)` as this rank holds it, the first full-table id it holds
/// and the bound every id must respect.
pub struct Table {
    /// Local rows.
    pub rows: usize,
    /// Row width.
    pub width: usize,
    /// The full-table id of local row 0.
    pub offset: usize,
    /// Ids must be below this.
    pub bound: usize,
}

impl Table {
    /// The local row of an id, or `None` when another rank holds it.
    pub fn local_row(
        &self,
        name: &'static str,
        id: f32,
        element: usize,
    ) -> Result<Option<usize>, KernelError> {
        let id = checked_index(name, "id", id, element, self.bound)?;
        Ok(id.checked_sub(self.offset).filter(|&r| r < self.rows))
    }
}

/// The table of shape `table` as this rank holds it (`at`'s vocabulary offset and rows).
pub fn table_of(name: &'static str, table: &[usize], at: &Placement) -> Result<Table, KernelError> {
    let (rows, width) = index::embedding_table(table).or_invalid(name)?;
    let offset = at.vocab_offset;
    let end = offset
        .checked_add(rows)
        .ok_or_else(|| invalid(name, "the vocabulary offset overflows"))?;
    let bound = match at.vocab_rows {
        Some(full) if end > full => {
            return Err(invalid(
                name,
                format!("rows {offset}..{end} of the table lie outside its {full} rows"),
            ))
        }
        Some(full) => full,
        None if offset > 0 => 1 << 24, // ids are exact in f32 up to here
        None => rows,
    };
    Ok(Table {
        rows,
        width,
        offset,
        bound,
    })
}

/// `(rows, seq)` of logits `[..., seq, vocab]`.
pub fn ce_rows(name: &'static str, shape: &[usize]) -> Result<(usize, usize), KernelError> {
    if shape.len() < 2 {
        return Err(invalid(
            name,
            format!("the logits ([..., seq, vocab]) must have rank at least 2, found {shape:?}"),
        ));
    }
    let r = shape.len();
    let rows = shape[..r - 1]
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(s))
        .ok_or_else(|| invalid(name, format!("the logits {shape:?} are too large")))?;
    Ok((rows, shape[r - 2]))
}

/// Where row `row`'s target is (`None`: the row predicts nothing).
pub fn target_of(row: usize, seq: usize, shift: bool) -> Option<usize> {
    if !shift {
        Some(row)
    } else if row % seq + 1 == seq {
        None
    } else {
        Some(row + 1)
    }
}

/// A cross-entropy call's rows: its logits' own rows, and where they sit in the full logits
/// (all of them unless the shard has a [`RowWindow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeRows {
    /// The rows of the call's logits.
    pub rows: usize,
    /// The full row of row 0.
    pub first: usize,
    /// The full logits' rows: targets are read and the mean taken over these.
    pub total: usize,
    /// The full logits' sequence length.
    pub seq: usize,
}

impl CeRows {
    /// Where local row `row`'s target is in the full targets (`None`: it predicts nothing).
    pub fn target_of(&self, row: usize, shift: bool) -> Option<usize> {
        target_of(self.first + row, self.seq, shift)
    }
}

/// The rows of logits shaped `logits_shape` under `shard`, checked: a window must lie inside
/// its full rows and have their sequence length dividing them.
pub fn ce_rows_of(
    name: &'static str,
    logits_shape: &[usize],
    shard: &VocabShard,
) -> Result<CeRows, KernelError> {
    let (rows, seq) = ce_rows(name, logits_shape)?;
    let Some(w) = shard.window else {
        return Ok(CeRows {
            rows,
            first: 0,
            total: rows,
            seq,
        });
    };
    if w.seq == 0 || w.total % w.seq != 0 || w.first.checked_add(rows).is_none_or(|e| e > w.total) {
        return Err(invalid(
            name,
            format!(
                "rows {}..{} of {} rows of sequences of {}: not a window of whole sequences' rows",
                w.first,
                w.first.saturating_add(rows),
                w.total,
                w.seq
            ),
        ));
    }
    Ok(CeRows {
        rows,
        first: w.first,
        total: w.total,
        seq: w.seq,
    })
}

/// The targets must index every full row: the logits' leading shape, or for a window,
/// `[..., seq]` with the full rows.
pub fn check_targets_shape(
    name: &'static str,
    targets: &[usize],
    logits_shape: &[usize],
    rows: &CeRows,
    shard: &VocabShard,
) -> Result<(), KernelError> {
    if shard.window.is_none() {
        let r = logits_shape.len();
        return index::same_shape("the targets", &logits_shape[..r - 1], targets).or_invalid(name);
    }
    let n = targets.iter().try_fold(1usize, |n, &s| n.checked_mul(s));
    if n != Some(rows.total) || targets.last() != Some(&rows.seq) {
        return Err(invalid(
            name,
            format!(
                "the targets have shape {targets:?}, expected [..., {}] with {} elements (the full \
                 rows of the window)",
                rows.seq, rows.total
            ),
        ));
    }
    Ok(())
}

/// The number of positions a cross-entropy mean divides by on this rank (its predicting rows),
/// checked to be non-zero, with `token_parts` checked too.
pub fn mean_count(
    name: &'static str,
    (rows, seq): (usize, usize),
    shift: bool,
    token_parts: usize,
    logits_shape: &[usize],
) -> Result<usize, KernelError> {
    if token_parts == 0 {
        return Err(invalid(name, "token_parts must be at least 1"));
    }
    let count = if shift && seq > 0 {
        rows - rows / seq
    } else {
        rows
    };
    if count == 0 {
        return Err(invalid(
            name,
            format!(
                "no position predicts a target (logits {logits_shape:?}, shift {shift}): no mean"
            ),
        ));
    }
    Ok(count)
}

/// A cross-entropy's per-row statistics, reduced over the vocabulary-parallel group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowStats {
    /// Each row's max over the real classes.
    pub max: Vec<f32>,
    /// Each row's `Σ exp(logit − max)` over the real classes.
    pub sum: Vec<f32>,
    /// Each row's target logit (0 where the row predicts nothing).
    pub target: Vec<f32>,
}

/// [`RowStats`] as a backend's `f32` tensors, kept where it computes (on the device for a GPU,
/// so that a step needs no host round trip for them), in the two tensors the group reduces.
#[derive(Clone, Debug, PartialEq)]
pub struct CeStats<T> {
    /// Each row's max: `[rows]`, reduced by max.
    pub max: T,
    /// Each row's `Σ exp(logit − max)`, then each row's target logit: `[2, rows]`, reduced by
    /// sum.
    pub sums: T,
}

impl RowStats {
    /// The statistics of host [`CeStats`]: `max` `[rows]` and `sums` `[2, rows]`.
    pub fn of(max: &[f32], sums: &[f32]) -> RowStats {
        let (sum, target) = sums.split_at(sums.len() / 2);
        RowStats {
            max: max.to_vec(),
            sum: sum.to_vec(),
            target: target.to_vec(),
        }
    }
}

/// The loss from the group-reduced statistics: `Σ` over predicting rows of
/// `(ln sum + max − target_logit)`, divided by (predicting rows × `token_parts`). Only the
/// leading dimensions of `logits_shape` are read (a shard's or the full logits' shape will do);
/// for a window of rows ([`VocabShard::window`]) the sum is over its rows and the mean's count
/// that of the full rows, so the windows' losses add up to the whole loss.
pub fn ce_loss(
    stats: &RowStats,
    logits_shape: &[usize],
    shard: &VocabShard,
) -> Result<f32, KernelError> {
    const NAME: &str = "CrossEntropy";
    let RowStats { max, sum, target } = stats;
    let at = ce_rows_of(NAME, logits_shape, shard)?;
    let rows = at.rows;
    if max.len() != rows || sum.len() != rows || target.len() != rows {
        return Err(invalid(
            NAME,
            format!(
                "{} maxima, {} sums and {} target logits for {rows} rows",
                max.len(),
                sum.len(),
                target.len()
            ),
        ));
    }
    let (shift, token_parts) = (shard.shift, shard.token_parts);
    let count = mean_count(NAME, (at.total, at.seq), shift, token_parts, logits_shape)?;
    let total: f64 = (0..rows)
        .filter(|&row| at.target_of(row, shift).is_some())
        .map(|row| (sum[row] as f64).ln() + max[row] as f64 - target[row] as f64)
        .sum();
    Ok((total / (count as f64 * token_parts as f64)) as f32)
}

/// The shape of a fused output layer and loss ([`crate::fuse::Fused::OutputLoss`]) on one
/// rank, and how its rows are cut into chunks: the executor's loop and the memory plan both
/// read it, so the plan holds the bytes the loop holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputLossDims {
    /// The rows of the hidden states (and of the logits that are never made whole).
    pub rows: usize,
    /// The hidden size.
    pub hidden: usize,
    /// This rank's classes (the output weight's rows).
    pub vocab: usize,
}

impl OutputLossDims {
    /// A chunk's rows are aimed at no fewer than this: each of its three products packs the
    /// whole output weight again, which fewer rows no longer pay for.
    pub const MIN_CHUNK_ROWS: usize = 128;

    /// The rows of each chunk (the last may have fewer): the rows cut into the fewest chunks of
    /// equal size of at most half the hidden size (at least [`Self::MIN_CHUNK_ROWS`]), so that
    /// a chunk's logits and their gradient (2 × rows × this rank's classes) are no larger than
    /// the weight's gradient (classes × hidden) the step holds anyway; each chunk has more than
    /// half that many rows.
    pub fn chunk_rows(&self) -> usize {
        let target = (self.hidden / 2).max(Self::MIN_CHUNK_ROWS);
        let chunks = self.rows.div_ceil(target).max(1);
        self.rows.div_ceil(chunks).max(1)
    }

    /// The chunks in order: `(first row, rows)`.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let c = self.chunk_rows();
        (0..self.rows)
            .step_by(c)
            .map(move |a| (a, c.min(self.rows - a)))
    }

    /// The most bytes the loop holds at once besides its inputs, with `element_bytes` per
    /// element of the hidden states, weight and logits (the statistics are `f32`), following
    /// its allocations: the hidden states as rows; per chunk its hidden rows, logits and
    /// statistics, then (`grad`) the logits' gradient in their buffer, the chunk's rows of `dh`
    /// and the weight's gradient (made by the first chunk, summed in place after); and the
    /// `dh` chunks made so far; after the loop, those chunks and their concatenation.
    pub fn scratch_bytes(&self, grad: bool, element_bytes: u64) -> u64 {
        let e = element_bytes;
        let (hidden, vocab) = (self.hidden as u64, self.vocab as u64);
        let h_rows = self.rows as u64 * hidden * e;
        let dw = vocab * hidden * e;
        let mut most = h_rows;
        for (k, (a, c)) in self.chunks().enumerate() {
            let (a, c) = (a as u64, c as u64);
            let logits = c * vocab * e;
            let held = h_rows + c * hidden * e + 3 * c * 4;
            if !grad {
                most = most.max(held + logits);
                continue;
            }
            // The `dh` chunks so far, and the weight's gradient once the first chunk made it;
            // the logits' gradient takes their buffer ([`crate::Backend::ce_grad_in_place`]).
            let made = a * hidden * e + if k > 0 { dw } else { 0 };
            most = most.max(held + made + logits + c * hidden * e + if k == 0 { dw } else { 0 });
        }
        if grad {
            most = most.max(h_rows + 2 * self.rows as u64 * hidden * e + dw);
        }
        most
    }
}

/// A fused scaled dot-product attention's attributes ([`crate::fuse::Fused::Attention`]), read
/// by both of its passes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// The scores' scale (`1/√head_dim`).
    pub factor: f64,
    /// Causal masking as [`ferrotron_ir::Op::Softmax`]'s: query `i` sees keys
    /// `0..=i + keys − queries`.
    pub causal: bool,
    /// The dropout probability on the attention probabilities (0: none). The mask is the one a
    /// `Dropout` on the probabilities `[..., queries, keys]` draws at the [`Placement`] passed
    /// with it (its `full_shape`, `offsets` and `dropout_seed`), so fused and unfused runs drop
    /// the same elements.
    pub dropout: f64,
    /// The layout of `q`, `k`, `v`, the output and their gradients: `false`, heads first
    /// (`[..., heads, seq, d]`, any leading axes); `true`, sequence first (`[..., seq, heads, d]`,
    /// as the model's projections make them, read and written in place of the transposes to
    /// heads first). The log-sum-exps and the probabilities (their dropout mask) are
    /// `[..., heads, queries(, keys)]` either way.
    pub seq_first: bool,
}

/// The sizes of a fused attention. Heads first: `q` `[..., queries, d]`, `k` `[..., keys, d]`,
/// `v` `[..., keys, dv]`, the leading axes (batch, heads) equal and merged into `batch`. Sequence
/// first: `q` `[..., queries, heads, d]`, `k` `[..., keys, heads, d]`, `v` `[..., keys, heads,
/// dv]`, the axes before the sequence and the heads merged into `batch` (entry `b · heads + h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// The attention's independent entries: the product of the leading axes and the heads.
    pub batch: usize,
    /// Query rows per batch entry.
    pub queries: usize,
    /// Key (and value) rows per batch entry.
    pub keys: usize,
    /// The query and key width.
    pub d: usize,
    /// The value width (the output's).
    pub dv: usize,
    /// The heads interleaved with the sequence (sequence first), or 1 (heads first).
    pub heads: usize,
}

/// Checks a fused attention's operand shapes (and its spec) and returns its sizes: the same
/// error on every backend for the same bad shapes.
pub fn attention_dims(
    name: &'static str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
    spec: &AttentionSpec,
) -> Result<AttentionDims, KernelError> {
    let r = q.len();
    // Sequence first: the axis after the sequence (the heads) must agree too.
    let (min_rank, seq_axis) = if spec.seq_first {
        (3, r.wrapping_sub(3))
    } else {
        (2, r.wrapping_sub(2))
    };
    let same_lead = |x: &[usize]| {
        x.len() == r && x[..seq_axis] == q[..seq_axis] && (!spec.seq_first || x[r - 2] == q[r - 2])
    };
    if r < min_rank || !same_lead(k) || !same_lead(v) {
        let layout = if spec.seq_first {
            "[..., queries, heads, d], [..., keys, heads, d] and [..., keys, heads, dv]"
        } else {
            "[..., queries, d], [..., keys, d] and [..., keys, dv]"
        };
        return Err(invalid(
            name,
            format!("q {q:?}, k {k:?} and v {v:?} must be {layout} with the same leading axes"),
        ));
    }
    let heads = if spec.seq_first { q[r - 2] } else { 1 };
    let dims = AttentionDims {
        batch: q[..seq_axis].iter().product::<usize>() * heads,
        queries: q[seq_axis],
        keys: k[seq_axis],
        d: q[r - 1],
        dv: v[r - 1],
        heads,
    };
    if k[r - 1] != dims.d || v[seq_axis] != dims.keys {
        return Err(invalid(
            name,
            format!("q {q:?} and k {k:?} must have one width, k {k:?} and v {v:?} one length"),
        ));
    }
    if spec.causal && dims.queries > dims.keys {
        return Err(invalid(
            name,
            format!(
                "a causal attention needs at least as many keys as queries, found q {q:?}, k {k:?}"
            ),
        ));
    }
    if !spec.factor.is_finite() {
        return Err(invalid(
            name,
            format!("the scale {} is not finite", spec.factor),
        ));
    }
    index::dropout_scale(spec.dropout).or_invalid(name)?;
    Ok(dims)
}

impl AttentionDims {
    /// Where batch entry `b`'s rows of a `width`-wide operand (`q`, `k`, `v`, the output or a
    /// gradient) of `rows` rows per entry sit in its buffer: `(offset of row 0, distance
    /// between rows)`. Heads first, the rows follow each other; sequence first, a row's heads
    /// lie between it and the next.
    pub fn rows_of(&self, b: usize, rows: usize, width: usize) -> (usize, usize) {
        let (outer, head) = (b / self.heads, b % self.heads);
        (
            outer * rows * self.heads * width + head * width,
            self.heads * width,
        )
    }

    /// The shape of the probabilities `[..., heads, queries, keys]` (their dropout mask's
    /// tensor) of an attention whose queries have shape `q`.
    pub fn probs_shape(&self, q: &[usize], seq_first: bool) -> Vec<usize> {
        let r = q.len();
        let lead = if seq_first {
            [&q[..r - 3], &[q[r - 2]][..]].concat()
        } else {
            q[..r - 2].to_vec()
        };
        [&lead[..], &[self.queries, self.keys]].concat()
    }

    /// The keys query row `i` sees: `0..visible(i)` (all of them unless causal).
    pub fn visible(&self, i: usize, causal: bool) -> usize {
        if causal {
            i + 1 + self.keys - self.queries
        } else {
            self.keys
        }
    }
}

/// What a fused attention's backward reads ([`crate::Backend::attention_grad`]): the forward's
/// operands, its output and row log-sum-exps, and the output's gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSaved<T> {
    /// The queries `[..., queries, d]`.
    pub q: T,
    /// The keys `[..., keys, d]`.
    pub k: T,
    /// The values `[..., keys, dv]`.
    pub v: T,
    /// The forward's output `[..., queries, dv]`.
    pub out: T,
    /// The forward's row log-sum-exps of the scaled scores, `f32` `[..., queries]`.
    pub lse: T,
    /// The gradient of the output, `[..., queries, dv]`.
    pub dout: T,
}
