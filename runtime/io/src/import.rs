//! Hugging Face `config.json` in, model file out: what `ferrotron import` writes, so that a
//! `transformers` architecture can be partitioned, run and trained without writing its model
//! file by hand.
//!
//! ```text
//! config.json ─► Config (serde_json; records every key it reads) ─► Family (`model_type`)
//!   ─► the family's template, the block structure of a zoo file with the config's values as
//!      named dimensions:
//!        gpt2                  ─► gpt2-small.ron's `gpt_layer` (pre-LayerNorm, fused c_attn)
//!        llama, mistral, qwen2 ─► llama3-8b.ron's `llama_layer` (pre-RMSNorm, SwiGLU, rotary,
//!                                 grouped-query attention), with the family's biases
//!        bert                  ─► bert-large.ron's `bert_layer` (post-LayerNorm, MLM head)
//!   ─► RON text ─► temporary file ─► ferrotron_ir::load_model (it must load) ─► renamed in place
//! hf_names(family): each template's parameters ↔ the checkpoint's tensor names (weights in)
//! ```
//!
//! Llama, Mistral and Qwen2 share one template: they are the same decoder and differ only in
//! which projections carry biases (Qwen2: q, k, v; Llama with `attention_bias`: q, k, v, o) and
//! in Mistral's and Qwen2's sliding window; Llama 3.1's `llama3` `rope_scaling` becomes the
//! rotary ops' `scaling`. A config the IR cannot express exactly is refused with the key and
//! value that make it so (any other `rope_scaling`, a sliding window shorter than the sequence, a `head_dim` that is not `hidden_size / num_attention_heads`, ...): the
//! import never writes a model that computes something else than the checkpoint's.

use crate::safetensors_io::{parent_dir, sync_dir, temp_sibling};
use ferrotron_ir::{load_model, Graph, LoadOptions, ModelError, RopeScaling};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The architectures the importer knows, by the `model_type` of their `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `gpt2`: GPT-2 (`GPT2LMHeadModel`).
    Gpt2,
    /// `llama`: Llama 1, 2 and 3 (`LlamaForCausalLM`).
    Llama,
    /// `mistral`: Mistral (`MistralForCausalLM`).
    Mistral,
    /// `qwen2`: Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`).
    Qwen2,
    /// `bert`: BERT with its masked-language-model head (`BertForMaskedLM`).
    Bert,
}

impl Family {
    /// Every family, in the order errors list them.
    pub const ALL: [Family; 5] = [
        Family::Gpt2,
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Bert,
    ];

    /// The `model_type` of the family's `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Bert => "bert",
        }
    }

    /// The family whose `config.json` says `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// The zoo file whose block structure the family's template reuses.
    pub fn zoo_file(self) -> &'static str {
        match self {
            Family::Gpt2 => "models/gpt2-small.ron",
            Family::Llama | Family::Mistral | Family::Qwen2 => "models/llama3-8b.ron",
            Family::Bert => "models/bert-large.ron",
        }
    }

    /// The `transformers` class whose parameters the model has.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Bert => "BertForMaskedLM",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Why a config could not be imported, with the file concerned: the config, or the model file
/// being written.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct ImportError {
    /// The file as the user named it.
    pub file: String,
    /// What is wrong (boxed: errors are rare, and the `Result`s that carry them are not).
    pub kind: Box<ImportErrorKind>,
}

/// What is wrong with a config, or with writing its model file.
#[derive(Debug, thiserror::Error)]
pub enum ImportErrorKind {
    /// The file could not be read, written or renamed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an object of keys.
    #[error("a config.json is a JSON object of keys, found {0}")]
    NotAnObject(String),
    /// A `model_type` the importer has no template for.
    #[error("`model_type` = {found} is not supported; supported: {}", supported())]
    UnknownModelType {
        /// The config's `model_type` (as JSON), or `none` where it has none.
        found: String,
    },
    /// A key the family needs is absent.
    #[error("`{key}` is missing (a `{family}` config needs it)")]
    Missing {
        /// The key.
        key: &'static str,
        /// The config's family.
        family: Family,
    },
    /// A key whose value has the wrong JSON type or range.
    #[error("`{key}` = {value}: expected {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// Its value, as JSON.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A key whose value the IR cannot express (or a model option out of range): importing it
    /// would write a model that computes something else than the checkpoint's.
    #[error("`{key}` = {value} is not supported: {why}")]
    Unsupported {
        /// The key (`rope_scaling`), or the option (`--seq`).
        key: String,
        /// Its value, as JSON.
        value: String,
        /// Why, and what would work.
        why: String,
    },
    /// The generated model does not load: a bug in the importer, reported rather than written.
    #[error("internal error, the generated model does not load: {0}")]
    Load(ModelError),
}

