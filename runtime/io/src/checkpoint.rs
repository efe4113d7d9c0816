//! Sharded checkpoints: groups of full tensors (weights, Adam's moments) saved as each
//! tensor-parallel rank of each pipeline stage holds them, read back whole, and rewritten for
//! another plan (any other tp and pp).
//!
//! ```text
//! dir/
//!   meta.json              CheckpointMeta: step, seed, data position, trainer config (`extra`),
//!                          and for every parameter its model shape, padded shape, split
//!                          dimension, blocks, each rank's ranges of that dimension and the
//!                          stages holding it
//!   rank-0.safetensors     rank 0's shard of every group's tensors, keys `{group}/{param}`
//!   ...
//!   rank-{tp-1}.safetensors
//! ```
//!
//! With pipeline stages the files are per stage too, `stage-{s}-rank-{t}.safetensors`, each
//! holding the stage's parameters (a tied one in each of its stages' files).
//!
//! A rank file holds exactly what [`ferrotron_exec::shard_params`] hands that rank (vocabulary
//! padding included, as zeros), so a rank can start from its own file alone; replicated
//! parameters are in every rank's file. Data-parallel replicas hold the same shards, so there is
//! one file per tensor-parallel rank whatever `dp` is.
//!
//! [`load`] needs only `meta.json`, not the plan the checkpoint was written with; [`reshard`]
//! is a load followed by a [`save`] for another plan. [`save`] is atomic: it writes a temporary
//! sibling directory, flushes it to disk, and only then puts it in place of `dir`.

use crate::safetensors_io::SafetensorsFile;
use crate::safetensors_io::{self, parent_dir, sync_dir, temp_sibling, SafetensorsError};
use ferrotron_exec::Tensor;
use ferrotron_partitioner::{Layout, ParamShard, Plan, Region};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The checkpoint layout version [`save`] writes.
pub const FORMAT: u32 = 1;

/// What a checkpoint says about itself (stored as `meta.json`).
///
/// The caller fills in the training state (`model` to `extra`); [`save`] sets `tp`, `dp`,
/// `format`, `groups` and `tensors` from the plan and the groups it writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The model's name.
    pub model: String,
    /// The optimizer steps taken.
    pub step: u64,
    /// The tensor-parallel degree it was written at (one rank file each).
    pub tp: u64,
    /// The data-parallel degree it was written at.
    pub dp: u64,
    /// The pipeline stages it was written for (one set of rank files each).
    #[serde(default = "one")]
    pub pp: u64,
    /// The run's seed.
    pub seed: u64,
    /// Where the data loader is (samples or tokens consumed, as the trainer counts).
    pub data_position: u64,
    /// Anything else the trainer wants back (its configuration, say).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The layout version ([`FORMAT`]).
    #[serde(default)]
    pub format: u32,
    /// The groups stored (`params`, `adam_m`, `adam_v`, ...), in the order saved.
    #[serde(default)]
    pub groups: Vec<String>,
    /// How every parameter is cut into the rank files.
    #[serde(default)]
    pub tensors: Vec<TensorLayout>,
}

/// How one parameter is laid out in the rank files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TensorLayout {
    /// The parameter's name.
    pub name: String,
    /// Its shape in the model.
    pub model_shape: Vec<u64>,
    /// Its full shape in the plan it was saved with (`model_shape` with the vocabulary padded).
    pub shape: Vec<u64>,
    /// The dimension split over the tensor-parallel ranks; `None` when every rank holds all of
    /// it.
    pub split: Option<usize>,
    /// Blocks of the split dimension (3 for a fused q|k|v weight), 1 otherwise.
    pub blocks: u32,
    /// For each rank, the ranges of the split dimension it holds, in the order laid out in its
    /// file (empty for a replicated parameter).
    pub ranges: Vec<Vec<Range<u64>>>,
    /// The pipeline stages whose files hold it (empty: stage 0, the only one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<u32>,
}

fn one() -> u64 {
    1
}

impl TensorLayout {
    /// The stages whose files hold it.
    pub fn stages(&self) -> Vec<u32> {
        if self.stages.is_empty() {
            vec![0]
        } else {
            self.stages.clone()
        }
    }

