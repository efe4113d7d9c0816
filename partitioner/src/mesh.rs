//! The device mesh and shard geometry: the one place that knows which part of a full tensor a
//! rank holds.
//!
//! ```text
//! rank ◄──► Coord { tp, dp, pp }          (tp fastest, then dp, then pp: Megatron's numbering)
//! full shape + MeshLayout + blocks + Coord ─► Region: per dimension, the full-index ranges held
//! Region ─► extract (full → local), place (local → full); assemble (every rank → full)
//!        ─► clipped (the part inside the unpadded tensor) ─► runs (flat ranges: a file's reads)
//! ```
//!
//! Everything that moves data between full tensors and shards asks here: the executor (weights,
//! batches, dropout offsets, vocabulary offsets, gathering results), the `f64` plan simulator,
//! checkpoints and resharding, the Hugging Face loader (each rank's shard read from the file),
//! verification, the viewer's rank slices. A split along a dimension gives rank `r` of the group
//! the `r`-th of equal contiguous parts; a split of a fused weight cut into blocks (q|k|v) gives
//! it the `r`-th part of every block; a data-parallel split is taken first and the
//! tensor-parallel split within it. Partial and replicated layouts hold the
//! whole extent on every rank. The pipeline axis splits no tensor: the ranks of one stage hold
//! its part of the program (see [`crate::pipeline`]), and the tp and dp groups are those of one
//! stage.

use crate::layout::{Layout, MeshLayout};
use ferrotron_ir::MeshAxis;
use serde::{Deserialize, Serialize};
use std::ops::{AddAssign, Range};

/// The mesh of ranks: `tp × dp × pp`, numbered tensor-parallel index fastest, then
/// data-parallel, then pipeline stage (as Megatron numbers them: a stage's ranks are
/// consecutive, so a tensor-parallel group sits within one node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: u64,
}

fn one() -> u64 {
    1
}

/// A rank's position on every mesh axis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Coord {
    /// Index in the tensor-parallel group.
    pub tp: usize,
    /// Index in the data-parallel group.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
}

impl Coord {
    /// The index along `axis`.
    pub fn on(&self, axis: MeshAxis) -> usize {
        match axis {
            MeshAxis::Tp => self.tp,
            MeshAxis::Dp => self.dp,
        }
    }
}

impl std::fmt::Display for Coord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tp {}, dp {}", self.tp, self.dp)?;
        if self.pp > 0 {
            write!(f, ", pp {}", self.pp)?;
        }
        Ok(())
    }
}

impl Mesh {
    /// The axes a tensor is laid out over and collectives run over, from fastest-varying to
    /// slowest in the rank numbering (the pipeline axis comes after them).
    pub const AXES: [MeshAxis; 2] = [MeshAxis::Tp, MeshAxis::Dp];

    /// A `tp × dp` mesh of one stage.
    pub fn new(tp: u64, dp: u64) -> Mesh {
        Mesh { tp, dp, pp: 1 }
    }

    /// Ranks along `axis`.
    pub fn size(&self, axis: MeshAxis) -> u64 {
        match axis {
            MeshAxis::Tp => self.tp,
            MeshAxis::Dp => self.dp,
        }
    }

    /// Ranks in one stage: `tp × dp`.
    pub fn stage_ranks(&self) -> usize {
        Self::AXES.iter().map(|&a| self.size(a) as usize).product()
    }

    /// Ranks in the whole mesh.
    pub fn ranks(&self) -> usize {
        self.stage_ranks() * self.pp.max(1) as usize
    }

    /// Rank `rank`'s coordinates.
    pub fn coord(&self, rank: usize) -> Coord {
        let (tp, dp) = (self.tp.max(1) as usize, self.dp.max(1) as usize);
        Coord {
            tp: rank % tp,
            dp: rank / tp % dp,
            pp: rank / (tp * dp),
        }
    }

    /// The rank at `c`.
    pub fn rank(&self, c: Coord) -> usize {
        c.tp + self.tp as usize * (c.dp + self.dp as usize * c.pp)
    }