fn supported() -> String {
    Family::ALL
        .iter()
        .map(|f| format!("`{}`", f.model_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unsupported(key: &str, value: impl fmt::Display, why: impl Into<String>) -> ImportErrorKind {
    ImportErrorKind::Unsupported {
        key: key.to_owned(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// What the written model may differ in from the config's defaults.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The model's name; `None`: the output file's name without `.ron`.
    pub name: Option<String>,
    /// The `seq` dimension (a default: `--dim seq=N` overrides it when the model is loaded);
    /// `None`: the config's context length, at most [`DEFAULT_MAX_SEQ`] (and the sliding window,
    /// where there is one).
    pub seq: Option<u64>,
    /// The `batch` dimension (a default, like `seq`).
    pub batch: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            name: None,
            seq: None,
            batch: 8,
        }
    }
}

/// The longest default sequence: a training default, not the model's limit (`--seq`, or
/// `--dim seq=N` at load time, ask for another).
pub const DEFAULT_MAX_SEQ: u64 = 2048;

/// A generated model file and what the user should know about it.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The config's family.
    pub family: Family,
    /// The model file's text.
    pub text: String,
    /// Choices the import made that the config did not (a default sequence shortened to the
    /// sliding window).
    pub notes: Vec<String>,
    /// The config's keys that the import neither read nor knows to be irrelevant to the graph
    /// (a newer `transformers` may add some): the user should check that they change nothing.
    pub unread: Vec<String>,
}

/// The `config.json` that `input` names: the file itself, or the one in the directory.
pub fn config_path(input: &Path) -> PathBuf {
    if input.is_dir() {
        input.join("config.json")
    } else {
        input.to_path_buf()
    }
}

/// Reads the config `input` names (a model directory or its `config.json`), writes its model
/// file to `output` atomically (a temporary sibling, loaded with [`load_model`], then renamed
/// over `output`) and returns it with the loaded graph. On any error nothing is left at
/// `output` that was not there before.
pub fn import(
    input: &Path,
    output: &Path,
    opts: &ImportOptions,
) -> Result<(Imported, Graph), ImportError> {
    let config = config_path(input);
    let config_file = config.display().to_string();
    let err = |file: &str, kind: ImportErrorKind| ImportError {
        file: file.to_owned(),
        kind: Box::new(kind),
    };
    let text = std::fs::read_to_string(&config).map_err(|e| err(&config_file, e.into()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| err(&config_file, e.into()))?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "imported".into()),
    };
    let imported =
        model_text(&json, &config_file, &name, opts).map_err(|k| err(&config_file, k))?;
    let out_file = output.display().to_string();
    let graph = write_checked(output, &imported.text).map_err(|k| err(&out_file, k))?;
    Ok((imported, graph))
}

/// Writes `text` to a temporary sibling of `path`, loads it, and only then renames it over
/// `path`; the temporary file is removed on any failure.
fn write_checked(path: &Path, text: &str) -> Result<Graph, ImportErrorKind> {
    let tmp = temp_sibling(path, "tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        let graph = load_model(&tmp, &LoadOptions::default()).map_err(ImportErrorKind::Load)?;
        std::fs::rename(&tmp, path)?;
        sync_dir(&parent_dir(path))?;
        Ok(graph)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The model file for the config `json` (read from `source`, which the file's header names).
pub fn model_text(
    json: &Value,
    source: &str,
    name: &str,
    opts: &ImportOptions,
) -> Result<Imported, ImportErrorKind> {
    let Value::Object(map) = json else {
        return Err(ImportErrorKind::NotAnObject(json_kind(json).into()));
    };
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(unsupported(
            "--name",
            Value::from(name),
            "a model name is non-empty, without quotes, backslashes or control characters",
        ));
    }
    let family = match map.get("model_type") {
        Some(Value::String(t)) => {
            Family::from_model_type(t).ok_or_else(|| ImportErrorKind::UnknownModelType {
                found: Value::from(t.as_str()).to_string(),
            })?
        }
        Some(other) => {
            return Err(ImportErrorKind::UnknownModelType {
                found: other.to_string(),
            })
        }
        None => {
            return Err(ImportErrorKind::UnknownModelType {
                found: "none (the key is missing)".into(),
            })
        }
    };
    if opts.batch == 0 {
        return Err(unsupported(
            "--batch",
            0,
            "the batch has at least one sequence",
        ));
    }
    if opts.seq == Some(0) {
        return Err(unsupported("--seq", 0, "a sequence has at least one token"));
    }
    let mut cfg = Config {
        map,
        family,
        read: BTreeSet::new(),
    };
    let mut notes = Vec::new();
    let model = match family {
        Family::Gpt2 => gpt2(&mut cfg, opts)?,
        Family::Llama | Family::Mistral | Family::Qwen2 => decoder(&mut cfg, opts, &mut notes)?,
        Family::Bert => bert(&mut cfg, opts)?,
    };
    // The path goes into a line comment: a line break in it would end the comment.
    let source: String = source
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let text = model.render(name, &source);
    Ok(Imported {
        family,
        text,
        notes,
        unread: cfg.unread(),
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ----------------------------------------------------------------------------------------------
// The config's keys.

/// A config's keys, read one at a time; `null` reads as absent (`"n_inner": null`). Every key
/// read is recorded, so the ones nobody read can be reported.
struct Config<'a> {
    map: &'a Map<String, Value>,
    family: Family,
    read: BTreeSet<&'static str>,
}

/// Keys of every config that do not change the graph: names, token ids, dtype, caching, labels.
const IRRELEVANT: &[&str] = &[
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "tokenizer_class",
    "task_specific_params",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "gradient_checkpointing",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
    "_attn_implementation_autoset",
];

impl<'a> Config<'a> {
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.read.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(key: &'static str, v: &Value, expected: &'static str) -> ImportErrorKind {
        ImportErrorKind::WrongType {
            key,
            value: v.to_string(),
            expected,
        }
    }

    /// A positive integer.
    fn size_or(&mut self, key: &'static str, default: Option<u64>) -> Result<u64, ImportErrorKind> {
        match self.get(key) {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n),
                _ => Err(Self::wrong(key, v, "a positive integer")),
            },
            None => default.ok_or(ImportErrorKind::Missing {
                key,
                family: self.family,
            }),
        }
    }

    fn size(&mut self, key: &'static str) -> Result<u64, ImportErrorKind> {
        self.size_or(key, None)
    }

    /// A finite number in `range`.
    fn number_or(
        &mut self,
        key: &'static str,
        default: f64,
        range: std::ops::Range<f64>,
        expected: &'static str,
    ) -> Result<f64, ImportErrorKind> {
        match self.get(key) {
            Some(v) => match v.as_f64() {
                Some(x) if range.contains(&x) => Ok(x),
                _ => Err(Self::wrong(key, v, expected)),
            },
            None => Ok(default),
        }
    }

    fn eps_or(&mut self, key: &'static str, default: f64) -> Result<f64, ImportErrorKind> {
        self.number_or(key, default, f64::MIN_POSITIVE..1.0, "a number in (0, 1)")
    }

    fn dropout_or(&mut self, key: &'static str, default: f64) -> Result<f64, ImportErrorKind> {
        self.number_or(key, default, 0.0..1.0, "a probability in [0, 1)")
    }

    fn std(&mut self) -> Result<f64, ImportErrorKind> {
        self.number_or(
            "initializer_range",
            0.02,
            f64::MIN_POSITIVE..f64::INFINITY,
            "a positive number",
        )
    }

    fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool, ImportErrorKind> {
        match self.get(key) {
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Self::wrong(key, v, "true or false")),
            None => Ok(default),
        }
    }

    fn str_or(&mut self, key: &'static str, default: &'a str) -> Result<&'a str, ImportErrorKind> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(Self::wrong(key, v, "a string")),
            None => Ok(default),
        }
    }

    /// Keys that change nothing the model computes (numerics, other heads' settings).
    fn irrelevant(&mut self, keys: &[&'static str]) {
        self.read.extend(keys);
    }

    /// A key that must keep its default: any other value is refused with `why`.
    fn require(
        &mut self,
        key: &'static str,
        default: bool,
        why: &str,
    ) -> Result<(), ImportErrorKind> {
        let b = self.bool_or(key, default)?;
        if b != default {
            return Err(unsupported(key, b, why));
        }
        Ok(())
    }

    fn unread(&self) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.read.contains(k.as_str()) && !IRRELEVANT.contains(&k.as_str()))
            .cloned()
            .collect()
    }
}

/// The op of a `transformers` activation name (`hidden_act`, `activation_function`).
fn activation(key: &'static str, name: &str) -> Result<&'static str, ImportErrorKind> {
    Ok(match name {
        "gelu" => "Gelu",
        // `gelu_fast` is the same tanh formula as `gelu_new`, computed in another order.
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => "GeluTanh",
        "silu" | "swish" => "Silu",
        "relu" => "Relu",
        other => {
            return Err(unsupported(
                key,
                Value::from(other),
                "the IR has gelu (exact), gelu_new / gelu_pytorch_tanh / gelu_fast (tanh), \
                 silu and relu",
            ))
        }
    })
}

/// How a header comment names an activation op.
fn activation_words(op: &str) -> &'static str {
    match op {
        "Gelu" => "exact GeLU",
        "GeluTanh" => "GeLU (tanh approximation)",
        "Silu" => "SiLU",
        _ => "ReLU",
    }
}

/// Checks that `num` (of `num_key`) is a multiple of `den` (of `den_key`).
fn divides(
    den_key: &'static str,
    den: u64,
    num_key: &'static str,
    num: u64,
) -> Result<(), ImportErrorKind> {
    if !num.is_multiple_of(den) {
        return Err(unsupported(
            den_key,
            den,
            format!("it does not divide `{num_key}` = {num}"),
        ));
    }
    Ok(())
}

/// The default sequence, or the user's, checked against a learned position table of
/// `positions` rows (`key` in the config).
fn learned_positions_seq(
    opts: &ImportOptions,
    key: &'static str,
    positions: u64,
    cap: u64,
) -> Result<u64, ImportErrorKind> {
    match opts.seq {
        Some(seq) if seq > positions => Err(unsupported(
            key,
            positions,
            format!("--seq {seq} is longer than the learned position table"),
        )),
        Some(seq) => Ok(seq),
        None => Ok(positions.min(cap)),
    }
}

// ----------------------------------------------------------------------------------------------
// The model file's text, laid out as the zoo's files are.

/// One line of a section: a comment, or a `"key": value` entry.
enum Line {
    Comment(String),
    Entry(String, String),
}

fn entry(key: impl Into<String>, value: impl Into<String>) -> Line {
    Line::Entry(key.into(), value.into())
}

fn comment(text: impl Into<String>) -> Line {
    Line::Comment(text.into())
}

/// A dimension: a number, or an expression over other dimensions (quoted).
fn dim(name: &str, value: u64) -> Line {
    entry(name, value.to_string())
}

fn dim_expr(name: &str, expr: &str) -> Line {
    entry(name, format!("\"{expr}\""))
}

/// `Param(shape: [...], init: ...)`.
fn param(name: &str, shape: &[&str], init: &str) -> Line {
    let shape: Vec<String> = shape.iter().map(|d| format!("\"{d}\"")).collect();
    entry(
        name,
        format!("Param(shape: [{}], init: {init})", shape.join(", ")),
    )
}

fn normal(std: f64) -> String {
    format!("Normal(std: {})", num(std))
}