    /// The layout of `shard` over `tp` ranks.
    pub fn of(shard: &ParamShard, tp: u64) -> TensorLayout {
        let split = match shard.layout.tp {
            Layout::Split(d) => Some(d),
            _ => None,
        };
        let ranges = (0..tp)
            .map(|t| shard.ranges(t, tp).map(|(_, r)| r).unwrap_or_default())
            .collect();
        TensorLayout {
            name: shard.name.clone(),
            model_shape: shard.model_shape.clone(),
            shape: shard.shape.clone(),
            split,
            blocks: shard.blocks.max(1),
            ranges,
            stages: Vec::new(),
        }
    }

    /// What rank `t` holds of the full (padded) tensor: the ranges listed for it.
    pub fn region(&self, t: usize) -> Region {
        let full = to_usize(&self.shape);
        match self.split {
            None => Region::whole(&full),
            Some(d) => Region::along(
                &full,
                d,
                self.ranges[t]
                    .iter()
                    .map(|r| r.start as usize..r.end as usize)
                    .collect(),
            ),
        }
    }

    /// The shape rank `t` holds.
    pub fn local_shape(&self, t: usize) -> Vec<usize> {
        self.region(t).shape()
    }
}

/// Why a checkpoint could not be written, read or resharded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file the checkpoint needs does not exist.
    #[error("{path}: missing file{hint}")]
    MissingFile {
        /// The file.
        path: String,
        /// What was expected there, if known (starts with `; `), or empty.
        hint: String,
    },
    /// `meta.json` is not valid JSON or not a checkpoint description.
    #[error("{path}:{line}:{col}: bad meta.json: {message}")]
    Meta {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What the parser says.
        message: String,
    },
    /// `meta.json` parses but does not describe a consistent checkpoint.
    #[error("{path}: bad meta.json: {why}")]
    InvalidMeta {
        /// The file.
        path: String,
        /// What is inconsistent.
        why: String,
    },
    /// A rank file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// A rank file lacks a tensor `meta.json` lists.
    #[error("{path}: tensor `{key}` is missing")]
    MissingTensor {
        /// The file.
        path: String,
        /// The tensor's key (`{group}/{param}`).
        key: String,
    },
    /// A tensor in a rank file does not have the shape `meta.json` gives that rank.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: String,
        /// The tensor's key (`{group}/{param}`).
        key: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape meta.json says this rank holds.
        expected: Vec<usize>,
    },
    /// A tensor stored in an element type that is not read.
    #[error("{path}: tensor `{key}` has dtype {dtype}; only F32, F16, BF16 and F64 are read")]
    Dtype {
        /// The file.
        path: String,
        /// The tensor's key.
        key: String,
        /// Its safetensors dtype.
        dtype: String,
    },
    /// What [`save`] was given does not fit the plan (a missing tensor, a wrong shape, a
    /// tensor the plan does not have, a bad group name).
    #[error("{dir}: cannot save group `{group}`{}: {problem}", tensor_part(.name))]
    Input {
        /// The checkpoint directory.
        dir: String,
        /// The group of tensors (`params`, `adam_m`, ...).
        group: String,
        /// The tensor, if the problem is one tensor.
        name: Option<String>,
        /// What is wrong (with both shapes for a wrong shape).
        problem: String,
    },
    /// A plan whose parameters differ from the checkpoint's.
    #[error("{path}: parameter `{param}` {problem}")]
    PlanMismatch {
        /// The checkpoint.
        path: String,
        /// The parameter.
        param: String,
        /// How the plan and the checkpoint differ on it.
        problem: String,
    },
}

fn tensor_part(name: &Option<String>) -> String {
    name.as_ref()
        .map(|n| format!(", tensor `{n}`"))
        .unwrap_or_default()
}

