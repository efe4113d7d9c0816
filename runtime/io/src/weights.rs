//! Hugging Face checkpoints in, for any family [`crate::import`] knows: what `run --weights`
//! and `train --weights` read.
//!
//! ```text
//! PATH ─► a directory: config.json (`model_type` ─► Family)
//!                      + model.safetensors, or model.safetensors.index.json + its shards
//!      └► a single .safetensors file: the family from the model's parameter names
//!         (of none: GPT-2's names through hf::load_gpt2_named, read whole: Weights::Full)
//!   ─► Index: every file's header only (names, dtypes, shapes, where the bytes are)
//!   ─► open: each parameter of the graph ─► import::hf_names(family) ─► its tensor, checked
//!      against the parameter's shape and dtype; tied copies compared a chunk at a time;
//!      anything else unexpected refused ─► (Opened, FileNames), no parameter read yet
//!   ─► each rank: ParamSource::shard ─► its region, clipped to the unpadded tensor ─► the
//!      contiguous runs of the file it covers (a seek and a read each) ─► f32, zero-padded
//!   ─► run / train; FileNames renames gradients back
//! ```
//!
//! Every family's model keeps the checkpoint's layout (GPT-2's fused q|k|v in Conv1D
//! `[in, out]`; nn.Linear's `[out, in]` with separate q, k, v and gate, up, used with
//! `transpose_b`), so each parameter is its tensor renamed ([`Transform::AsIs`]) and a
//! gradient written under the file's name is already in the file's layout. A tensor whose
//! shape differs from the parameter's is an error naming both, never reshaped.
//!
//! A rank reads only its shards (a replicated parameter whole, a split one its part), so no
//! process materialises the whole model unless it asks for it: [`load`] reads every parameter
//! whole (the unpartitioned reference of `run --verify`), through the same checks.

use crate::hf::{load_gpt2_named, FileNames, HfError};
use crate::import::{hf_name, hf_names, Family, Transform};
use crate::safetensors_io::f16_to_f32;
use ferrotron_exec::{ExecError, ParamSource, Tensor};
use ferrotron_ir::Graph;
use ferrotron_partitioner::Region;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The single-file checkpoint of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `weight_map` from tensor name to shard file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a tensor's bytes are, as a file's header says.
#[derive(Clone, Debug)]
struct Entry {
    file: PathBuf,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte offset in the file.
    start: u64,
    len: usize,
}

/// The headers of a checkpoint's files: every tensor by name, read without its data.
#[derive(Debug, Default)]
pub struct Index {
    tensors: BTreeMap<String, Entry>,
    /// How the checkpoint was named in errors (the directory or the file).
    shown: String,
}

impl Index {
    /// Reads the header of one safetensors file.
    pub fn of_file(path: &Path) -> Result<Index, HfError> {
        let mut index = Index {
            shown: path.display().to_string(),
            ..Index::default()
        };
        index.add_file(path, None)?;
        Ok(index)
    }