    /// Every rank's coordinates, in rank order.
    pub fn coords(&self) -> impl Iterator<Item = Coord> + '_ {
        (0..self.ranks()).map(|r| self.coord(r))
    }

    /// The ranks of `axis`'s group through `c`, by their index in the group.
    pub fn group(&self, axis: MeshAxis, c: Coord) -> Vec<usize> {
        (0..self.size(axis) as usize)
            .map(|i| {
                let mut member = c;
                match axis {
                    MeshAxis::Tp => member.tp = i,
                    MeshAxis::Dp => member.dp = i,
                }
                self.rank(member)
            })
            .collect()
    }

    /// Which of `axis`'s groups `c` belongs to, as a name unique in the mesh (`tp/dp0`: the
    /// tensor-parallel group of data-parallel replica 0; `tp/dp0/pp1` in stage 1); processes
    /// meet their groups by it.
    pub fn group_name(&self, axis: MeshAxis, c: Coord) -> String {
        let name = match axis {
            MeshAxis::Tp => format!("tp/dp{}", c.dp),
            MeshAxis::Dp => format!("dp/tp{}", c.tp),
        };
        if self.pp > 1 {
            format!("{name}/pp{}", c.pp)
        } else {
            name
        }
    }

    /// The rank of stage `pp` at the same tensor- and data-parallel place as `c`: the peer `c`
    /// sends a stage boundary to or receives one from.
    pub fn peer(&self, c: Coord, pp: usize) -> usize {
        self.rank(Coord { pp, ..c })
    }

    /// The full (unpartitioned) shape of a value whose local shape is `local`.
    pub fn global_sizes(&self, local: &[u64], layout: MeshLayout) -> Vec<u64> {
        let mut sizes = local.to_vec();
        for axis in Self::AXES {
            if let Layout::Split(d) = layout.on(axis) {
                if let Some(s) = sizes.get_mut(d) {
                    *s *= self.size(axis);
                }
            }
        }
        sizes
    }

    /// The shape each rank holds of a value whose full shape is `full`.
    pub fn local_sizes(&self, full: &[u64], layout: MeshLayout) -> Vec<u64> {
        let mut sizes = full.to_vec();
        for axis in Self::AXES {
            if let Layout::Split(d) = layout.on(axis) {
                if let Some(s) = sizes.get_mut(d) {
                    *s /= self.size(axis).max(1);
                }
            }
        }
        sizes
    }
}

/// Part `index` of `parts` equal contiguous parts of `0..size` (what a rank holds of a split
/// dimension, or takes in a local slice).
pub fn part(size: usize, parts: usize, index: usize) -> Range<usize> {
    let len = size / parts.max(1);
    index * len..(index + 1) * len
}

/// Share `index` of `parts` of a flattened tensor of `n` elements, as the distributed optimizer
/// cuts it: the tensor zero-padded to a multiple of `parts`, then cut into equal contiguous
/// shares of `n.div_ceil(parts)`; the range is the real elements the share covers (shorter than
/// the share, or empty, at the end).
pub fn flat_share(n: usize, parts: usize, index: usize) -> Range<usize> {
    let len = n.div_ceil(parts.max(1));
    (index * len).min(n)..((index + 1) * len).min(n)
}

/// The part of a full tensor one rank holds: for each dimension, the ranges of full indices it
/// holds, in the order they are laid out locally (a local tensor is their product).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    dims: Vec<Vec<Range<usize>>>,
}

impl Region {
    /// The whole of a tensor of shape `full`.
    pub fn whole(full: &[usize]) -> Region {
        Region {
            dims: full
                .iter()
                .map(|&s| std::iter::once(0..s).collect())
                .collect(),
        }
    }