impl CheckpointError {
    fn io(path: &Path, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<SafetensorsError> for CheckpointError {
    fn from(e: SafetensorsError) -> CheckpointError {
        match e {
            SafetensorsError::Io { path, source } => {
                if source.kind() == std::io::ErrorKind::NotFound {
                    CheckpointError::MissingFile {
                        path,
                        hint: String::new(),
                    }
                } else {
                    CheckpointError::Io { path, source }
                }
            }
            SafetensorsError::Format { path, why } => CheckpointError::Format { path, why },
            SafetensorsError::Missing { path, name } => {
                CheckpointError::MissingTensor { path, key: name }
            }
            SafetensorsError::Dtype { path, name, dtype } => CheckpointError::Dtype {
                path,
                key: name,
                dtype,
            },
        }
    }
}

/// The file of tensor-parallel rank `t` in checkpoint `dir` (of one pipeline stage).
pub fn rank_file(dir: &Path, t: u64) -> PathBuf {
    dir.join(format!("rank-{t}.safetensors"))
}

/// The file of tensor-parallel rank `t` of stage `s` in a checkpoint of `pp` stages.
pub fn stage_file(dir: &Path, pp: u64, s: u64, t: u64) -> PathBuf {
    if pp <= 1 {
        rank_file(dir, t)
    } else {
        dir.join(format!("stage-{s}-rank-{t}.safetensors"))
    }
}

/// The description file of checkpoint `dir`.
pub fn meta_file(dir: &Path) -> PathBuf {
    dir.join("meta.json")
}

fn key(group: &str, name: &str) -> String {
    format!("{group}/{name}")
}

/// Writes `groups` of full tensors (each a map from parameter name to its tensor at model
/// shape; every group holds exactly the plan's parameters) as `plan`'s shards, one
/// safetensors file per tensor-parallel rank, plus `meta.json`, into `dir`, atomically:
/// everything goes into a temporary sibling directory, is flushed to disk, and then replaces
/// `dir`. A failure leaves an existing `dir` as it was and no temporary directory behind.
pub fn save(
    dir: &Path,
    plan: &Plan,
    meta: &CheckpointMeta,
    groups: &[(&str, &HashMap<String, Tensor>)],
) -> Result<(), CheckpointError> {
    check_groups(dir, plan, groups)?;
    let tp = plan.mesh.tp.max(1);
    let mut meta = meta.clone();
    meta.tp = tp;
    meta.dp = plan.mesh.dp.max(1);
    meta.pp = plan.mesh.pp.max(1);
    meta.format = FORMAT;
    meta.groups = groups.iter().map(|(g, _)| (*g).to_owned()).collect();
    meta.tensors = plan
        .params
        .iter()
        .enumerate()
        .map(|(i, s)| TensorLayout {
            stages: match &plan.pipeline {
                Some(pipe) => pipe.holders[i].clone(),
                None => Vec::new(),
            },
            ..TensorLayout::of(s, tp)
        })
        .collect();

    if let Ok(m) = std::fs::symlink_metadata(dir) {
        if !m.is_dir() {
            return Err(CheckpointError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a checkpoint directory",
                ),
            });
        }
    }
    let parent = parent_dir(dir);
    std::fs::create_dir_all(&parent).map_err(|e| CheckpointError::io(&parent, e))?;
    let tmp = temp_sibling(dir, "tmp");
    std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    let written = write_files(&tmp, &meta, groups).and_then(|()| replace_dir(&tmp, dir));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Every group holds exactly the plan's parameters at their model shapes.
fn check_groups(
    dir: &Path,
    plan: &Plan,
    groups: &[(&str, &HashMap<String, Tensor>)],
) -> Result<(), CheckpointError> {
    let input = |group: &str, name: Option<&str>, problem: String| CheckpointError::Input {
        dir: dir.display().to_string(),
        group: group.to_owned(),
        name: name.map(str::to_owned),
        problem,
    };
    let names: HashSet<&str> = plan.params.iter().map(|s| s.name.as_str()).collect();
    let mut seen = HashSet::new();
    for &(group, tensors) in groups {
        if group.is_empty() || group.contains('/') {
            return Err(input(
                group,
                None,
                "a group name is non-empty, without `/`".into(),
            ));
        }
        if !seen.insert(group) {
            return Err(input(group, None, "given twice".into()));
        }
        for shard in &plan.params {
            let expected = to_usize(&shard.model_shape);
            match tensors.get(&shard.name) {
                None => return Err(input(group, Some(&shard.name), "missing".into())),
                Some(t) if t.shape != expected => {
                    return Err(input(
                        group,
                        Some(&shard.name),
                        format!("has shape {:?}, the model says {:?}", t.shape, expected),
                    ))
                }
                Some(t) if t.data.len() != t.shape.iter().product::<usize>() => {
                    return Err(input(
                        group,
                        Some(&shard.name),
                        format!("has {} elements for shape {:?}", t.data.len(), t.shape),
                    ))
                }
                Some(_) => {}
            }
        }
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .collect();
        extra.sort();
        if let Some(n) = extra.first() {
            return Err(input(
                group,
                Some(n),
                format!("is not a parameter of the plan for `{}`", plan.model),
            ));
        }
    }
    Ok(())
}

/// The rank files and meta.json, into `tmp`, each flushed, then `tmp` itself.
fn write_files(
    tmp: &Path,
    meta: &CheckpointMeta,
    groups: &[(&str, &HashMap<String, Tensor>)],
) -> Result<(), CheckpointError> {
    for s in 0..meta.pp {
        for t in 0..meta.tp {
            let mut shards: Vec<(String, Tensor)> =
                Vec::with_capacity(groups.len() * meta.tensors.len());
            for &(group, tensors) in groups {
                for layout in held_by(meta, s) {
                    let full = &tensors[&layout.name];
                    shards.push((key(group, &layout.name), shard_of(full, layout, t as usize)));
                }
            }
            let refs: Vec<(&str, &Tensor)> = shards.iter().map(|(k, t)| (k.as_str(), t)).collect();
            let header = HashMap::from([
                ("format".to_owned(), "ferrotron-checkpoint".to_owned()),
                ("rank".to_owned(), t.to_string()),
                ("tp".to_owned(), meta.tp.to_string()),
                ("stage".to_owned(), s.to_string()),
            ]);
            safetensors_io::write(&stage_file(tmp, meta.pp, s, t), &refs, Some(header))?;
        }
    }
    let path = meta_file(tmp);
    let text = serde_json::to_string_pretty(meta).map_err(|e| CheckpointError::InvalidMeta {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    write_synced(&path, text.as_bytes())?;
    sync_dir(tmp).map_err(|e| CheckpointError::io(tmp, e))
}

/// The tensors stage `s`'s files hold.
fn held_by(meta: &CheckpointMeta, s: u64) -> impl Iterator<Item = &TensorLayout> {
    meta.tensors
        .iter()
        .filter(move |l| l.stages().contains(&(s as u32)))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let io = |e| CheckpointError::io(path, e);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Puts the complete directory `tmp` at `dir`: an existing `dir` is moved aside, `tmp` renamed
/// in, and the old one removed; if the second rename fails the old one is moved back.
fn replace_dir(tmp: &Path, dir: &Path) -> Result<(), CheckpointError> {
    let parent = parent_dir(dir);
    if std::fs::symlink_metadata(dir).is_ok() {
        let old = temp_sibling(dir, "old");
        std::fs::rename(dir, &old).map_err(|e| CheckpointError::io(dir, e))?;
        if let Err(e) = std::fs::rename(tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(CheckpointError::io(dir, e));
        }
        sync_dir(&parent).map_err(|e| CheckpointError::io(&parent, e))?;
        // The new checkpoint is in place: removing the old one is best effort.
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dir).map_err(|e| CheckpointError::io(dir, e))?;
    }
    sync_dir(&parent).map_err(|e| CheckpointError::io(&parent, e))
}

/// Reads checkpoint `dir` back to full tensors at model shape, by group and parameter name
/// (shards put together from the ranges in `meta.json`, the vocabulary padding cropped). The
/// plan it was written with is not needed.
#[allow(clippy::type_complexity)]
pub fn load(
    dir: &Path,
) -> Result<(CheckpointMeta, HashMap<String, HashMap<String, Tensor>>), CheckpointError> {
    let meta = read_meta(dir)?;
    let tp = meta.tp;
    let files = || (0..meta.pp).flat_map(move |s| (0..tp).map(move |t| (s, t)));
    // Check every rank file's header first: a missing tensor or a wrong shape is reported
    // before anything large is allocated or read.
    for (s, t) in files() {
        let path = stage_file(dir, meta.pp, s, t);
        let shapes = read_header(&path, tp)?;
        for group in &meta.groups {
            for layout in held_by(&meta, s) {
                let k = key(group, &layout.name);
                let expected = layout.local_shape(t as usize);
                match shapes.get(&k) {
                    None => {
                        return Err(CheckpointError::MissingTensor {
                            path: path.display().to_string(),
                            key: k,
                        })
                    }
                    Some(found) if *found != expected => {
                        return Err(CheckpointError::Shape {
                            path: path.display().to_string(),
                            key: k,
                            found: found.clone(),
                            expected,
                        })
                    }
                    Some(_) => {}
                }
            }
        }
    }
    // Full (padded) tensors, filled one rank file at a time.
    let mut full: Vec<Vec<Option<Tensor>>> = meta
        .groups
        .iter()
        .map(|_| meta.tensors.iter().map(|_| None).collect())
        .collect();
    for (s, t) in files() {
        let file = SafetensorsFile::open(&stage_file(dir, meta.pp, s, t))?;
        for (gi, group) in meta.groups.iter().enumerate() {
            for (pi, layout) in meta.tensors.iter().enumerate() {
                // Each tensor is read from the first stage holding it.
                if layout.stages()[0] as u64 != s {
                    continue;
                }
                let slot = &mut full[gi][pi];
                match layout.split {
                    None if t == 0 => *slot = Some(file.tensor(&key(group, &layout.name))?),
                    None => {}
                    Some(_) => {
                        let local = file.tensor(&key(group, &layout.name))?;
                        let whole =
                            slot.get_or_insert_with(|| Tensor::zeros(to_usize(&layout.shape)));
                        let shape = whole.shape.clone();
                        layout
                            .region(t as usize)
                            .place(&local.data, &mut whole.data, &shape);
                    }
                }
            }
        }
    }
    let mut out = HashMap::with_capacity(meta.groups.len());
    for (gi, group) in meta.groups.iter().enumerate() {
        let mut tensors = HashMap::with_capacity(meta.tensors.len());
        for (pi, layout) in meta.tensors.iter().enumerate() {
            // Read from rank 0 or placed from every rank; only an empty tensor is neither.
            let t = full[gi][pi]
                .take()
                .unwrap_or_else(|| Tensor::zeros(to_usize(&layout.shape)));
            tensors.insert(
                layout.name.clone(),
                t.cropped(&to_usize(&layout.model_shape)),
            );
        }
        out.insert(group.clone(), tensors);
    }
    Ok((meta, out))
}

/// Reads and checks `meta.json`.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let path = meta_file(dir);
    let name = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: name.clone(),
                hint: "; not a checkpoint directory".into(),
            }
        } else {
            CheckpointError::Io {
                path: name.clone(),
                source,
            }
        }
    })?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| CheckpointError::Meta {
        path: name.clone(),
        line: e.line(),
        col: e.column(),
        message: without_position(&e),
    })?;
    check_meta(&meta).map_err(|why| CheckpointError::InvalidMeta { path: name, why })?;
    Ok(meta)
}