    /// Reads a model directory's `model.safetensors`, or its `model.safetensors.index.json`
    /// and the header of every shard it names.
    pub fn of_dir(dir: &Path) -> Result<Index, HfError> {
        let single = dir.join(WEIGHTS_FILE);
        let index_file = dir.join(INDEX_FILE);
        if single.is_file() {
            let mut index = Index::of_file(&single)?;
            index.shown = dir.display().to_string();
            return Ok(index);
        }
        let shown = index_file.display().to_string();
        let missing = format!(
            "{}: neither {WEIGHTS_FILE} nor {INDEX_FILE} ({shown})",
            dir.display()
        );
        let json = read_json(&index_file, missing)?;
        let format = |why: String| HfError::Format {
            path: shown.clone(),
            why,
        };
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format("no `weight_map` object (tensor name → shard file)".into()))?;
        // Shard file → the tensors the index says it holds, each shard read once.
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                format(format!(
                    "`weight_map` entry `{name}` is {file}, not a file name"
                ))
            })?;
            shards.entry(file).or_default().push(name);
        }
        let mut index = Index {
            shown: dir.display().to_string(),
            ..Index::default()
        };
        for (file, names) in shards {
            let path = dir.join(file);
            index.add_file(&path, Some(&names))?;
        }
        Ok(index)
    }

    /// Adds `path`'s tensors (only `only`, when the index lists which the file holds).
    fn add_file(&mut self, path: &Path, only: Option<&[&str]>) -> Result<(), HfError> {
        let shown = path.display().to_string();
        let io = |source| HfError::Io {
            path: shown.clone(),
            source,
        };
        let format = |why: String| HfError::Format {
            path: shown.clone(),
            why,
        };
        let mut f = File::open(path).map_err(io)?;
        let file_len = f.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|_| format("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            return Err(format(format!(
                "header length {n} does not fit the file ({file_len} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| format(format!("header is not a JSON table: {e}")))?;
        let data_start = 8 + n;
        let mut found = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| format(format!("tensor `{name}`: {what}"));
            let dtype = info
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad("no dtype"))?
                .to_owned();
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| bad("no shape"))?;
            let offsets: Vec<u64> = info
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(serde_json::Value::as_u64).collect())
                .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
                .ok_or_else(|| bad("no valid data_offsets"))?;
            if data_start + offsets[1] > file_len {
                return Err(bad("data past the end of the file"));
            }
            let len = (offsets[1] - offsets[0]) as usize;
            if let Some(size) = dtype_size(&dtype) {
                let numel: usize = shape.iter().product();
                if numel * size != len {
                    return Err(bad(&format!(
                        "{len} bytes for {dtype} {shape:?} ({} expected)",
                        numel * size
                    )));
                }
            }
            if only.is_some_and(|o| !o.contains(&name.as_str())) {
                continue;
            }
            found.push(name.clone());
            self.tensors.insert(
                name,
                Entry {
                    file: path.to_path_buf(),
                    dtype,
                    shape,
                    start: data_start + offsets[0],
                    len,
                },
            );
        }
        if let Some(only) = only {
            if let Some(missing) = only.iter().find(|n| !found.iter().any(|f| f == *n)) {
                return Err(format(format!(
                    "the index says it holds tensor `{missing}`, but it does not"
                )));
            }
        }
        Ok(())
    }

    /// The names of every tensor, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of tensor `name`, if the checkpoint holds it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads tensors `names` as `f32`, in that order, grouped by file so that each file is
    /// opened once and read only where the tensors are.
    fn read(&self, names: &[&str]) -> Result<Vec<Tensor>, HfError> {
        let mut by_file: BTreeMap<&Path, Vec<(usize, &str, &Entry)>> = BTreeMap::new();
        for (i, &n) in names.iter().enumerate() {
            let e = self.entry(n)?;
            by_file.entry(e.file.as_path()).or_default().push((i, n, e));
        }
        let mut out: Vec<Tensor> = vec![Tensor::zeros(Vec::new()); names.len()];
        for (path, mut entries) in by_file {
            let shown = path.display().to_string();
            let io = |source| HfError::Io {
                path: shown.clone(),
                source,
            };
            let mut f = File::open(path).map_err(io)?;
            entries.sort_by_key(|(_, _, e)| e.start);
            let mut raw = Vec::new();
            for (i, name, e) in entries {
                raw.resize(e.len, 0);
                f.seek(SeekFrom::Start(e.start)).map_err(io)?;
                f.read_exact(&mut raw).map_err(io)?;
                let data = to_f32(&raw, &e.dtype).ok_or_else(|| HfError::Dtype {
                    path: shown.clone(),
                    tensor: name.to_owned(),
                    dtype: e.dtype.clone(),
                })?;
                out[i] = Tensor {
                    shape: e.shape.clone(),
                    data: data.into(),
                };
            }
        }
        Ok(out)
    }

    fn entry(&self, name: &str) -> Result<&Entry, HfError> {
        self.tensors.get(name).ok_or_else(|| HfError::Format {
            path: self.shown.clone(),
            why: format!("tensor `{name}` is missing"),
        })
    }

    /// An error unless tensor `name` is F32, F16 or BF16 (what the loader converts to `f32`).
    fn check_dtype(&self, name: &str) -> Result<(), HfError> {
        let e = self.entry(name)?;
        match e.dtype.as_str() {
            "F32" | "F16" | "BF16" => Ok(()),
            _ => Err(HfError::Dtype {
                path: e.file.display().to_string(),
                tensor: name.to_owned(),
                dtype: e.dtype.clone(),
            }),
        }
    }

    /// Elements `range` of tensor `name` (flat, row-major) as `f32`: a part of a tensor read
    /// without the rest.
    pub fn read_elements(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, HfError> {
        Ok(self.read_runs(name, std::slice::from_ref(&range))?.0)
    }

    /// Elements `runs` (flat ranges, row-major) of tensor `name` as `f32`, one after another:
    /// the file opened once, a seek and a read per run. Also the bytes read.
    fn read_runs(&self, name: &str, runs: &[Range<usize>]) -> Result<(Vec<f32>, u64), HfError> {
        self.check_dtype(name)?;
        let e = self.entry(name)?;
        let shown = e.file.display().to_string();
        let size = dtype_size(&e.dtype).unwrap_or(1);
        let numel = e.len / size;
        if let Some(r) = runs.iter().find(|r| r.start > r.end || r.end > numel) {
            return Err(HfError::Format {
                path: shown,
                why: format!("elements {r:?} of tensor `{name}`, which has {numel}"),
            });
        }
        let io = |source| HfError::Io {
            path: shown.clone(),
            source,
        };
        let mut f = File::open(&e.file).map_err(io)?;
        let mut out = Vec::with_capacity(runs.iter().map(|r| r.len()).sum());
        let mut raw = Vec::new();
        let mut bytes = 0u64;
        for r in runs {
            raw.resize(r.len() * size, 0);
            f.seek(SeekFrom::Start(e.start + (r.start * size) as u64))
                .map_err(io)?;
            f.read_exact(&mut raw).map_err(io)?;
            bytes += raw.len() as u64;
            out.extend(to_f32(&raw, &e.dtype).ok_or_else(|| HfError::Dtype {
                path: shown.clone(),
                tensor: name.to_owned(),
                dtype: e.dtype.clone(),
            })?);
        }
        Ok((out, bytes))
    }
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Little-endian F32, F16 or BF16 elements as `f32`; `None` for any other dtype.
fn to_f32(raw: &[u8], dtype: &str) -> Option<Vec<f32>> {
    Some(match dtype {
        "F32" => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "F16" => raw
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        _ => return None,
    })
}

/// A JSON file's contents; `missing` is how an error names the file when it cannot be read.
fn read_json(path: &Path, missing: String) -> Result<serde_json::Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: missing,
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HfError::Format {
        path: path.display().to_string(),
        why: format!("not JSON: {e}"),
    })
}