    /// What the rank at `c` of `mesh` holds of a tensor of full shape `full` laid out as
    /// `layout`, whose tensor-parallel split dimension is cut into `blocks` blocks (3 for a
    /// fused q|k|v weight, 1 otherwise).
    pub fn of(full: &[usize], layout: MeshLayout, blocks: u32, mesh: Mesh, c: Coord) -> Region {
        let mut region = Region::whole(full);
        if let Layout::Split(d) = layout.dp {
            region.split(d, 1, mesh.dp as usize, c.dp);
        }
        if let Layout::Split(d) = layout.tp {
            region.split(d, blocks.max(1) as usize, mesh.tp as usize, c.tp);
        }
        region
    }

    /// Part `index` of `parts` equal contiguous parts along dimension `dim` of a tensor of shape
    /// `full`: what a member of a group of `parts` takes in a local slice, keeps after a
    /// reduce-scatter, or contributes to an all-gather.
    pub fn part(full: &[usize], dim: usize, parts: usize, index: usize) -> Region {
        let mut region = Region::whole(full);
        region.split(dim, 1, parts, index);
        region
    }

    /// The part of a tensor of shape `full` holding `ranges` of dimension `dim` (in that order)
    /// and all of every other dimension: a shard as a checkpoint's metadata lists it.
    pub fn along(full: &[usize], dim: usize, ranges: Vec<Range<usize>>) -> Region {
        let mut region = Region::whole(full);
        if let Some(d) = region.dims.get_mut(dim) {
            *d = ranges;
        }
        region
    }

    /// Keeps, of dimension `d` cut into `blocks` equal blocks, part `index` of `parts` of each.
    fn split(&mut self, d: usize, blocks: usize, parts: usize, index: usize) {
        let Some(ranges) = self.dims.get(d) else {
            return;
        };
        let len: usize = ranges.iter().map(|r| r.len()).sum();
        let block = len / blocks;
        let kept = (0..blocks)
            .flat_map(|b| {
                let p = part(block, parts, index);
                sub_ranges(ranges, b * block + p.start..b * block + p.end)
            })
            .collect();
        self.dims[d] = kept;
    }

    /// The ranges of dimension `d`.
    pub fn dim(&self, d: usize) -> &[Range<usize>] {
        &self.dims[d]
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The local tensor's shape.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .map(|rs| rs.iter().map(|r| r.len()).sum())
            .collect()
    }

    /// Where the local tensor starts in the full one, along each dimension.
    pub fn offsets(&self) -> Vec<usize> {
        self.dims
            .iter()
            .map(|rs| rs.first().map_or(0, |r| r.start))
            .collect()
    }

    /// Whether the local tensor is one box of the full one (no dimension in blocks), so that
    /// [`Region::offsets`] place it.
    pub fn is_box(&self) -> bool {
        self.dims.iter().all(|rs| rs.len() <= 1)
    }

    /// The part of this region that lies inside a tensor of shape `shape` (same rank): each
    /// dimension's ranges intersected with `0..shape[d]`, the empty ones dropped. Over a
    /// vocabulary-padded full shape, clipped at the model's shape, it is what a checkpoint (which
    /// has no padding) holds of a rank's shard. The ranges of [`Region::of`] increase along each
    /// dimension, so what clipping removes is the end of each local dimension: the clipped local
    /// tensor is the leading corner of the local one, and `Tensor::padded` to [`Region::shape`]
    /// restores the padding as zeros.
    pub fn clipped(&self, shape: &[usize]) -> Region {
        let dims = self
            .dims
            .iter()
            .enumerate()
            .map(|(d, rs)| {
                let size = shape.get(d).copied().unwrap_or(0);
                rs.iter()
                    .filter(|r| r.start < size)
                    .map(|r| r.start..r.end.min(size))
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .collect();
        Region { dims }
    }

    /// The contiguous runs of the row-major full tensor of shape `full_shape` the region covers,
    /// as flat element ranges in local order: the local tensor is their concatenation, so a
    /// reader of a file can fetch a shard with one read per run (adjacent runs merged).
    pub fn runs(&self, full_shape: &[usize]) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        self.visit(full_shape, &mut |at, len| match out.last_mut() {
            Some(last) if last.end == at => last.end += len,
            _ if len > 0 => out.push(at..at + len),
            _ => {}
        });
        out
    }

    /// The local tensor cut out of `full` (row-major, of shape `full_shape`).
    pub fn extract<T: Copy>(&self, full: &[T], full_shape: &[usize]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.shape().iter().product());
        self.visit(full_shape, &mut |at, len| {
            out.extend_from_slice(&full[at..at + len])
        });
        out
    }

