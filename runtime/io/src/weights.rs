//! Hugging Face checkpoints in, for any family [`crate::import`] knows: what `run --weights`
//! and `train --weights` read.
//!
//! ```text
//! PATH ─► a directory: config.json (`model_type` ─► Family)
//!                      + model.safetensors, or model.safetensors.index.json + its shards
//!      └► a single .safetensors file: the family from the model's parameter names
//!         (GPT-2's through hf::load_gpt2_named, which also accepts unprefixed names)
//!   ─► Index: every file's header only (names, dtypes, shapes, where the bytes are)
//!   ─► each parameter of the graph ─► import::hf_names(family) ─► its tensor, checked against
//!      the parameter's shape, read from its file (a seek and a read: one file open at a time,
//!      only the tensors the model uses) and converted to f32
//!   ─► (parameters by our names, FileNames) ─► run / train; FileNames renames gradients back
//! ```
//!
//! Every family's model keeps the checkpoint's layout (GPT-2's fused q|k|v in Conv1D
//! `[in, out]`; nn.Linear's `[out, in]` with separate q, k, v and gate, up, used with
//! `transpose_b`), so each parameter is its tensor renamed ([`Transform::AsIs`]) and a
//! gradient written under the file's name is already in the file's layout. A tensor whose
//! shape differs from the parameter's is an error naming both, never reshaped.
//!
//! The whole model is materialised on the host in `f32` before the ranks take their shards
//! (each rank's slice is cut from it by the runtime).

use crate::hf::{load_gpt2_named, FileNames, HfError};
use crate::import::{hf_name, hf_names, Family, Transform};
use crate::safetensors_io::f16_to_f32;
use ferrotron_exec::Tensor;
use ferrotron_ir::Graph;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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
            let e = self.tensors.get(n).ok_or_else(|| HfError::Format {
                path: self.shown.clone(),
                why: format!("tensor `{n}` is missing"),
            })?;
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
                    data,
                };
            }
        }
        Ok(out)
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

/// Reads a Hugging Face checkpoint (a model directory or a safetensors file) into `g`'s
/// parameters, by our names, with the file's name of each.
///
/// A directory's family is its `config.json`'s; a single file's is the one whose names `g`'s
/// parameters have, GPT-2 read as [`load_gpt2_named`] reads it. Every parameter must be in the
/// checkpoint at exactly its shape; a tied copy ([`Transform::Tied`]: `lm_head.weight` beside
/// the embedding, BERT's decoder bias) must equal its parameter; the family's buffers and
/// unused heads are skipped; any other tensor is an error (a checkpoint for a bigger model).
pub fn load(path: &Path, g: &Graph) -> Result<(HashMap<String, Tensor>, FileNames), HfError> {
    match Source::of(path)? {
        Source::Dir { dir, family } => load_family(&Index::of_dir(&dir)?, family, g),
        Source::File(file) => match graph_family(g) {
            Some(Family::Gpt2) | None => load_gpt2_named(&file, g),
            Some(family) => load_family(&Index::of_file(&file)?, family, g),
        },
    }
}

/// [`load`] from an [`Index`] already read, with the family given.
pub fn load_family(
    index: &Index,
    family: Family,
    g: &Graph,
) -> Result<(HashMap<String, Tensor>, FileNames), HfError> {
    let table = hf_names(family);
    let prefix = base_prefix(family);
    let path = index.shown.clone();
    // Our name → the file's, and its expected shape.
    let mut wanted: Vec<(String, String, Vec<usize>)> = Vec::with_capacity(g.params.len());
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
        wanted.push((p.name.clone(), found, expected));
    }
    let names: Vec<&str> = wanted.iter().map(|(_, f, _)| f.as_str()).collect();
    let read = index.read(&names)?;
    let mut params = HashMap::with_capacity(wanted.len());
    let mut used: HashMap<String, String> = HashMap::new(); // file name → ours
    for ((ours, file, _), t) in wanted.into_iter().zip(read) {
        params.insert(ours.clone(), t);
        used.insert(file, ours);
    }

    // Tied copies: not loaded, but they must be the parameter they copy.
    let mut tied: Vec<(String, String)> = Vec::new(); // (file tensor, our parameter)
    for (param_pat, tensor_pat, transform) in table.params {
        if *transform != Transform::Tied {
            continue;
        }
        for ours in params.keys() {
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
                    tied.push((t, ours.clone()));
                }
            }
        }
    }
    for (tensor, ours) in &tied {
        let Some(copy) = index.read(&[tensor.as_str()])?.pop() else {
            continue;
        };
        let param = &params[ours];
        let untied = |why: String| HfError::Tied {
            path: path.clone(),
            tensor: tensor.clone(),
            why,
        };
        if copy.shape != param.shape {
            return Err(untied(format!(
                "has shape {:?}, the parameter `{ours}` it is tied to {:?}",
                copy.shape, param.shape
            )));
        }
        if let Some(i) = copy
            .data
            .iter()
            .zip(&param.data)
            .position(|(a, b)| a != b && !(a.is_nan() && b.is_nan()))
        {
            return Err(untied(format!(
                "differs from the parameter `{ours}` it is tied to (first at flat index {i}: \
                 {} vs {}); the model ties them (an untied checkpoint needs a model with its \
                 own parameter for it: `tie_word_embeddings: false`)",
                copy.data[i], param.data[i]
            )));
        }
        used.insert(tensor.clone(), String::new());
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
    Ok((params, names))
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
