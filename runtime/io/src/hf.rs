//! Hugging Face GPT-2 weights in, gradients and weights out, and token batches from text.
//!
//! Our GPT-2 models name their parameters as Hugging Face's `GPT2LMHeadModel` does, without
//! the `transformer.` prefix (`h.0.attn.c_attn.weight`, in Conv1D `[in, out]` orientation with
//! q|k|v fused, as in the checkpoint), except that the embeddings are `wte` and `wpe` rather
//! than `wte.weight` and `wpe.weight`; the output layer is tied to `wte`. [`load_gpt2`] finds
//! each parameter of a graph under `transformer.{name}` or `{name}`, or, for a name not ending
//! in `.weight` or `.bias`, also `transformer.{name}.weight` or `{name}.weight` (so `wte` is
//! `transformer.wte.weight`), checks its shape, and converts F16, BF16 or F32 to `f32`;
//! [`load_gpt2_named`] also says where it found each ([`FileNames`]), so that gradients are
//! written under the file's names.

use crate::safetensors_io::{self, SafetensorsError, SafetensorsFile};
use ferrotron_exec::Tensor;
use ferrotron_ir::Graph;
use std::collections::HashMap;
use std::path::Path;

/// Why Hugging Face weights, a tensor dump or a token file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// A parameter of the model has no tensor in the file.
    #[error("{path}: no tensor for parameter `{param}` {expected:?} (looked for {})", quoted(.tried))]
    Missing {
        /// The file.
        path: String,
        /// Our parameter name.
        param: String,
        /// Its shape in the model.
        expected: Vec<usize>,
        /// The names looked for in the file.
        tried: Vec<String>,
    },
    /// A tensor whose shape is not the model's.
    #[error("{path}: tensor `{tensor}` (parameter `{param}`) has shape {found:?}, the model says {expected:?}")]
    Shape {
        /// The file.
        path: String,
        /// The tensor's name in the file.
        tensor: String,
        /// Our parameter name.
        param: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// Its shape in the model.
        expected: Vec<usize>,
    },
    /// A tensor whose element type is not a float this reader converts.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; F32, F16 and BF16 are accepted")]
    Dtype {
        /// The file.
        path: String,
        /// The tensor's name in the file.
        tensor: String,
        /// Its safetensors dtype.
        dtype: String,
    },
    /// `lm_head.weight` is present but is not the token embedding (the model ties them).
    #[error("{path}: `lm_head.weight` {why}")]
    Untied {
        /// The file.
        path: String,
        /// How it differs.
        why: String,
    },
    /// A parameter that the checkpoint's family names no tensor for: a model of another
    /// family than the checkpoint's `config.json` says.
    #[error(
        "{path}: parameter `{param}` of `{model}` has no tensor name in a {} checkpoint \
         (`ferrotron_io::import::hf_names`): the checkpoint is `{family}`, the model is not \
         (import the checkpoint's config.json to get its model)",
        .family.architecture()
    )]
    Family {
        /// The checkpoint.
        path: String,
        /// Our parameter name.
        param: String,
        /// The model.
        model: String,
        /// The checkpoint's family.
        family: crate::import::Family,
    },
    /// A tied copy in a checkpoint (BERT's decoder, an `lm_head.weight` the model ties) that is
    /// not the parameter it copies.
    #[error("{path}: tensor `{tensor}` {why}")]
    Tied {
        /// The checkpoint.
        path: String,
        /// The copy's name in the checkpoint.
        tensor: String,
        /// How it differs.
        why: String,
    },
    /// A tensor that is neither a parameter of the model nor a known buffer (a file for a
    /// model with more layers, say).
    #[error("{path}: tensor `{tensor}` {shape:?} is not a parameter of `{model}`{}", more(*.others))]
    Unexpected {
        /// The file.
        path: String,
        /// The first such tensor, by name.
        tensor: String,
        /// Its shape in the file.
        shape: Vec<usize>,
        /// The model.
        model: String,
        /// How many more there are.
        others: usize,
    },
    /// A token file line that is not a sequence of ids like the others.
    #[error("{path}:{line}: {why}")]
    Tokens {
        /// The file.
        path: String,
        /// 1-based line (0 for the file as a whole).
        line: usize,
        /// What is wrong.
        why: String,
    },
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn more(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} more)"),
    }
}

impl From<SafetensorsError> for HfError {
    fn from(e: SafetensorsError) -> HfError {
        match e {
            SafetensorsError::Io { path, source } => HfError::Io { path, source },
            SafetensorsError::Format { path, why } => HfError::Format { path, why },
            // Names are checked before tensors are read; this is a header that changed under us.
            SafetensorsError::Missing { path, name } => HfError::Format {
                path,
                why: format!("tensor `{name}` is missing"),
            },
            SafetensorsError::Dtype { path, name, dtype } => HfError::Dtype {
                path,
                tensor: name,
                dtype,
            },
        }
    }
}