/// The family a model directory's `config.json` names, by its `model_type`.
pub fn dir_family(dir: &Path) -> Result<Family, HfError> {
    let path = dir.join("config.json");
    let shown = path.display().to_string();
    let json = read_json(&path, shown.clone())?;
    let format = |why: String| HfError::Format {
        path: shown.clone(),
        why,
    };
    let model_type = json
        .get("model_type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| format("no `model_type`".into()))?;
    Family::from_model_type(model_type).ok_or_else(|| {
        let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
        format(format!(
            "`model_type` \"{model_type}\" is not one the loader knows ({})",
            known.join(", ")
        ))
    })
}

/// The family whose names `g`'s parameters have (GPT-2's `wte`, Llama's `embed_tokens.weight`,
/// BERT's `embeddings.word_embeddings.weight`); Llama stands for Mistral and Qwen2, which name
/// their weights alike.
pub fn graph_family(g: &Graph) -> Option<Family> {
    [Family::Gpt2, Family::Llama, Family::Bert]
        .into_iter()
        .find(|&f| g.params.values().all(|p| hf_name(f, &p.name).is_some()))
}

/// Whether `name` fits `pattern` (`{i}` a layer index).
fn fits(pattern: &str, name: &str) -> bool {
    match pattern.split_once("{i}") {
        None => pattern == name,
        Some((before, after)) => name
            .strip_prefix(before)
            .and_then(|r| r.strip_suffix(after))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// The layer index `name` has where `pattern` has `{i}` (`None` without one, or no fit).
fn layer_of<'n>(pattern: &str, name: &'n str) -> Option<&'n str> {
    let (before, after) = pattern.split_once("{i}")?;
    name.strip_prefix(before)?.strip_suffix(after)
}

/// The prefix a family's checkpoint puts before the base model's names (`transformer.h.0...`);
/// a checkpoint saved from the base model (`GPT2Model`, `LlamaModel`) has none.
fn base_prefix(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "transformer.",
        Family::Llama | Family::Mistral | Family::Qwen2 => "model.",
        Family::Bert => "bert.",
    }
}