/// A float as RON reads it back exactly: `1e-5`, `0.1`, `500000.0`.
fn num(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else if x.abs() < 1e-3 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// The single block every template repeats.
struct BlockText {
    name: &'static str,
    comment: String,
    params: Vec<Line>,
    body: Vec<Line>,
}

/// A model file before rendering.
struct ModelText {
    /// The header comment, after the line that names the source.
    header: Vec<String>,
    family: Family,
    description: String,
    dims: Vec<Line>,
    inputs: Vec<Line>,
    params: Vec<Line>,
    block: BlockText,
    body: Vec<Line>,
}

impl ModelText {
    fn render(&self, name: &str, source: &str) -> String {
        let mut out = format!(
            "// {name}: written by `ferrotron import` from a `{}` config.json\n// ({source}).\n",
            self.family
        );
        for line in &self.header {
            out.push_str(&format!("// {line}\n"));
        }
        out.push_str("Model(\n");
        out.push_str(&format!("    name: \"{name}\",\n"));
        out.push_str(&format!("    description: \"{}\",\n", self.description));
        section(&mut out, 1, "dims", &self.dims);
        section(&mut out, 1, "inputs", &self.inputs);
        section(&mut out, 1, "params", &self.params);
        out.push_str("    blocks: {\n");
        let b = &self.block;
        out.push_str(&format!("        // {}\n", b.comment));
        out.push_str(&format!("        \"{}\": Block(\n", b.name));
        out.push_str("            inputs: [\"x\"],\n");
        section(&mut out, 3, "params", &b.params);
        section(&mut out, 3, "body", &b.body);
        out.push_str("            outputs: [\"y\"],\n");
        out.push_str("        ),\n");
        out.push_str("    },\n");
        section(&mut out, 1, "body", &self.body);
        out.push_str("    outputs: [\"loss\", \"logits\"],\n");
        out.push_str(")\n");
        out
    }
}

fn section(out: &mut String, depth: usize, key: &str, lines: &[Line]) {
    let pad = "    ".repeat(depth);
    out.push_str(&format!("{pad}{key}: {{\n"));
    for line in lines {
        match line {
            Line::Comment(c) => out.push_str(&format!("{pad}    // {c}\n")),
            Line::Entry(k, v) => out.push_str(&format!("{pad}    \"{k}\": {v},\n")),
        }
    }
    out.push_str(&format!("{pad}}},\n"));
}

/// `"y": Dropout(x: "x", p: ...)` where the config drops anything; otherwise `y` is `x` and no
/// line is written. Returns the name the next statement reads.
fn dropout(body: &mut Vec<Line>, y: &str, x: &str, p: f64) -> String {
    if p > 0.0 {
        body.push(entry(y, format!("Dropout(x: \"{x}\", p: {})", num(p))));
        y.to_owned()
    } else {
        x.to_owned()
    }
}

/// `y = x · w`, nn.Linear's `[out, in]` weight (hence `transpose_b`), as the zoo's Llama
/// writes it.
fn linear(body: &mut Vec<Line>, y: &str, x: &str, weight: &str) {
    body.push(entry(
        y,
        format!("MatMul(a: \"{x}\", b: \"{weight}\", transpose_b: true)"),
    ));
}

/// `mm = x · w`, then `y = mm + b`, as the zoo's BERT writes it.
fn linear_bias(body: &mut Vec<Line>, (mm, y): (&str, &str), x: &str, weight: &str, bias: &str) {
    linear(body, mm, x, weight);
    body.push(entry(y, format!("Add(\"{mm}\", \"{bias}\")")));
}

// ----------------------------------------------------------------------------------------------
// GPT-2: models/gpt2-small.ron's graph.

fn gpt2(cfg: &mut Config, opts: &ImportOptions) -> Result<ModelText, ImportErrorKind> {
    let vocab = cfg.size("vocab_size")?;
    // Early configs name the context `n_ctx`; later ones carry both, equal.
    let n_ctx = cfg.size_or("n_ctx", Some(0))?;
    let positions = cfg.size_or("n_positions", (n_ctx > 0).then_some(n_ctx))?;
    let hidden = cfg.size("n_embd")?;
    let heads = cfg.size("n_head")?;
    let layers = cfg.size("n_layer")?;
    divides("n_head", heads, "n_embd", hidden)?;
    let n_inner = match cfg.get("n_inner") {
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| Config::wrong("n_inner", v, "a positive integer or null"))?,
        ),
        None => None,
    };
    let act = activation(
        "activation_function",
        cfg.str_or("activation_function", "gelu_new")?,
    )?;
    let eps = cfg.eps_or("layer_norm_epsilon", 1e-5)?;
    let resid = cfg.dropout_or("resid_pdrop", 0.1)?;
    let embd = cfg.dropout_or("embd_pdrop", 0.1)?;
    let attn = cfg.dropout_or("attn_pdrop", 0.1)?;
    let std = cfg.std()?;
    let tied = cfg.bool_or("tie_word_embeddings", true)?;
    cfg.require(
        "scale_attn_weights",
        true,
        "the template scales the attention scores by 1/sqrt(head_dim)",
    )?;
    cfg.require(
        "scale_attn_by_inverse_layer_idx",
        false,
        "the scale would differ per layer, and the layers are copies of one block",
    )?;
    cfg.require(
        "add_cross_attention",
        false,
        "cross-attention needs an encoder's states; the template is a decoder-only LM",
    )?;
    // Numerics (fp16 upcasting) and the settings of heads the LM model does not have.
    cfg.irrelevant(&[
        "reorder_and_upcast_attn",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
    ]);
    let seq = learned_positions_seq(opts, "n_positions", positions, DEFAULT_MAX_SEQ)?;

    let mut dims = vec![
        dim("vocab", vocab),
        dim("positions", positions),
        dim("seq", seq),
        dim("batch", opts.batch),
        dim("hidden", hidden),
        dim("heads", heads),
        dim_expr("head_dim", "hidden / heads"),
    ];
    dims.push(match n_inner {
        None => dim_expr("ffn", "4 * hidden"),
        Some(n) => dim("ffn", n),
    });
    dims.push(dim("layers", layers));

    let w = normal(std);
    let mut params = vec![
        param("wte", &["vocab", "hidden"], &w),
        param("wpe", &["positions", "hidden"], &w),
        param("ln_f.weight", &["hidden"], "Ones"),
        param("ln_f.bias", &["hidden"], "Zeros"),
    ];
    if !tied {
        params.push(param("lm_head.weight", &["vocab", "hidden"], &w));
    }

    let e = num(eps);
    let block_params = vec![
        param("ln_1.weight", &["hidden"], "Ones"),
        param("ln_1.bias", &["hidden"], "Zeros"),
        comment("Fused q|k|v projection, [in, out] as in GPT-2's Conv1D."),
        param("attn.c_attn.weight", &["hidden", "3 * hidden"], &w),
        param("attn.c_attn.bias", &["3 * hidden"], "Zeros"),
        param("attn.c_proj.weight", &["hidden", "hidden"], &w),
        param("attn.c_proj.bias", &["hidden"], "Zeros"),
        param("ln_2.weight", &["hidden"], "Ones"),
        param("ln_2.bias", &["hidden"], "Zeros"),
        param("mlp.c_fc.weight", &["hidden", "ffn"], &w),
        param("mlp.c_fc.bias", &["ffn"], "Zeros"),
        param("mlp.c_proj.weight", &["ffn", "hidden"], &w),
        param("mlp.c_proj.bias", &["hidden"], "Zeros"),
    ];
    let mut b = vec![
        comment("Self-attention."),
        entry(
            "ln1",
            format!("LayerNorm(x: \"x\", weight: \"ln_1.weight\", bias: \"ln_1.bias\", eps: {e})"),
        ),
        entry("qkv_mm", "MatMul(a: \"ln1\", b: \"attn.c_attn.weight\")"),
        entry("qkv", "Add(\"qkv_mm\", \"attn.c_attn.bias\")"),
        entry(
            "q, k, v",
            "Split(x: \"qkv\", dim: -1, sizes: [\"hidden\", \"hidden\", \"hidden\"])",
        ),
    ];
    attention_core(&mut b, None, attn, true);
    b.push(entry(
        "attn_mm",
        "MatMul(a: \"ctx_flat\", b: \"attn.c_proj.weight\")",
    ));
    b.push(entry("attn_out", "Add(\"attn_mm\", \"attn.c_proj.bias\")"));
    let attn_out = dropout(&mut b, "attn_drop", "attn_out", resid);
    b.push(entry("res1", format!("Add(\"x\", \"{attn_out}\")")));
    b.extend([
        comment("MLP."),
        entry(
            "ln2",
            format!(
                "LayerNorm(x: \"res1\", weight: \"ln_2.weight\", bias: \"ln_2.bias\", eps: {e})"
            ),
        ),
        entry("fc_mm", "MatMul(a: \"ln2\", b: \"mlp.c_fc.weight\")"),
        entry("fc", "Add(\"fc_mm\", \"mlp.c_fc.bias\")"),
        entry("act", format!("{act}(\"fc\")")),
        entry("proj_mm", "MatMul(a: \"act\", b: \"mlp.c_proj.weight\")"),
        entry("proj", "Add(\"proj_mm\", \"mlp.c_proj.bias\")"),
    ]);
    let mlp_out = dropout(&mut b, "mlp_drop", "proj", resid);
    b.push(entry("y", format!("Add(\"res1\", \"{mlp_out}\")")));

    let mut body = vec![
        entry("tok_emb", "Embedding(table: \"wte\", ids: \"tokens\")"),
        entry(
            "pos_emb",
            "Slice(x: \"wpe\", dim: 0, start: 0, end: \"seq\")",
        ),
        entry("emb", "Add(\"tok_emb\", \"pos_emb\")"),
    ];
    let emb = dropout(&mut body, "emb_drop", "emb", embd);
    body.push(entry(
        "h",
        format!("Repeat(block: \"gpt_layer\", times: \"layers\", inputs: [\"{emb}\"])"),
    ));
    body.push(entry(
        "ln_f",
        format!("LayerNorm(x: \"h\", weight: \"ln_f.weight\", bias: \"ln_f.bias\", eps: {e})"),
    ));
    if tied {
        body.push(comment(
            "The output layer is tied to the token embedding: the same parameter, used transposed.",
        ));
        body.push(entry(
            "logits",
            "MatMul(a: \"ln_f\", b: \"wte\", transpose_b: true)",
        ));
    } else {
        body.push(comment(
            "The output layer is its own parameter (`tie_word_embeddings` is false).",
        ));
        body.push(entry(
            "logits",
            "MatMul(a: \"ln_f\", b: \"lm_head.weight\", transpose_b: true)",
        ));
    }
    body.push(entry(
        "loss",
        "CrossEntropy(logits: \"logits\", targets: \"tokens\")",
    ));

    Ok(ModelText {
        header: vec![
            "GPT-2's graph as models/gpt2-small.ron writes it: pre-LayerNorm layers, fused q|k|v,"
                .into(),
            format!(
                "Conv1D weights in [in, out] orientation, {}. Parameter names are",
                activation_words(act)
            ),
            "Hugging Face's GPT2LMHeadModel names without the `transformer.` prefix, the embeddings"
                .into(),
            "`wte` and `wpe` (`transformer.wte.weight`; `ferrotron_io::import::hf_names`).".into(),
        ],
        family: Family::Gpt2,
        description: format!(
            "GPT-2: {layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}"
        ),
        dims,
        inputs: vec![entry(
            "tokens",
            "Input(shape: [\"batch\", \"seq\"], dtype: I64)",
        )],
        params,
        block: BlockText {
            name: "gpt_layer",
            comment: "One pre-LayerNorm transformer layer: x + attn(ln_1(x)), then + mlp(ln_2(.))."
                .into(),
            params: block_params,
            body: b,
        },
        body,
    })
}