/// Names under which parameter `name` may be stored in a Hugging Face file, most likely first
/// (`.weight` is tried only on names that do not already end in `.weight` or `.bias`).
fn candidates(name: &str) -> Vec<String> {
    if name.ends_with(".weight") || name.ends_with(".bias") {
        vec![format!("transformer.{name}"), name.to_owned()]
    } else {
        vec![
            format!("transformer.{name}"),
            format!("transformer.{name}.weight"),
            name.to_owned(),
            format!("{name}.weight"),
        ]
    }
}

/// Buffers a `GPT2LMHeadModel` file may hold that are not weights (the causal mask).
fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// Where [`load_gpt2_named`] found each parameter in the file, to write tensors of the
/// parameters (their gradients) under the names the file gave them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileNames {
    /// Our parameter name → the file's tensor name.
    of: HashMap<String, String>,
}

impl FileNames {
    /// What a load of `path` into model `model` read: `used`, each file tensor read with the
    /// parameter it went to (empty: a copy only checked), unless `unexpected` (tensors of the
    /// file, with their shapes, that no parameter reads and the family does not skip) names
    /// one: then the error naming the first.
    pub(crate) fn of_read(
        used: HashMap<String, String>,
        unexpected: Vec<(String, Vec<usize>)>,
        path: String,
        model: &str,
    ) -> Result<FileNames, HfError> {
        if let Some((tensor, shape)) = unexpected.first() {
            return Err(HfError::Unexpected {
                path,
                tensor: tensor.clone(),
                shape: shape.clone(),
                model: model.to_owned(),
                others: unexpected.len() - 1,
            });
        }
        let of = used
            .into_iter()
            .filter(|(_, ours)| !ours.is_empty())
            .map(|(file, ours)| (ours, file))
            .collect();
        Ok(FileNames { of })
    }

    /// The file's name of parameter `param` (`transformer.wte.weight` for `wte`), if it was
    /// read from the file.
    pub fn get(&self, param: &str) -> Option<&str> {
        self.of.get(param).map(String::as_str)
    }

    /// `tensors` by our parameter names (gradients, say) under the file's names instead. Each
    /// parameter was read at exactly the file tensor's shape (q|k|v fused and in Conv1D
    /// orientation, as the file has them), so a tensor of a parameter's shape is already in the
    /// file's layout and only its name changes. Names not read from the file stay. The tied
    /// `lm_head.weight` gets no tensor of its own: it is the token embedding, whose entry holds
    /// the whole gradient, as the loader read it only to check it equals the embedding.
    pub fn rename(&self, tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        tensors
            .into_iter()
            .map(|(name, t)| match self.of.get(&name) {
                Some(file) => (file.clone(), t),
                None => (name, t),
            })
            .collect()
    }
}

/// Reads a `GPT2LMHeadModel` safetensors file into `g`'s parameters, by our names.
///
/// Every parameter of `g` must be in the file at exactly its shape. An `lm_head.weight` must
/// equal the token embedding (the model ties them); buffers (`*.attn.bias`,
/// `*.attn.masked_bias`) are ignored; any other tensor is an error (a file for a bigger model).
/// F16, BF16 and F32 are converted to `f32`.
pub fn load_gpt2(path: &Path, g: &Graph) -> Result<HashMap<String, Tensor>, HfError> {
    Ok(load_gpt2_named(path, g)?.0)
}

/// [`load_gpt2`], with the name each parameter had in the file.
pub fn load_gpt2_named(
    path: &Path,
    g: &Graph,
) -> Result<(HashMap<String, Tensor>, FileNames), HfError> {
    let file = SafetensorsFile::open(path)?;
    let file_name = path.display().to_string();
    let mut out = HashMap::with_capacity(g.params.len());
    let mut used: HashMap<String, String> = HashMap::new(); // file name -> our name
    for p in g.params.values() {
        let expected: Vec<usize> = g.ty(p.value).shape.extents();
        let tried = candidates(&p.name);
        let Some(found) = tried.iter().find(|c| file.contains(c)) else {
            return Err(HfError::Missing {
                path: file_name,
                param: p.name.clone(),
                expected,
                tried,
            });
        };
        let shape = file.shape(found).unwrap_or_default();
        if shape != expected.as_slice() {
            return Err(HfError::Shape {
                path: file_name,
                tensor: found.clone(),
                param: p.name.clone(),
                found: shape.to_vec(),
                expected,
            });
        }
        check_dtype(&file, found)?;
        out.insert(p.name.clone(), file.tensor(found)?);
        used.insert(found.clone(), p.name.clone());
    }

    const LM_HEAD: &str = "lm_head.weight";
    if file.contains(LM_HEAD) && !used.contains_key(LM_HEAD) {
        check_tied(&file, &used, &out)?;
        used.insert(LM_HEAD.to_owned(), String::new());
    }

    let unexpected = file
        .names()
        .into_iter()
        .filter(|n| !used.contains_key(n) && !is_buffer(n))
        .map(|n| {
            let shape = file.shape(&n).unwrap_or_default().to_vec();
            (n, shape)
        })
        .collect();
    let names = FileNames::of_read(used, unexpected, file_name, &g.name)?;
    Ok((out, names))
}