/// Where the weights are: a model directory (its family from its `config.json`) or one file.
#[derive(Clone, Debug)]
pub enum Source {
    /// A model directory with a `config.json`.
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What its `config.json` says.
        family: Family,
    },
    /// A single safetensors file.
    File(PathBuf),
}

impl Source {
    /// `path` as a directory (a `config.json` inside) or a file.
    pub fn of(path: &Path) -> Result<Source, HfError> {
        if path.is_dir() {
            Ok(Source::Dir {
                dir: path.to_path_buf(),
                family: dir_family(path)?,
            })
        } else {
            Ok(Source::File(path.to_path_buf()))
        }
    }
}

/// A checkpoint's weights for a model, as the ranks take their shards of them.
#[derive(Debug)]
pub enum Weights {
    /// Every parameter whole, in memory: seeded weights, a reference's, or a single file of a
    /// model whose names are no family's, read as [`load_gpt2_named`] reads GPT-2's.
    Full(HashMap<String, Tensor>),
    /// Checked against the model; each rank reads where its shards are.
    Checkpoint(Opened),
}

impl Weights {
    /// Every parameter whole, by our names (what an unpartitioned reference runs on).
    pub fn into_full(self) -> Result<HashMap<String, Tensor>, HfError> {
        match self {
            Weights::Full(params) => Ok(params),
            Weights::Checkpoint(opened) => opened.read_all(),
        }
    }
}

impl ParamSource for Weights {
    fn shard(
        &self,
        name: &str,
        model: &[usize],
        padded: &[usize],
        region: &Region,
    ) -> Result<Tensor, ExecError> {
        match self {
            Weights::Full(params) => params.shard(name, model, padded, region),
            Weights::Checkpoint(opened) => opened.shard(name, model, padded, region),
        }
    }
}

/// A checkpoint checked against a model (every parameter found at its shape and in a dtype the
/// loader converts, tied copies equal, nothing unexpected) with no parameter read yet: a rank
/// reads the region it holds of each ([`ParamSource`]), a seek and a read per contiguous run
/// of the file, so that no process holds more of the model than its ranks' shards.
#[derive(Debug)]
pub struct Opened {
    index: Index,
    /// Our parameter name → the checkpoint's tensor it is read from.
    file_of: HashMap<String, String>,
    /// Tensor bytes read for parameters since the checkpoint was opened (the checks at opening
    /// not counted), over every rank that read.
    bytes_read: AtomicU64,
}

impl Opened {
    /// Bytes of the checkpoint's tensor data read for parameters so far, by every rank that
    /// took its shards from it; the reads that checked tied copies at opening are not counted.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Every parameter whole, by our names.
    pub fn read_all(&self) -> Result<HashMap<String, Tensor>, HfError> {
        let (ours, files): (Vec<&str>, Vec<&str>) = self
            .file_of
            .iter()
            .map(|(o, f)| (o.as_str(), f.as_str()))
            .unzip();
        let read = self.index.read(&files)?;
        let bytes: usize = files
            .iter()
            .filter_map(|f| self.index.tensors.get(*f))
            .map(|e| e.len)
            .sum();
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(ours.into_iter().map(str::to_owned).zip(read).collect())
    }
}

