//! Weights out: a ferrotron checkpoint written as a `transformers` model directory, what
//! `ferrotron export-hf` does (the reverse of [`crate::weights`]).
//!
//! ```text
//! checkpoint dir ─► checkpoint::load (full tensors, padding cropped) ─► the `params` group
//! config.json (`--config`, else the checkpoint's `extra.hf_config`, recorded by `train
//!   --weights DIR`) ─► Family (`model_type`) ─► import::model_text ─► the graph it imports to
//!   ─► every parameter of that graph in the checkpoint at its shape (each mismatch named)
//!   ─► import::hf_name (the family's table) ─► DIR/model.safetensors (f32, tied copies left
//!      out as `save_pretrained` leaves them out) + DIR/config.json (the config, as given)
//! ```
//!
//! The model keeps each family's checkpoint layout (see [`crate::weights`]), so a parameter
//! is written as it is, under its checkpoint name. The config is the one the checkpoint's
//! model was imported from: a checkpoint records its parameters, not the hyper-parameters
//! (heads, norm epsilon, rotary base) a `transformers` model also needs.

use crate::checkpoint::{self, CheckpointError};
use crate::hf::{write_safetensors, HfError};
use crate::import::{config_path, hf_name, model_text, Family, ImportError, ImportOptions};
use crate::safetensors_io::{parent_dir, sync_dir, temp_sibling};
use crate::weights::WEIGHTS_FILE;
use ferrotron_exec::Tensor;
use ferrotron_ir::{parse_model, LoadOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a checkpoint could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The config could not be read or imported.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The weights could not be written.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The checkpoint holds no weights (no `params` group).
    #[error("{path}: no `params` group (it holds {groups:?})")]
    NoParams {
        /// The checkpoint.
        path: String,
        /// The groups it holds.
        groups: Vec<String>,
    },
    /// No `--config` was given and the checkpoint records none.
    #[error(
        "{path}: the checkpoint does not record the config.json its model was imported from \
         (it was not trained from `--weights DIR`); pass it with --config"
    )]
    NoConfig {
        /// The checkpoint.
        path: String,
    },
    /// The checkpoint and the model the config imports to disagree on a parameter.
    #[error("{checkpoint}: parameter `{param}` {why} (the model {config} imports to)")]
    Mismatch {
        /// The checkpoint.
        checkpoint: String,
        /// The config.
        config: String,
        /// Our parameter name.
        param: String,
        /// How they disagree.
        why: String,
    },
}

/// Where a checkpoint records the `config.json` its model was imported from: the key of its
/// metadata's `extra` that `train --weights DIR` writes.
pub const HF_CONFIG: &str = "hf_config";

/// What [`export_hf`] wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The config's family.
    pub family: Family,
    /// The tensors written to `model.safetensors`.
    pub tensors: usize,
    /// The optimizer steps the checkpoint had taken.
    pub step: u64,
}

/// Writes checkpoint `checkpoint`'s weights to `out/model.safetensors` under the family's
/// checkpoint names, and the config to `out/config.json`: `config` (a model directory or its
/// `config.json`), or without it the one the checkpoint recorded ([`HF_CONFIG`]). Every
/// parameter of the model the config imports to must be in the checkpoint at its shape, and no
/// other. The files are written atomically, one each.
pub fn export_hf(
    checkpoint: &Path,
    config: Option<&Path>,
    out: &Path,
) -> Result<Exported, ExportError> {
    let (meta, mut groups) = checkpoint::load(checkpoint)?;
    let shown = checkpoint.display().to_string();
    let Some(params) = groups.remove("params") else {
        return Err(ExportError::NoParams {
            path: shown,
            groups: meta.groups,
        });
    };

    let (config_shown, text) = match config {
        Some(config) => {
            let config = config_path(config);
            let shown = config.display().to_string();
            let text = std::fs::read_to_string(&config).map_err(|e| ImportError {
                file: shown.clone(),
                kind: Box::new(e.into()),
            })?;
            (shown, text)
        }
        None => match meta.extra.get(HF_CONFIG) {
            Some(json) => (
                format!("{shown} (its recorded config.json)"),
                serde_json::to_string_pretty(json).unwrap_or_default() + "\n",
            ),
            None => return Err(ExportError::NoConfig { path: shown }),
        },
    };
    let import_err = |kind| ImportError {
        file: config_shown.clone(),
        kind: Box::new(kind),
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| import_err(e.into()))?;
    let imported = model_text(&json, &config_shown, &meta.model, &ImportOptions::default())
        .map_err(import_err)?;
    let graph = parse_model(&imported.text, &config_shown, &LoadOptions::default())
        .map_err(|e| import_err(crate::import::ImportErrorKind::Load(e)))?;
    let family = imported.family;

    let mismatch = |param: &str, why: String| ExportError::Mismatch {
        checkpoint: shown.clone(),
        config: config_shown.clone(),
        param: param.to_owned(),
        why,
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(params.len());
    for p in graph.params.values() {
        let expected: Vec<usize> = graph.ty(p.value).shape.extents();
        let Some(t) = params.get(&p.name) else {
            return Err(mismatch(
                &p.name,
                format!("{expected:?} is not in the checkpoint"),
            ));
        };
        if t.shape != expected {
            return Err(mismatch(
                &p.name,
                format!("has shape {:?} in the checkpoint, {expected:?} in", t.shape),
            ));
        }
        let Some(name) = hf_name(family, &p.name) else {
            return Err(mismatch(
                &p.name,
                format!("has no {} checkpoint name in", family.architecture()),
            ));
        };
        tensors.insert(name, t.clone());
    }
    if let Some(extra) = params
        .keys()
        .filter(|n| !graph.params.values().any(|p| &p.name == *n))
        .min()
    {
        return Err(mismatch(extra, "is not a parameter of".into()));
    }

    std::fs::create_dir_all(out).map_err(|source| ExportError::Io {
        path: out.display().to_string(),
        source,
    })?;
    write_safetensors(&out.join(WEIGHTS_FILE), &tensors)?;
    write_text(&out.join("config.json"), &text)?;
    Ok(Exported {
        family,
        tensors: tensors.len(),
        step: meta.step,
    })
}

/// `text` to `path` through a temporary sibling and a rename.
fn write_text(path: &Path, text: &str) -> Result<(), ExportError> {
    let io = |p: &PathBuf, source| ExportError::Io {
        path: p.display().to_string(),
        source,
    };
    let tmp = temp_sibling(path, "tmp");
    let result = std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| io(&path.to_path_buf(), e));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let dir = parent_dir(path);
    sync_dir(&dir).map_err(|e| io(&dir, e))
}