    /// [`Region::extract`] into `out`, which holds exactly the local tensor's elements.
    pub fn extract_into<T: Copy>(&self, full: &[T], full_shape: &[usize], out: &mut [T]) {
        let mut to = 0;
        self.visit(full_shape, &mut |at, len| {
            out[to..to + len].copy_from_slice(&full[at..at + len]);
            to += len;
        });
    }

    /// Writes `local` into `full` (row-major, of shape `full_shape`) at this region.
    pub fn place<T: Copy>(&self, local: &[T], full: &mut [T], full_shape: &[usize]) {
        let mut from = 0;
        self.visit(full_shape, &mut |at, len| {
            full[at..at + len].copy_from_slice(&local[from..from + len]);
            from += len;
        });
    }

    /// Adds `local` into `full` at this region.
    fn add<T: Copy + AddAssign>(&self, local: &[T], full: &mut [T], full_shape: &[usize]) {
        let mut from = 0;
        self.visit(full_shape, &mut |at, len| {
            for (x, &y) in full[at..at + len].iter_mut().zip(&local[from..from + len]) {
                *x += y;
            }
            from += len;
        });
    }

    /// Whether dimension `d` (of size `size`) is held whole, in order.
    fn holds_all(&self, d: usize, size: usize) -> bool {
        matches!(&self.dims[d][..], [r] if *r == (0..size))
    }

    /// Calls `f(offset, len)` for every contiguous run of the full tensor the region covers, in
    /// local row-major order.
    fn visit(&self, full_shape: &[usize], f: &mut dyn FnMut(usize, usize)) {
        let rank = self.dims.len();
        if rank == 0 {
            f(0, 1);
            return;
        }
        let mut strides = vec![1usize; rank];
        for d in (0..rank - 1).rev() {
            strides[d] = strides[d + 1] * full_shape[d + 1];
        }
        // Trailing dimensions held whole are copied as one run with the last partial one.
        let mut inner = rank - 1;
        while inner > 0 && self.holds_all(inner, full_shape[inner]) {
            inner -= 1;
        }
        let run_unit = strides[inner];
        let walk = |base: usize, f: &mut dyn FnMut(usize, usize)| {
            for r in &self.dims[inner] {
                f(base + r.start * run_unit, r.len() * run_unit);
            }
        };
        // Odometer over the outer dimensions' held indices.
        let outer: Vec<Vec<usize>> = self.dims[..inner]
            .iter()
            .map(|rs| rs.iter().flat_map(|r| r.clone()).collect())
            .collect();
        if outer.iter().any(|ix| ix.is_empty()) {
            return;
        }
        let mut pos = vec![0usize; inner];
        loop {
            let base: usize = (0..inner).map(|d| outer[d][pos[d]] * strides[d]).sum();
            walk(base, f);
            let mut d = inner;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                pos[d] += 1;
                if pos[d] < outer[d].len() {
                    break;
                }
                pos[d] = 0;
            }
        }
    }
}

/// The full-index ranges of local indices `local` of a dimension laid out as `ranges`.
fn sub_ranges(ranges: &[Range<usize>], local: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in ranges {
        let (lo, hi) = (at, at + r.len());
        let (s, e) = (local.start.max(lo), local.end.min(hi));
        if s < e {
            out.push(r.start + (s - lo)..r.start + (e - lo));
        }
        at = hi;
    }
    out
}