impl ParamSource for Opened {
    /// Reads only the part of `region` inside the checkpoint's tensor (a padded vocabulary's
    /// rows are in no file) and pads it with zeros to the region's shape.
    fn shard(
        &self,
        name: &str,
        model: &[usize],
        padded: &[usize],
        region: &Region,
    ) -> Result<Tensor, ExecError> {
        let feed = |problem: String| ExecError::Feed {
            what: "parameter",
            name: name.to_owned(),
            problem,
        };
        let Some(file) = self.file_of.get(name) else {
            return Err(feed(format!(
                "missing: not among the parameters {} was opened for",
                self.index.shown
            )));
        };
        let shape = self.index.shape(file).unwrap_or_default();
        if shape != model || padded.len() != model.len() || region.rank() != model.len() {
            return Err(feed(format!(
                "has shape {shape:?} in {} (`{file}`), the model says {model:?} (padded to \
                 {padded:?})",
                self.index.shown
            )));
        }
        let inside = region.clipped(model);
        let (data, bytes) = self
            .index
            .read_runs(file, &inside.runs(model))
            .map_err(|e| feed(e.to_string()))?;
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        Ok(Tensor {
            shape: inside.shape(),
            data: data.into(),
        }
        .padded(&region.shape()))
    }
}

/// Opens a Hugging Face checkpoint (a model directory or a safetensors file) for `g`'s
/// parameters, checked but not read, with the file's name of each.
///
/// A directory's family is its `config.json`'s; a single file's is the one whose names `g`'s
/// parameters have, or, of none, GPT-2's as [`load_gpt2_named`] reads it (read whole:
/// [`Weights::Full`]). Every parameter must be in the checkpoint at exactly its shape; a tied
/// copy ([`Transform::Tied`]: `lm_head.weight` beside the embedding, BERT's decoder bias) must
/// equal its parameter (compared a chunk at a time); the family's buffers and unused heads are
/// skipped; any other tensor is an error (a checkpoint for a bigger model).
pub fn open(path: &Path, g: &Graph) -> Result<(Weights, FileNames), HfError> {
    let (index, family) = match Source::of(path)? {
        Source::Dir { dir, family } => (Index::of_dir(&dir)?, family),
        Source::File(file) => match graph_family(g) {
            Some(family) => (Index::of_file(&file)?, family),
            None => {
                let (params, names) = load_gpt2_named(&file, g)?;
                return Ok((Weights::Full(params), names));
            }
        },
    };
    let (opened, names) = open_family(index, family, g)?;
    Ok((Weights::Checkpoint(opened), names))
}

/// Reads a Hugging Face checkpoint into `g`'s parameters, whole, by our names, with the file's
/// name of each: [`open`], then every parameter read.
pub fn load(path: &Path, g: &Graph) -> Result<(HashMap<String, Tensor>, FileNames), HfError> {
    let (weights, names) = open(path, g)?;
    Ok((weights.into_full()?, names))
}

/// Elements compared at a time when checking a tied copy: two such chunks in memory, never two
/// whole embeddings.
const TIED_CHUNK: usize = 1 << 20;