/// Multi-head attention from `q`, `k`, `v` (`[batch, seq, hidden]`) to `ctx_flat`, as the zoo
/// writes it: heads apart, scores scaled by `1/sqrt(head_dim)`, softmax, dropout of the
/// probabilities, heads together. With rotary arguments (`base: …`, the Llama family), q and k are rotated
/// and each of the `kv_heads` key/value heads is expanded to its `group` of query heads
/// (Hugging Face's `repeat_kv`) first.
fn attention_core(b: &mut Vec<Line>, rotary: Option<&str>, p: f64, causal: bool) {
    let kv_heads = if rotary.is_some() {
        "kv_heads"
    } else {
        "heads"
    };
    b.push(entry(
        "q_heads",
        "Reshape(x: \"q\", shape: [\"batch\", \"seq\", \"heads\", \"head_dim\"])",
    ));
    for x in ["k", "v"] {
        b.push(entry(
            format!("{x}_heads"),
            format!(
                "Reshape(x: \"{x}\", shape: [\"batch\", \"seq\", \"{kv_heads}\", \"head_dim\"])"
            ),
        ));
    }
    let (q, k, v) = match rotary {
        None => ("q_heads", "k_heads", "v_heads"),
        Some(args) => {
            b.push(entry("q_rot", format!("Rotary(x: \"q_heads\", {args})")));
            b.push(entry("k_rot", format!("Rotary(x: \"k_heads\", {args})")));
            for (y, x) in [("k", "k_rot"), ("v", "v_heads")] {
                b.push(entry(
                    format!("{y}_grouped"),
                    format!("Reshape(x: \"{x}\", shape: [\"batch\", \"seq\", \"kv_heads\", 1, \"head_dim\"])"),
                ));
            }
            for y in ["k", "v"] {
                b.push(entry(
                    format!("{y}_repeated"),
                    format!("Expand(x: \"{y}_grouped\", shape: [\"batch\", \"seq\", \"kv_heads\", \"group\", \"head_dim\"])"),
                ));
            }
            for y in ["k", "v"] {
                b.push(entry(
                    format!("{y}_all"),
                    format!("Reshape(x: \"{y}_repeated\", shape: [\"batch\", \"seq\", \"heads\", \"head_dim\"])"),
                ));
            }
            ("q_rot", "k_all", "v_all")
        }
    };
    for (y, x) in [("q_t", q), ("k_t", k), ("v_t", v)] {
        b.push(entry(
            y,
            format!("Transpose(x: \"{x}\", perm: [0, 2, 1, 3])"),
        ));
    }
    b.push(entry(
        "scores",
        "MatMul(a: \"q_t\", b: \"k_t\", transpose_b: true)",
    ));
    b.push(entry(
        "scaled",
        "Scale(x: \"scores\", factor: InvSqrt(\"head_dim\"))",
    ));
    if causal {
        b.push(entry("probs", "Softmax(x: \"scaled\", causal: true)"));
    } else {
        b.push(comment("Bidirectional: no causal mask."));
        b.push(entry("probs", "Softmax(x: \"scaled\")"));
    }
    let probs = dropout(b, "probs_drop", "probs", p);
    b.push(entry("ctx", format!("MatMul(a: \"{probs}\", b: \"v_t\")")));
    b.push(entry("ctx_t", "Transpose(x: \"ctx\", perm: [0, 2, 1, 3])"));
    b.push(entry(
        "ctx_flat",
        "Reshape(x: \"ctx_t\", shape: [\"batch\", \"seq\", \"hidden\"])",
    ));
}

// ----------------------------------------------------------------------------------------------
// Llama, Mistral, Qwen2: models/llama3-8b.ron's graph.