/// A full tensor put back together from every rank's part (`parts[rank]`, each laid out as
/// [`Region::of`] says): a split placed at each rank's region, a partial sum added over its
/// group in rank order, a replicated value taken from the group's first rank.
pub fn assemble<T: Copy + Default + AddAssign>(
    mesh: Mesh,
    layout: MeshLayout,
    blocks: u32,
    full_shape: &[usize],
    parts: &[&[T]],
) -> Vec<T> {
    let mut full = vec![T::default(); full_shape.iter().product()];
    let partial = Mesh::AXES.iter().any(|&a| layout.on(a) == Layout::Partial);
    for c in mesh.coords() {
        // A replicated copy, or a partial sum's addend on an axis that is merely replicated,
        // is read once: from index 0 of that axis.
        if Mesh::AXES
            .iter()
            .any(|&a| layout.on(a) == Layout::Replicated && c.on(a) != 0)
        {
            continue;
        }
        let region = Region::of(full_shape, layout, blocks, mesh, c);
        let local = parts[mesh.rank(c)];
        if partial {
            region.add(local, &mut full, full_shape);
        } else {
            region.place(local, &mut full, full_shape);
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(tp: Layout, dp: Layout) -> MeshLayout {
        MeshLayout { tp, dp }
    }

    #[test]
    fn ranks_and_coordinates_round_trip_tp_fastest() {
        let mesh = Mesh::new(3, 2);
        assert_eq!(mesh.ranks(), 6);
        assert_eq!(
            mesh.coord(4),
            Coord {
                tp: 1,
                dp: 1,
                pp: 0
            }
        );
        for r in 0..6 {
            assert_eq!(mesh.rank(mesh.coord(r)), r);
        }
        assert_eq!(mesh.group(MeshAxis::Tp, mesh.coord(4)), vec![3, 4, 5]);
        assert_eq!(mesh.group(MeshAxis::Dp, mesh.coord(4)), vec![1, 4]);
        // Then the stages: tp fastest, then dp, then pp.
        let mesh = Mesh {
            tp: 2,
            dp: 2,
            pp: 3,
        };
        assert_eq!(mesh.ranks(), 12);
        assert_eq!(
            mesh.coord(7),
            Coord {
                tp: 1,
                dp: 1,
                pp: 1
            }
        );
        for r in 0..12 {
            assert_eq!(mesh.rank(mesh.coord(r)), r);
        }
        assert_eq!(mesh.group(MeshAxis::Tp, mesh.coord(7)), vec![6, 7]);
        assert_eq!(mesh.group(MeshAxis::Dp, mesh.coord(7)), vec![5, 7]);
        assert_eq!(mesh.peer(mesh.coord(7), 2), 11);
        assert_eq!(mesh.group_name(MeshAxis::Tp, mesh.coord(7)), "tp/dp1/pp1");
    }

    #[test]
    fn blocks_give_each_rank_its_part_of_every_block() {
        let mesh = Mesh::new(2, 1);
        let full = [4, 12];
        let r = Region::of(
            &full,
            layout(Layout::Split(1), Layout::Replicated),
            3,
            mesh,
            mesh.coord(1),
        );
        assert_eq!(r.dim(1), &[2..4, 6..8, 10..12]);
        assert_eq!(r.shape(), vec![4, 6]);
        assert!(!r.is_box());
    }

    #[test]
    fn dp_then_tp_on_one_dimension_nest() {
        let mesh = Mesh::new(2, 2);
        let r = Region::of(
            &[8],
            layout(Layout::Split(0), Layout::Split(0)),
            1,
            mesh,
            Coord {
                tp: 1,
                dp: 1,
                pp: 0,
            },
        );
        assert_eq!((r.dim(0).len(), r.dim(0)[0].clone()), (1, 6..8));
    }

    #[test]
    fn extract_place_and_assemble_are_inverse() {
        let full_shape = [3, 4, 6];
        let full: Vec<f64> = (0..72).map(f64::from).collect();
        for (l, blocks) in [
            (layout(Layout::Split(2), Layout::Split(0)), 3),
            (layout(Layout::Split(1), Layout::Replicated), 1),
            (layout(Layout::Replicated, Layout::Split(1)), 1),
            (layout(Layout::Replicated, Layout::Replicated), 1),
        ] {
            let mesh = Mesh::new(2, if l.dp == Layout::Split(0) { 3 } else { 2 });
            let parts: Vec<Vec<f64>> = mesh
                .coords()
                .map(|c| Region::of(&full_shape, l, blocks, mesh, c).extract(&full, &full_shape))
                .collect();
            let refs: Vec<&[f64]> = parts.iter().map(|p| p.as_slice()).collect();
            assert_eq!(assemble(mesh, l, blocks, &full_shape, &refs), full, "{l}");
        }
    }

    #[test]
    fn clipped_runs_read_a_padded_shard_from_the_unpadded_tensor() {
        // A vocabulary of 10 rows padded to 12 for tp = 4: rank 3 holds rows 9..12, of which
        // only row 9 is in the model's tensor.
        let (model, padded) = ([10usize, 6], [12usize, 6]);
        let data: Vec<i32> = (0..60).collect();
        let mut padded_data = vec![-1; 72];
        Region::whole(&model).place(&data, &mut padded_data, &padded);
        padded_data[60..].fill(0);
        let mesh = Mesh::new(4, 1);
        for c in mesh.coords() {
            let l = layout(Layout::Split(0), Layout::Replicated);
            let region = Region::of(&padded, l, 1, mesh, c);
            let clipped = region.clipped(&model);
            let read: Vec<i32> = clipped
                .runs(&model)
                .into_iter()
                .flat_map(|r| data[r].to_vec())
                .collect();
            assert_eq!(read, clipped.extract(&data, &model), "{c}");
            // Zero-padded at the end of each local dimension, it is the padded shard.
            let mut local = vec![0; region.shape().iter().product()];
            Region::whole(&clipped.shape()).place(&read, &mut local, &region.shape());
            assert_eq!(local, region.extract(&padded_data, &padded), "{c}");
        }
        let last = Region::of(
            &padded,
            layout(Layout::Split(0), Layout::Replicated),
            1,
            mesh,
            mesh.coord(3),
        );
        assert_eq!(last.clipped(&model).shape(), vec![1, 6]);
    }

    #[test]
    fn runs_are_the_extracted_elements_merged_where_adjacent() {
        let full_shape = [3, 4, 12];
        let full: Vec<usize> = (0..144).collect();
        let mesh = Mesh::new(2, 1);
        for (l, blocks) in [
            (layout(Layout::Split(2), Layout::Replicated), 3),
            (layout(Layout::Split(1), Layout::Replicated), 1),
            (layout(Layout::Split(0), Layout::Replicated), 1),
            (layout(Layout::Replicated, Layout::Replicated), 1),
        ] {
            for c in mesh.coords() {
                let region = Region::of(&full_shape, l, blocks, mesh, c);
                let runs = region.runs(&full_shape);
                let read: Vec<usize> = runs.iter().flat_map(|r| full[r.clone()].to_vec()).collect();
                assert_eq!(read, region.extract(&full, &full_shape), "{l} at {c}");
                assert!(
                    runs.windows(2).all(|w| w[0].end != w[1].start),
                    "{l} at {c}"
                );
            }
        }
        // A split of the first dimension is one run; the whole tensor too.
        let half = Region::part(&full_shape, 0, 3, 1);
        assert_eq!(half.runs(&full_shape), vec![48..96]);
        assert_eq!(Region::whole(&full_shape).runs(&full_shape), vec![0..144]);
    }

    #[test]
    fn partial_sums_are_added_once_per_replica() {
        let mesh = Mesh::new(2, 2);
        let l = layout(Layout::Replicated, Layout::Partial);
        let parts = [[1.0f32], [9.0], [2.0], [9.0]];
        let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        assert_eq!(assemble(mesh, l, 1, &[], &refs), vec![3.0]);
    }
}