/// [`open`] on an [`Index`] already read, with the family given.
pub fn open_family(
    index: Index,
    family: Family,
    g: &Graph,
) -> Result<(Opened, FileNames), HfError> {
    let table = hf_names(family);
    let prefix = base_prefix(family);
    let path = index.shown.clone();
    // Our name → the file's, in the graph's order.
    let mut wanted: Vec<(String, String)> = Vec::with_capacity(g.params.len());
    for p in g.params.values() {
        let expected: Vec<usize> = g.ty(p.value).shape.extents();
        let Some(hf) = hf_name(family, &p.name) else {
            return Err(HfError::Family {
                path,
                param: p.name.clone(),
                model: g.name.clone(),
                family,
            });
        };
        // A checkpoint saved from the base model has the names without the prefix.
        let tried: Vec<String> = match hf.strip_prefix(prefix) {
            Some(bare) => vec![hf.clone(), bare.to_owned()],
            None => vec![hf.clone()],
        };
        let Some(found) = tried.iter().find(|t| index.shape(t).is_some()).cloned() else {
            return Err(HfError::Missing {
                path,
                param: p.name.clone(),
                expected,
                tried,
            });
        };
        let shape = index.shape(&found).unwrap_or_default();
        if shape != expected.as_slice() {
            return Err(HfError::Shape {
                path,
                tensor: found,
                param: p.name.clone(),
                found: shape.to_vec(),
                expected,
            });
        }
        index.check_dtype(&found)?;
        wanted.push((p.name.clone(), found));
    }
    let mut used: HashMap<String, String> = wanted
        .iter()
        .map(|(ours, file)| (file.clone(), ours.clone()))
        .collect(); // file name → ours

    // Tied copies: not loaded, but they must be the parameter they copy.
    let mut tied: Vec<(String, &str, &str)> = Vec::new(); // (copy, our parameter, its tensor)
    for (param_pat, tensor_pat, transform) in table.params {
        if *transform != Transform::Tied {
            continue;
        }
        for (ours, file) in &wanted {
            if !fits(param_pat, ours) {
                continue;
            }
            let tensor = match layer_of(param_pat, ours) {
                Some(i) => tensor_pat.replace("{i}", i),
                None => (*tensor_pat).to_owned(),
            };
            let bare = tensor.strip_prefix(prefix).map(str::to_owned);
            for t in std::iter::once(tensor).chain(bare) {
                if index.shape(&t).is_some() && !used.contains_key(&t) {
                    tied.push((t, ours, file));
                }
            }
        }
    }
    for (copy, ours, file) in &tied {
        check_tied(&index, copy, ours, file)?;
        used.insert(copy.clone(), String::new());
    }

    let skipped = |n: &str| {
        table
            .unused
            .iter()
            .any(|u| fits(u, n) || u.strip_prefix(prefix).is_some_and(|bare| fits(bare, n)))
    };
    let unexpected = index
        .names()
        .filter(|n| !used.contains_key(*n) && !skipped(n))
        .map(|n| (n.to_owned(), index.shape(n).unwrap_or_default().to_vec()))
        .collect();
    let names = FileNames::of_read(used, unexpected, path, &g.name)?;
    let opened = Opened {
        index,
        file_of: wanted.into_iter().collect(),
        bytes_read: AtomicU64::new(0),
    };
    Ok((opened, names))
}

/// Tied copy `copy` equals tensor `file`, which parameter `ours` is read from: the same shape,
/// and element by element (NaN equal to NaN), read a chunk of each at a time.
fn check_tied(index: &Index, copy: &str, ours: &str, file: &str) -> Result<(), HfError> {
    let untied = |why: String| HfError::Tied {
        path: index.shown.clone(),
        tensor: copy.to_owned(),
        why,
    };
    let (copy_shape, shape) = (
        index.shape(copy).unwrap_or_default(),
        index.shape(file).unwrap_or_default(),
    );
    if copy_shape != shape {
        return Err(untied(format!(
            "has shape {copy_shape:?}, the parameter `{ours}` it is tied to {shape:?}"
        )));
    }
    index.check_dtype(copy)?;
    let n: usize = shape.iter().product();
    for start in (0..n).step_by(TIED_CHUNK) {
        let chunk = start..(start + TIED_CHUNK).min(n);
        let a = index.read_elements(copy, chunk.clone())?;
        let b = index.read_elements(file, chunk)?;
        if let Some(i) = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y && !(x.is_nan() && y.is_nan()))
        {
            return Err(untied(format!(
                "differs from the parameter `{ours}` it is tied to (first at flat index {}: \
                 {} vs {}); the model ties them (an untied checkpoint needs a model with its \
                 own parameter for it: `tie_word_embeddings: false`)",
                start + i,
                a[i],
                b[i]
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_fit_layer_indices_only() {
        assert!(fits("h.{i}.attn.bias", "h.12.attn.bias"));
        assert!(!fits("h.{i}.attn.bias", "h..attn.bias"));
        assert!(!fits("h.{i}.attn.bias", "h.x.attn.bias"));
        assert!(fits("wte", "wte"));
        assert_eq!(layer_of("h.{i}.ln_1.weight", "h.3.ln_1.weight"), Some("3"));
    }

    #[test]
    fn half_floats_convert() {
        assert_eq!(to_f32(&[0x00, 0x3c], "F16"), Some(vec![1.0]));
        assert_eq!(to_f32(&[0x80, 0x3f], "BF16"), Some(vec![1.0]));
        assert_eq!(to_f32(&[0, 0, 0, 0], "I32"), None);
    }
}