fn check_dtype(file: &SafetensorsFile, name: &str) -> Result<(), HfError> {
    use safetensors::Dtype;
    match file.dtype(name) {
        Some(Dtype::F32 | Dtype::F16 | Dtype::BF16) => Ok(()),
        other => Err(HfError::Dtype {
            path: file.path().to_owned(),
            tensor: name.to_owned(),
            dtype: other.map_or_else(|| "unknown".into(), |d| format!("{d:?}")),
        }),
    }
}

/// `lm_head.weight` equals the token embedding it is tied to.
fn check_tied(
    file: &SafetensorsFile,
    used: &HashMap<String, String>,
    params: &HashMap<String, Tensor>,
) -> Result<(), HfError> {
    let untied = |why: String| HfError::Untied {
        path: file.path().to_owned(),
        why,
    };
    let Some(ours) = [
        "transformer.wte.weight",
        "transformer.wte",
        "wte.weight",
        "wte",
    ]
    .iter()
    .find_map(|n| used.get(*n)) else {
        return Err(untied(
            "is present but the model has no token embedding `wte` to tie it to".into(),
        ));
    };
    let wte = &params[ours];
    let shape = file.shape("lm_head.weight").unwrap_or_default();
    if shape != wte.shape.as_slice() {
        return Err(untied(format!(
            "has shape {shape:?}, the token embedding `{ours}` it is tied to {:?}",
            wte.shape
        )));
    }
    check_dtype(file, "lm_head.weight")?;
    let head = file.tensor("lm_head.weight")?;
    if let Some(i) = head
        .data
        .iter()
        .zip(&wte.data)
        .position(|(a, b)| a != b && !(a.is_nan() && b.is_nan()))
    {
        let cols = wte.shape.last().copied().unwrap_or(1).max(1);
        return Err(untied(format!(
            "differs from the token embedding `{ours}` it is tied to (first at [{}, {}]: {} vs {}); \
             the model ties its output layer to the embedding",
            i / cols,
            i % cols,
            head.data[i],
            wte.data[i]
        )));
    }
    Ok(())
}

/// Writes `tensors` (full shape, by name) to `path` as an F32 safetensors file, atomically (a
/// temporary file in the same directory, then a rename).
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), HfError> {
    let mut named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    named.sort_by_key(|(n, _)| *n);
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    Ok(safetensors_io::write_atomic(path, &named, Some(metadata))?)
}

/// Reads every tensor of a safetensors file as `f32`, by name (a dump [`write_safetensors`]
/// wrote, say).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, HfError> {
    let file = SafetensorsFile::open(path)?;
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n)?;
            Ok((n, t))
        })
        .collect()
}

/// The largest token id a `f32` holds exactly (every integer up to 2^24).
const MAX_ID: u64 = 1 << 24;

/// Reads a batch of token ids: one sequence per line, ids separated by spaces, every line as
/// long as the first; blank lines at the end are ignored. Gives a `[lines, length]` integer
/// tensor (ids exact in `f32`). Errors name the line.
pub fn read_tokens(path: &Path) -> Result<Tensor, HfError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: name.clone(),
        source,
    })?;
    let err = |line: usize, why: String| HfError::Tokens {
        path: name.clone(),
        line,
        why,
    };
    let lines: Vec<&str> = text.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .ok_or_else(|| err(0, "no sequences".into()))?;
    let mut width = None;
    let mut data = Vec::new();
    for (i, line) in lines[..=last].iter().enumerate() {
        let n = i + 1;
        let mut count = 0;
        for tok in line.split_whitespace() {
            let id: u64 = tok
                .parse()
                .map_err(|_| err(n, format!("`{tok}` is not a token id")))?;
            if id >= MAX_ID {
                return Err(err(
                    n,
                    format!("token id {id} is too large (ids are below 2^24 = {MAX_ID})"),
                ));
            }
            data.push(id as f32);
            count += 1;
        }
        if count == 0 {
            return Err(err(n, "empty line".into()));
        }
        match width {
            None => width = Some(count),
            Some(w) if w != count => {
                return Err(err(
                    n,
                    format!("{count} token ids, but line 1 has {w} (every sequence is as long)"),
                ))
            }
            Some(_) => {}
        }
    }
    let width = width.unwrap_or(0);
    Ok(Tensor {
        shape: vec![data.len() / width.max(1), width],
        data: data.into(),
    })
}

/// Our parameter names mapped to Hugging Face's `GPT2LMHeadModel` names (`wte` →
/// `transformer.wte.weight`, `h.0.ln_1.weight` → `transformer.h.0.ln_1.weight`), for writing
/// weights a Hugging Face model can load.
pub fn to_hf_names(params: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    params
        .iter()
        .map(|(n, t)| {
            let hf = if n.ends_with(".weight") || n.ends_with(".bias") {
                format!("transformer.{n}")
            } else {
                format!("transformer.{n}.weight")
            };
            (hf, t.clone())
        })
        .collect()
}