fn decoder(
    cfg: &mut Config,
    opts: &ImportOptions,
    notes: &mut Vec<String>,
) -> Result<ModelText, ImportErrorKind> {
    let family = cfg.family;
    let vocab = cfg.size("vocab_size")?;
    let hidden = cfg.size("hidden_size")?;
    let heads = cfg.size("num_attention_heads")?;
    // transformers' default: as many key/value heads as query heads (Llama 1 and 2 7B).
    let kv_heads = cfg.size_or("num_key_value_heads", Some(heads))?;
    let ffn = cfg.size("intermediate_size")?;
    let layers = cfg.size("num_hidden_layers")?;
    let context = cfg.size("max_position_embeddings")?;
    divides("num_attention_heads", heads, "hidden_size", hidden)?;
    divides(
        "num_key_value_heads",
        kv_heads,
        "num_attention_heads",
        heads,
    )?;
    if let Some(v) = cfg.get("head_dim") {
        if v.as_u64() != Some(hidden / heads) {
            return Err(unsupported(
                "head_dim",
                v,
                format!(
                    "the template's heads are hidden_size / num_attention_heads = {} wide",
                    hidden / heads
                ),
            ));
        }
    }
    let eps = cfg.eps_or("rms_norm_eps", 1e-6)?;
    let theta = cfg.number_or(
        "rope_theta",
        10000.0,
        1.0..f64::INFINITY,
        "a number of at least 1",
    )?;
    // Llama 3.1's frequency rescaling; any other rope_scaling is refused.
    let scaling = match cfg.get("rope_scaling") {
        None => None,
        Some(v) => {
            let kind = v
                .get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "llama3" {
                return Err(unsupported(
                    "rope_scaling",
                    v,
                    "only Llama 3.1's `llama3` rescaling of the rotary frequencies is \
                     supported: the IR's Rotary rotates by position · frequency",
                ));
            }
            let field = |name: &str| v.get(name).and_then(Value::as_f64);
            let scaling = match (
                field("factor"),
                field("low_freq_factor"),
                field("high_freq_factor"),
                v.get("original_max_position_embeddings")
                    .and_then(Value::as_u64),
            ) {
                (Some(factor), Some(low), Some(high), Some(context)) => RopeScaling {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position: context,
                },
                _ => {
                    return Err(unsupported(
                        "rope_scaling",
                        v,
                        "`llama3` rescaling needs factor, low_freq_factor, high_freq_factor \
                         and original_max_position_embeddings",
                    ))
                }
            };
            if let Err(why) = ferrotron_ir::index::rope_scaling(&scaling) {
                return Err(unsupported("rope_scaling", v, why));
            }
            Some(scaling)
        }
    };
    let act = activation("hidden_act", cfg.str_or("hidden_act", "silu")?)?;
    let attn_drop = cfg.dropout_or("attention_dropout", 0.0)?;
    let std = cfg.std()?;
    let tied = cfg.bool_or("tie_word_embeddings", false)?;
    // Which projections carry biases: Qwen2's q, k and v always; Llama's q, k, v and o with
    // `attention_bias`; Mistral's none.
    let (qkv_bias, o_bias) = match family {
        Family::Qwen2 => (true, false),
        Family::Llama => {
            let b = cfg.bool_or("attention_bias", false)?;
            (b, b)
        }
        _ => {
            cfg.require(
                "attention_bias",
                false,
                "Mistral's projections have no biases",
            )?;
            (false, false)
        }
    };
    if family == Family::Llama {
        cfg.require(
            "mlp_bias",
            false,
            "the template's MLP projections have no biases",
        )?;
        // Splits the projections' matmuls into slices summed again: the same function.
        cfg.irrelevant(&["pretraining_tp"]);
    }
    // The sliding window: Mistral's `sliding_window` (transformers' default 4096; null turns it
    // off); Qwen2's only with `use_sliding_window`, or layers of `layer_types` that use it.
    let window = match family {
        Family::Mistral => {
            match cfg.get("sliding_window") {
                None if cfg.map.contains_key("sliding_window") => None,
                None => Some(4096),
                Some(v) => Some(v.as_u64().filter(|&w| w > 0).ok_or_else(|| {
                    Config::wrong("sliding_window", v, "a positive integer or null")
                })?),
            }
        }
        Family::Qwen2 => {
            let mut on = cfg.bool_or("use_sliding_window", false)?;
            if let Some(types) = cfg.get("layer_types") {
                let types = types
                    .as_array()
                    .ok_or_else(|| Config::wrong("layer_types", types, "an array of strings"))?;
                for t in types {
                    match t.as_str() {
                        Some("full_attention") => {}
                        Some("sliding_attention") => on = true,
                        _ => return Err(unsupported("layer_types", t, "the IR has causal attention (full, or sliding over a window at least the sequence)")),
                    }
                }
            }
            // Which layers slide: with the window at least the sequence, none differs.
            cfg.irrelevant(&["max_window_layers"]);
            let w = cfg.size_or("sliding_window", Some(4096))?;
            on.then_some(w)
        }
        _ => None,
    };
    // Decoding with a window of the sequence's length or more is full causal attention.
    let seq = match (opts.seq, window) {
        (Some(seq), Some(w)) if seq > w => {
            return Err(unsupported(
                "sliding_window",
                w,
                format!(
                    "with --seq {seq} a position attends only to the last {w}, which the IR's \
                     causal softmax cannot express; import with --seq {w} or less"
                ),
            ))
        }
        (Some(seq), _) => seq,
        (None, w) => {
            let seq = context.min(DEFAULT_MAX_SEQ);
            match w {
                Some(w) if w < seq => {
                    notes.push(format!(
                        "seq = {w}: the sliding window (`sliding_window` = {w}) is shorter than \
                         the default sequence {seq}, and the model is exact only up to it"
                    ));
                    w
                }
                _ => seq,
            }
        }
    };
    if seq > context {
        notes.push(format!(
            "seq = {seq} is longer than `max_position_embeddings` = {context}, the context the \
             model was trained at"
        ));
    }

    let mut dims = vec![
        dim("vocab", vocab),
        dim("seq", seq),
        dim("batch", opts.batch),
        dim("hidden", hidden),
        dim("heads", heads),
        dim("kv_heads", kv_heads),
        dim_expr("group", "heads / kv_heads"),
        dim_expr("head_dim", "hidden / heads"),
        dim_expr("kv_dim", "kv_heads * head_dim"),
        dim("ffn", ffn),
        dim("layers", layers),
    ];
    if let Some(w) = window {
        dims.push(comment(
            "Sliding-window attention is full causal attention while seq <= window: this",
        ));
        dims.push(comment(
            "difference is negative, and the file fails to load, for any longer seq.",
        ));
        dims.push(dim("window", w));
        dims.push(dim_expr("window_margin", "window - seq"));
    }

    let w = normal(std);
    let mut params = vec![
        param("embed_tokens.weight", &["vocab", "hidden"], &w),
        param("norm.weight", &["hidden"], "Ones"),
    ];
    if !tied {
        params.push(param("lm_head.weight", &["vocab", "hidden"], &w));
    }

    let mut block_params = vec![
        param("input_layernorm.weight", &["hidden"], "Ones"),
        param("self_attn.q_proj.weight", &["hidden", "hidden"], &w),
    ];
    if qkv_bias {
        block_params.push(param("self_attn.q_proj.bias", &["hidden"], "Zeros"));
    }
    for x in ["k", "v"] {
        block_params.push(param(
            &format!("self_attn.{x}_proj.weight"),
            &["kv_dim", "hidden"],
            &w,
        ));
        if qkv_bias {
            block_params.push(param(
                &format!("self_attn.{x}_proj.bias"),
                &["kv_dim"],
                "Zeros",
            ));
        }
    }
    block_params.push(param("self_attn.o_proj.weight", &["hidden", "hidden"], &w));
    if o_bias {
        block_params.push(param("self_attn.o_proj.bias", &["hidden"], "Zeros"));
    }
    block_params.extend([
        param("post_attention_layernorm.weight", &["hidden"], "Ones"),
        param("mlp.gate_proj.weight", &["ffn", "hidden"], &w),
        param("mlp.up_proj.weight", &["ffn", "hidden"], &w),
        param("mlp.down_proj.weight", &["hidden", "ffn"], &w),
    ]);

    let e = num(eps);
    let base = num(theta);
    // The rotary op's arguments after its input.
    let rotary_args = match scaling {
        None => format!("base: {base}"),
        Some(s) => format!(
            "base: {base}, scaling: Some((factor: {}, low_freq_factor: {}, high_freq_factor: {}, \
             original_max_position: {}))",
            num(s.factor),
            num(s.low_freq_factor),
            num(s.high_freq_factor),
            s.original_max_position
        ),
    };
    let bias_of = |on: bool, x: &str| on.then(|| format!("self_attn.{x}_proj.bias"));
    let mut b = vec![
        comment("Attention."),
        entry(
            "xn",
            format!("RmsNorm(x: \"x\", weight: \"input_layernorm.weight\", eps: {e})"),
        ),
    ];
    for x in ["q", "k", "v"] {
        let weight = format!("self_attn.{x}_proj.weight");
        match bias_of(qkv_bias, x) {
            Some(bias) => linear_bias(&mut b, (&format!("{x}_mm"), x), "xn", &weight, &bias),
            None => linear(&mut b, x, "xn", &weight),
        }
    }
    attention_core(&mut b, Some(&rotary_args), attn_drop, true);
    match bias_of(o_bias, "o") {
        Some(bias) => linear_bias(
            &mut b,
            ("attn_mm", "attn_out"),
            "ctx_flat",
            "self_attn.o_proj.weight",
            &bias,
        ),
        None => linear(&mut b, "attn_out", "ctx_flat", "self_attn.o_proj.weight"),
    }
    let gate_act = if act == "Silu" {
        "SwiGLU MLP.".to_owned()
    } else {
        format!("Gated MLP ({act} gate).")
    };
    b.extend([
        entry("h1", "Add(\"x\", \"attn_out\")"),
        comment(gate_act),
        entry(
            "hn",
            format!("RmsNorm(x: \"h1\", weight: \"post_attention_layernorm.weight\", eps: {e})"),
        ),
    ]);
    linear(&mut b, "gate", "hn", "mlp.gate_proj.weight");
    linear(&mut b, "up", "hn", "mlp.up_proj.weight");
    b.push(entry("gate_act", format!("{act}(\"gate\")")));
    b.push(entry("gated", "Mul(\"gate_act\", \"up\")"));
    linear(&mut b, "down", "gated", "mlp.down_proj.weight");
    b.push(entry("y", "Add(\"h1\", \"down\")"));

    let head = if tied {
        "embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let mut body = vec![
        entry(
            "emb",
            "Embedding(table: \"embed_tokens.weight\", ids: \"tokens\")",
        ),
        entry(
            "h",
            "Repeat(block: \"llama_layer\", times: \"layers\", inputs: [\"emb\"], prefix: \"layers\")",
        ),
        entry(
            "hn",
            format!("RmsNorm(x: \"h\", weight: \"norm.weight\", eps: {e})"),
        ),
    ];
    if tied {
        body.push(comment(
            "The output layer is tied to the token embedding (`tie_word_embeddings`).",
        ));
    }
    body.push(entry(
        "logits",
        format!("MatMul(a: \"hn\", b: \"{head}\", transpose_b: true)"),
    ));
    body.push(entry(
        "loss",
        "CrossEntropy(logits: \"logits\", targets: \"tokens\")",
    ));

    let biases = match (qkv_bias, o_bias) {
        (true, true) => "biases on q, k, v and o",
        (true, false) => "biases on q, k and v",
        _ => "no biases",
    };
    let embeddings = if tied { "tied" } else { "untied" };
    let mut header = vec![
        format!(
            "The Llama-style decoder of models/llama3-8b.ron: pre-RMSNorm layers, {} MLP, rotary",
            if act == "Silu" { "SwiGLU" } else { "gated" }
        ),
        if kv_heads == heads {
            format!("position embeddings (theta {base}), multi-head attention ({heads} heads),")
        } else {
            format!(
                "position embeddings (theta {base}), grouped-query attention ({heads} query / \
                 {kv_heads} key-value heads),"
            )
        },
        format!("{embeddings} input and output embeddings, {biases}."),
        format!("Trained context: max_position_embeddings = {context}."),
    ];
    if let Some(w) = window {
        header.push(format!(
            "Sliding window {w}: exact for seq <= {w} (the `window_margin` dimension checks it)."
        ));
    }
    header.extend([
        "Projections are nn.Linear [out, in] (hence `transpose_b`); parameter names are Hugging"
            .into(),
        format!(
            "Face's {} names without the `model.` prefix (`ferrotron_io::import::hf_names`).",
            family.architecture()
        ),
    ]);
    let name = match family {
        Family::Llama => "Llama",
        Family::Mistral => "Mistral",
        _ => "Qwen2",
    };
    Ok(ModelText {
        header,
        family,
        description: format!(
            "{name}: {layers} layers, hidden {hidden}, {heads} query / {kv_heads} key-value heads, ffn {ffn}, vocab {vocab}"
        ),
        dims,
        inputs: vec![entry(
            "tokens",
            "Input(shape: [\"batch\", \"seq\"], dtype: I64)",
        )],
        params,
        block: BlockText {
            name: "llama_layer",
            comment: "One pre-RMSNorm decoder layer: x + attn(rms(x)), then + mlp(rms(.))."
                .into(),
            params: block_params,
            body: b,
        },
        body,
    })
}