/// serde_json's message without its ` at line L column C` (the error gives them apart).
fn without_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    msg.strip_suffix(&suffix).map(str::to_owned).unwrap_or(msg)
}

/// A description whose shapes and ranges hold together: every split dimension tiled exactly
/// by the ranks' ranges, so reading it back neither panics nor allocates what the files do not
/// back.
fn check_meta(meta: &CheckpointMeta) -> Result<(), String> {
    if meta.format > FORMAT {
        return Err(format!(
            "format {} is newer than this reader's ({FORMAT})",
            meta.format
        ));
    }
    if meta.tp == 0 || meta.tp > 1 << 20 {
        return Err(format!("tp = {} is not a rank count", meta.tp));
    }
    if meta.pp == 0 || meta.pp > 1 << 20 {
        return Err(format!("pp = {} is not a stage count", meta.pp));
    }
    if let Some(l) = meta
        .tensors
        .iter()
        .find(|l| l.stages().iter().any(|&s| u64::from(s) >= meta.pp))
    {
        return Err(format!(
            "tensor `{}`: stages {:?} of {}",
            l.name, l.stages, meta.pp
        ));
    }
    let mut groups = HashSet::new();
    for g in &meta.groups {
        if g.is_empty() || g.contains('/') || !groups.insert(g) {
            return Err(format!(
                "group name `{g}` is empty, has a `/` or is repeated"
            ));
        }
    }
    let mut names = HashSet::new();
    for l in &meta.tensors {
        let n = &l.name;
        if !names.insert(n) {
            return Err(format!("tensor `{n}` is listed twice"));
        }
        if l.shape.len() != l.model_shape.len()
            || l.shape.iter().zip(&l.model_shape).any(|(s, m)| m > s)
        {
            return Err(format!(
                "tensor `{n}`: model shape {:?} does not fit in shape {:?}",
                l.model_shape, l.shape
            ));
        }
        if l.shape
            .iter()
            .try_fold(1u64, |a, &s| a.checked_mul(s))
            .is_none()
            || l.shape.iter().any(|&s| usize::try_from(s).is_err())
        {
            return Err(format!("tensor `{n}`: shape {:?} overflows", l.shape));
        }
        if l.ranges.len() as u64 != meta.tp {
            return Err(format!(
                "tensor `{n}`: ranges for {} ranks, tp = {}",
                l.ranges.len(),
                meta.tp
            ));
        }
        match l.split {
            None => {
                if l.ranges.iter().any(|r| !r.is_empty()) {
                    return Err(format!(
                        "tensor `{n}`: ranges given for a replicated tensor"
                    ));
                }
            }
            Some(d) => {
                let Some(&size) = l.shape.get(d) else {
                    return Err(format!(
                        "tensor `{n}`: split dimension {d} of a {}-d tensor",
                        l.shape.len()
                    ));
                };
                let mut all: Vec<&Range<u64>> = l.ranges.iter().flatten().collect();
                all.sort_by_key(|r| r.start);
                let mut at = 0;
                for r in all {
                    if r.start != at || r.end < r.start {
                        return Err(format!(
                            "tensor `{n}`: the ranks' ranges of dimension {d} do not tile 0..{size}"
                        ));
                    }
                    at = r.end;
                }
                if at != size {
                    return Err(format!(
                        "tensor `{n}`: the ranks' ranges of dimension {d} do not tile 0..{size}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The tensor shapes of a rank file, from its header alone.
fn read_header(path: &Path, tp: u64) -> Result<HashMap<String, Vec<usize>>, CheckpointError> {
    let name = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: name.clone(),
                hint: format!(
                    "; meta.json says tp = {tp}, so rank-0 to rank-{} are expected",
                    tp - 1
                ),
            }
        } else {
            CheckpointError::Io {
                path: name.clone(),
                source,
            }
        }
    })?;
    let format = |why: &str| CheckpointError::Format {
        path: name.clone(),
        why: why.to_owned(),
    };
    let file_len = f
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| format("shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > file_len {
        return Err(format("header length past the end of the file"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| CheckpointError::io(path, e))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|_| format("header is not a safetensors JSON table"))?;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect())
}

/// Rewrites checkpoint `src` for `plan` (another tp or dp) at `dst` (which may be `src`): a
/// [`load`], a check that the plan has exactly the checkpoint's parameters at the same model
/// shapes, and a [`save`] with `plan`'s shards (`tp` and `dp` updated).
pub fn reshard(src: &Path, dst: &Path, plan: &Plan) -> Result<(), CheckpointError> {
    let (meta, groups) = load(src)?;
    let path = src.display().to_string();
    let mismatch = |param: &str, problem: String| CheckpointError::PlanMismatch {
        path: path.clone(),
        param: param.to_owned(),
        problem,
    };
    let saved: HashMap<&str, &TensorLayout> =
        meta.tensors.iter().map(|l| (l.name.as_str(), l)).collect();
    for shard in &plan.params {
        match saved.get(shard.name.as_str()) {
            None => {
                return Err(mismatch(
                    &shard.name,
                    format!("of the plan for `{}` is not in the checkpoint", plan.model),
                ))
            }
            Some(l) if l.model_shape != shard.model_shape => {
                return Err(mismatch(
                    &shard.name,
                    format!(
                        "has shape {:?} in the checkpoint, {:?} in the plan for `{}`",
                        l.model_shape, shard.model_shape, plan.model
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let planned: HashSet<&str> = plan.params.iter().map(|s| s.name.as_str()).collect();
    if let Some(l) = meta
        .tensors
        .iter()
        .find(|l| !planned.contains(l.name.as_str()))
    {
        return Err(mismatch(
            &l.name,
            format!(
                "is in the checkpoint but not in the plan for `{}`",
                plan.model
            ),
        ));
    }
    let refs: Vec<(&str, &HashMap<String, Tensor>)> = meta
        .groups
        .iter()
        .map(|g| (g.as_str(), &groups[g]))
        .collect();
    save(dst, plan, &meta, &refs)
}

fn to_usize(shape: &[u64]) -> Vec<usize> {
    shape.iter().map(|&s| s as usize).collect()
}

/// What rank `t` holds of `full` (at model shape) under `layout`.
fn shard_of(full: &Tensor, layout: &TensorLayout, t: usize) -> Tensor {
    full.padded(&to_usize(&layout.shape))
        .take(&layout.region(t))
}