// ----------------------------------------------------------------------------------------------
// BERT: models/bert-large.ron's graph.

fn bert(cfg: &mut Config, opts: &ImportOptions) -> Result<ModelText, ImportErrorKind> {
    let vocab = cfg.size("vocab_size")?;
    let positions = cfg.size_or("max_position_embeddings", Some(512))?;
    let type_vocab = cfg.size_or("type_vocab_size", Some(2))?;
    let hidden = cfg.size("hidden_size")?;
    let heads = cfg.size("num_attention_heads")?;
    let ffn = cfg.size("intermediate_size")?;
    let layers = cfg.size("num_hidden_layers")?;
    divides("num_attention_heads", heads, "hidden_size", hidden)?;
    let act = activation("hidden_act", cfg.str_or("hidden_act", "gelu")?)?;
    let eps = cfg.eps_or("layer_norm_eps", 1e-12)?;
    let hidden_drop = cfg.dropout_or("hidden_dropout_prob", 0.1)?;
    let attn_drop = cfg.dropout_or("attention_probs_dropout_prob", 0.1)?;
    let std = cfg.std()?;
    let tied = cfg.bool_or("tie_word_embeddings", true)?;
    let pos_type = cfg.str_or("position_embedding_type", "absolute")?;
    if pos_type != "absolute" {
        return Err(unsupported(
            "position_embedding_type",
            Value::from(pos_type),
            "the template has BERT's learned absolute positions; relative-position scores are \
             not in it",
        ));
    }
    cfg.require(
        "is_decoder",
        false,
        "the template is BERT's bidirectional encoder",
    )?;
    cfg.require(
        "add_cross_attention",
        false,
        "cross-attention needs another model's states",
    )?;
    // Feed-forward chunking computes the same in slices; the classifier heads are not modelled.
    cfg.irrelevant(&["chunk_size_feed_forward", "classifier_dropout"]);
    let seq = learned_positions_seq(opts, "max_position_embeddings", positions, positions)?;

    let dims = vec![
        dim("vocab", vocab),
        dim("positions", positions),
        dim("type_vocab", type_vocab),
        dim("seq", seq),
        dim("batch", opts.batch),
        dim("hidden", hidden),
        dim("heads", heads),
        dim_expr("head_dim", "hidden / heads"),
        dim("ffn", ffn),
        dim("layers", layers),
    ];
    let w = normal(std);
    let mut params = vec![
        param(
            "embeddings.word_embeddings.weight",
            &["vocab", "hidden"],
            &w,
        ),
        param(
            "embeddings.position_embeddings.weight",
            &["positions", "hidden"],
            &w,
        ),
        param(
            "embeddings.token_type_embeddings.weight",
            &["type_vocab", "hidden"],
            &w,
        ),
        param("embeddings.LayerNorm.weight", &["hidden"], "Ones"),
        param("embeddings.LayerNorm.bias", &["hidden"], "Zeros"),
        param(
            "cls.predictions.transform.dense.weight",
            &["hidden", "hidden"],
            &w,
        ),
        param("cls.predictions.transform.dense.bias", &["hidden"], "Zeros"),
        param(
            "cls.predictions.transform.LayerNorm.weight",
            &["hidden"],
            "Ones",
        ),
        param(
            "cls.predictions.transform.LayerNorm.bias",
            &["hidden"],
            "Zeros",
        ),
        param("cls.predictions.bias", &["vocab"], "Zeros"),
    ];
    if !tied {
        params.push(param(
            "cls.predictions.decoder.weight",
            &["vocab", "hidden"],
            &w,
        ));
    }

    let mut block_params = Vec::new();
    for x in ["query", "key", "value"] {
        block_params.push(param(
            &format!("attention.self.{x}.weight"),
            &["hidden", "hidden"],
            &w,
        ));
        block_params.push(param(
            &format!("attention.self.{x}.bias"),
            &["hidden"],
            "Zeros",
        ));
    }
    block_params.extend([
        param("attention.output.dense.weight", &["hidden", "hidden"], &w),
        param("attention.output.dense.bias", &["hidden"], "Zeros"),
        param("attention.output.LayerNorm.weight", &["hidden"], "Ones"),
        param("attention.output.LayerNorm.bias", &["hidden"], "Zeros"),
        param("intermediate.dense.weight", &["ffn", "hidden"], &w),
        param("intermediate.dense.bias", &["ffn"], "Zeros"),
        param("output.dense.weight", &["hidden", "ffn"], &w),
        param("output.dense.bias", &["hidden"], "Zeros"),
        param("output.LayerNorm.weight", &["hidden"], "Ones"),
        param("output.LayerNorm.bias", &["hidden"], "Zeros"),
    ]);

    let e = num(eps);
    let mut b = Vec::new();
    for (x, name) in [("q", "query"), ("k", "key"), ("v", "value")] {
        linear_bias(
            &mut b,
            (&format!("{x}_mm"), x),
            "x",
            &format!("attention.self.{name}.weight"),
            &format!("attention.self.{name}.bias"),
        );
    }
    attention_core(&mut b, None, attn_drop, false);
    linear_bias(
        &mut b,
        ("attn_mm", "attn_out"),
        "ctx_flat",
        "attention.output.dense.weight",
        "attention.output.dense.bias",
    );
    let attn = dropout(&mut b, "attn_drop", "attn_out", hidden_drop);
    b.push(entry("res1", format!("Add(\"x\", \"{attn}\")")));
    b.push(entry(
        "ln1",
        format!(
            "LayerNorm(x: \"res1\", weight: \"attention.output.LayerNorm.weight\", bias: \"attention.output.LayerNorm.bias\", eps: {e})"
        ),
    ));
    linear_bias(
        &mut b,
        ("fc_mm", "fc"),
        "ln1",
        "intermediate.dense.weight",
        "intermediate.dense.bias",
    );
    b.push(entry("act", format!("{act}(\"fc\")")));
    linear_bias(
        &mut b,
        ("proj_mm", "proj"),
        "act",
        "output.dense.weight",
        "output.dense.bias",
    );
    let proj = dropout(&mut b, "proj_drop", "proj", hidden_drop);
    b.push(entry("res2", format!("Add(\"ln1\", \"{proj}\")")));
    b.push(entry(
        "y",
        format!(
            "LayerNorm(x: \"res2\", weight: \"output.LayerNorm.weight\", bias: \"output.LayerNorm.bias\", eps: {e})"
        ),
    ));

    let mut body = vec![
        entry(
            "word",
            "Embedding(table: \"embeddings.word_embeddings.weight\", ids: \"tokens\")",
        ),
        entry(
            "pos",
            "Slice(x: \"embeddings.position_embeddings.weight\", dim: 0, start: 0, end: \"seq\")",
        ),
        entry(
            "type",
            "Embedding(table: \"embeddings.token_type_embeddings.weight\", ids: \"token_types\")",
        ),
        entry("word_pos", "Add(\"word\", \"pos\")"),
        entry("emb_sum", "Add(\"word_pos\", \"type\")"),
        entry(
            "emb_ln",
            format!(
                "LayerNorm(x: \"emb_sum\", weight: \"embeddings.LayerNorm.weight\", bias: \"embeddings.LayerNorm.bias\", eps: {e})"
            ),
        ),
    ];
    let emb = dropout(&mut body, "emb", "emb_ln", hidden_drop);
    body.push(entry(
        "h",
        format!(
            "Repeat(block: \"bert_layer\", times: \"layers\", inputs: [\"{emb}\"], prefix: \"encoder.layer\")"
        ),
    ));
    body.push(comment(if tied {
        "MLM head: transform, then the decoder tied to the word embeddings."
    } else {
        "MLM head: transform, then the decoder (its own weight: `tie_word_embeddings` is false)."
    }));
    linear_bias(
        &mut body,
        ("head_mm", "head_fc"),
        "h",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
    );
    body.push(entry("head_act", format!("{act}(\"head_fc\")")));
    body.push(entry(
        "head_ln",
        format!(
            "LayerNorm(x: \"head_act\", weight: \"cls.predictions.transform.LayerNorm.weight\", bias: \"cls.predictions.transform.LayerNorm.bias\", eps: {e})"
        ),
    ));
    let decoder = if tied {
        "embeddings.word_embeddings.weight"
    } else {
        "cls.predictions.decoder.weight"
    };
    linear_bias(
        &mut body,
        ("decoder", "logits"),
        "head_ln",
        decoder,
        "cls.predictions.bias",
    );
    body.push(entry(
        "loss",
        "CrossEntropy(logits: \"logits\", targets: \"labels\", shift: false)",
    ));

    Ok(ModelText {
        header: vec![
            "BERT with its masked-language-model head, as models/bert-large.ron writes it:".into(),
            format!(
                "post-LayerNorm layers, {}, separate query/key/value projections in nn.Linear",
                activation_words(act)
            ),
            "[out, in] orientation (hence `transpose_b`). Parameter names are Hugging Face's"
                .into(),
            "BertForMaskedLM names without the `bert.` prefix (`ferrotron_io::import::hf_names`)."
                .into(),
            "The pooler and next-sentence head are left out. The loss is cross-entropy at every"
                .into(),
            "position against `labels` (no shift).".into(),
        ],
        family: Family::Bert,
        description: format!(
            "BERT: {layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}, MLM head"
        ),
        dims,
        inputs: vec![
            entry("tokens", "Input(shape: [\"batch\", \"seq\"], dtype: I64)"),
            entry(
                "token_types",
                "Input(shape: [\"batch\", \"seq\"], dtype: I64)",
            ),
            entry("labels", "Input(shape: [\"batch\", \"seq\"], dtype: I64)"),
        ],
        params,
        block: BlockText {
            name: "bert_layer",
            comment: "One post-LayerNorm encoder layer: LN(x + attn(x)), then LN(. + mlp(.))."
                .into(),
            params: block_params,
            body: b,
        },
        body,
    })
}

// ----------------------------------------------------------------------------------------------
// Hugging Face's weight names, one table per family.

/// How a checkpoint tensor becomes (or relates to) a model parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// The tensor is the parameter as stored: the templates keep each family's shapes and
    /// orientation (GPT-2's Conv1D `[in, out]`; nn.Linear's `[out, in]`, used with
    /// `transpose_b`; Hugging Face's Llama q/k rows already in the rotate-half order of the
    /// IR's `Rotary`).
    AsIs,
    /// Another name for the parameter's tensor, which a checkpoint of a tied model may save
    /// twice (`lm_head.weight` beside the token embedding): not loaded, but a loader may check
    /// that it equals the parameter. A tensor that an [`Transform::AsIs`] row of the model
    /// claims (an untied `lm_head.weight`) is that row's, not this one's.
    Tied,
}

/// A family's weight names: how its template's parameters are stored in a `transformers`
/// checkpoint. `{i}` stands for the layer index, the same in the parameter's name and the
/// tensor's.
#[derive(Clone, Copy, Debug)]
pub struct HfNames {
    /// `(parameter, checkpoint tensor, transform)`: a row for every parameter the family's
    /// template can write (a model without a bias or an untied output layer has no parameter
    /// for that row, and a loader skips it), and [`Transform::Tied`] rows for the tied copies.
    pub params: &'static [(&'static str, &'static str, Transform)],
    /// Tensors a checkpoint may hold that are no parameter of the model: buffers recomputed
    /// from the config (the causal mask, rotary frequencies) and heads the template leaves out.
    pub unused: &'static [&'static str],
}

use Transform::{AsIs, Tied};

const GPT2_NAMES: HfNames = HfNames {
    params: &[
        ("wte", "transformer.wte.weight", AsIs),
        ("wpe", "transformer.wpe.weight", AsIs),
        ("h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", AsIs),
        ("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", AsIs),
        (
            "h.{i}.attn.c_attn.weight",
            "transformer.h.{i}.attn.c_attn.weight",
            AsIs,
        ),
        (
            "h.{i}.attn.c_attn.bias",
            "transformer.h.{i}.attn.c_attn.bias",
            AsIs,
        ),
        (
            "h.{i}.attn.c_proj.weight",
            "transformer.h.{i}.attn.c_proj.weight",
            AsIs,
        ),
        (
            "h.{i}.attn.c_proj.bias",
            "transformer.h.{i}.attn.c_proj.bias",
            AsIs,
        ),
        ("h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", AsIs),
        ("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", AsIs),
        (
            "h.{i}.mlp.c_fc.weight",
            "transformer.h.{i}.mlp.c_fc.weight",
            AsIs,
        ),
        (
            "h.{i}.mlp.c_fc.bias",
            "transformer.h.{i}.mlp.c_fc.bias",
            AsIs,
        ),
        (
            "h.{i}.mlp.c_proj.weight",
            "transformer.h.{i}.mlp.c_proj.weight",
            AsIs,
        ),
        (
            "h.{i}.mlp.c_proj.bias",
            "transformer.h.{i}.mlp.c_proj.bias",
            AsIs,
        ),
        ("ln_f.weight", "transformer.ln_f.weight", AsIs),
        ("ln_f.bias", "transformer.ln_f.bias", AsIs),
        ("lm_head.weight", "lm_head.weight", AsIs),
        ("wte", "lm_head.weight", Tied),
    ],
    unused: &[
        "transformer.h.{i}.attn.bias",
        "transformer.h.{i}.attn.masked_bias",
    ],
};

/// Llama, Mistral and Qwen2 name their weights alike.
const LLAMA_NAMES: HfNames = HfNames {
    params: &[
        ("embed_tokens.weight", "model.embed_tokens.weight", AsIs),
        (
            "layers.{i}.input_layernorm.weight",
            "model.layers.{i}.input_layernorm.weight",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.q_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.q_proj.bias",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.v_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.v_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.o_proj.weight",
            "model.layers.{i}.self_attn.o_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.self_attn.o_proj.bias",
            "model.layers.{i}.self_attn.o_proj.bias",
            AsIs,
        ),
        (
            "layers.{i}.post_attention_layernorm.weight",
            "model.layers.{i}.post_attention_layernorm.weight",
            AsIs,
        ),
        (
            "layers.{i}.mlp.gate_proj.weight",
            "model.layers.{i}.mlp.gate_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.mlp.up_proj.weight",
            "model.layers.{i}.mlp.up_proj.weight",
            AsIs,
        ),
        (
            "layers.{i}.mlp.down_proj.weight",
            "model.layers.{i}.mlp.down_proj.weight",
            AsIs,
        ),
        ("norm.weight", "model.norm.weight", AsIs),
        ("lm_head.weight", "lm_head.weight", AsIs),
        ("embed_tokens.weight", "lm_head.weight", Tied),
    ],
    unused: &["model.layers.{i}.self_attn.rotary_emb.inv_freq"],
};

const BERT_NAMES: HfNames = HfNames {
    params: &[
        (
            "embeddings.word_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
            AsIs,
        ),
        (
            "embeddings.position_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            AsIs,
        ),
        (
            "embeddings.token_type_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            AsIs,
        ),
        (
            "embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.weight",
            AsIs,
        ),
        (
            "embeddings.LayerNorm.bias",
            "bert.embeddings.LayerNorm.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.query.weight",
            "bert.encoder.layer.{i}.attention.self.query.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.query.bias",
            "bert.encoder.layer.{i}.attention.self.query.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.key.weight",
            "bert.encoder.layer.{i}.attention.self.key.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.key.bias",
            "bert.encoder.layer.{i}.attention.self.key.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.value.weight",
            "bert.encoder.layer.{i}.attention.self.value.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.self.value.bias",
            "bert.encoder.layer.{i}.attention.self.value.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.output.dense.weight",
            "bert.encoder.layer.{i}.attention.output.dense.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.output.dense.bias",
            "bert.encoder.layer.{i}.attention.output.dense.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.output.LayerNorm.weight",
            "bert.encoder.layer.{i}.attention.output.LayerNorm.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.attention.output.LayerNorm.bias",
            "bert.encoder.layer.{i}.attention.output.LayerNorm.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.intermediate.dense.weight",
            "bert.encoder.layer.{i}.intermediate.dense.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.intermediate.dense.bias",
            "bert.encoder.layer.{i}.intermediate.dense.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.output.dense.weight",
            "bert.encoder.layer.{i}.output.dense.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.output.dense.bias",
            "bert.encoder.layer.{i}.output.dense.bias",
            AsIs,
        ),
        (
            "encoder.layer.{i}.output.LayerNorm.weight",
            "bert.encoder.layer.{i}.output.LayerNorm.weight",
            AsIs,
        ),
        (
            "encoder.layer.{i}.output.LayerNorm.bias",
            "bert.encoder.layer.{i}.output.LayerNorm.bias",
            AsIs,
        ),
        (
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.weight",
            AsIs,
        ),
        (
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.bias",
            AsIs,
        ),
        (
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.weight",
            AsIs,
        ),
        (
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.bias",
            AsIs,
        ),
        ("cls.predictions.bias", "cls.predictions.bias", AsIs),
        (
            "cls.predictions.decoder.weight",
            "cls.predictions.decoder.weight",
            AsIs,
        ),
        (
            "embeddings.word_embeddings.weight",
            "cls.predictions.decoder.weight",
            Tied,
        ),
        // The decoder's bias is the same tensor as `cls.predictions.bias` in every BERT.
        ("cls.predictions.bias", "cls.predictions.decoder.bias", Tied),
    ],
    unused: &[
        "bert.embeddings.position_ids",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "cls.seq_relationship.weight",
        "cls.seq_relationship.bias",
    ],
};

/// The family's weight names: its template's parameters ↔ the tensors of a `transformers`
/// checkpoint (`model.safetensors`), for a weight loader.
pub fn hf_names(family: Family) -> &'static HfNames {
    match family {
        Family::Gpt2 => &GPT2_NAMES,
        Family::Llama | Family::Mistral | Family::Qwen2 => &LLAMA_NAMES,
        Family::Bert => &BERT_NAMES,
    }
}

/// The checkpoint tensor that holds parameter `param` of a model of `family` (its
/// [`Transform::AsIs`] row, `{i}` filled in), or `None` where the table has no row for it.
pub fn hf_name(family: Family, param: &str) -> Option<String> {
    hf_names(family)
        .params
        .iter()
        .filter(|(_, _, t)| *t == AsIs)
        .find_map(|(p, hf, _)| {
            let layer = pattern_match(p, param)?;
            Some(match layer {
                Some(i) => hf.replace("{i}", i),
                None => (*hf).to_owned(),
            })
        })
}

/// Whether `name` fits `pattern`: `Some(None)` for a pattern without `{i}`, `Some(Some(i))`
/// with the layer index it stands for.
fn pattern_match<'n>(pattern: &str, name: &'n str) -> Option<Option<&'n str>> {
    match pattern.split_once("{i}") {
        None => (pattern == name).then_some(None),
        Some((before, after)) => {
            let i = name.strip_prefix(before)?.strip_suffix(after)?;
            (!i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())).then_some(Some(i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_back_exactly() {
        for x in [
            1e-5, 1e-6, 1e-12, 0.1, 0.02, 500000.0, 1e6, 10000.0, 0.0, 0.125,
        ] {
            let s = num(x);
            assert_eq!(s.parse::<f64>().unwrap(), x, "{s}");
        }
        assert_eq!(num(1e-5), "1e-5");
        assert_eq!(num(500000.0), "500000.0");
    }

    #[test]
    fn patterns_fill_the_layer_index() {
        assert_eq!(
            hf_name(Family::Gpt2, "h.11.attn.c_attn.weight").as_deref(),
            Some("transformer.h.11.attn.c_attn.weight")
        );
        assert_eq!(
            hf_name(Family::Gpt2, "wte").as_deref(),
            Some("transformer.wte.weight")
        );
        assert_eq!(
            hf_name(Family::Qwen2, "layers.3.self_attn.k_proj.bias").as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name(Family::Llama, "layers.x.mlp.up_proj.weight"), None);
        assert_eq!(
            hf_name(Family::Bert, "encoder.layer..output.dense.bias"),
            None
        );
    }

    #[test]
    fn refusals_name_the_key_and_value() {
        let cfg = serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2,
            "intermediate_size": 32, "num_hidden_layers": 1, "max_position_embeddings": 32,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        });
        let e = model_text(&cfg, "c.json", "m", &ImportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rope_scaling`") && e.contains("dynamic"), "{e}");
        let e = model_text(
            &serde_json::json!({"model_type": "t5"}),
            "c.json",
            "m",
            &ImportOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"t5\"") && e.contains("`gpt2`"), "{e}");
        let e = model_text(
            &serde_json::json!([1]),
            "c.json",
            "m",
            &ImportOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("an array"), "{e}");
    }
}
