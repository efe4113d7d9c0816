//! Tokenizers for training text and generation: byte-level (each byte is a token: any vocabulary
//! of at least 256), GPT-2's byte-pair encoding (the 50,257-token vocabulary of the `gpt2`
//! models, tables shipped by the `tiktoken-rs` crate), both offline, and any Hugging Face
//! `tokenizer.json` (Llama 3, Qwen2, Llama 2, …) read by Hugging Face's own `tokenizers` crate.
//!
//! A `tokenizer.json` is used as the file says, its post-processor's special tokens included: a
//! text (a whole training file, or a prompt) is one sequence, so Llama 3's `<|begin_of_text|>`
//! or Llama 2's `<s>` comes once, before its first token, and Qwen2's post-processor adds none.
//! Only its truncation and padding are turned off, since a training file is far longer than any
//! model's context and the batches are cut from its tokens. Decoding
//! leaves the special tokens out of the text (and ids the file does not know, such as those of a
//! vocabulary padded past the tokenizer's).
//!
//! Being one sequence, a training file is encoded at once: at the peak, the crate's per-token
//! bookkeeping (token strings, offsets, alignments) is in memory beside the ids, hundreds of
//! bytes a token.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// How training text becomes token ids, and back.
pub enum Tokenizer {
    /// Token = byte value.
    Bytes,
    /// GPT-2's BPE.
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    /// A Hugging Face `tokenizer.json`.
    Json(Box<JsonTokenizer>),
}

/// A tokenizer read from a Hugging Face `tokenizer.json`.
pub struct JsonTokenizer {
    /// The file, as it was named (directory joined with `tokenizer.json`).
    path: String,
    inner: tokenizers::Tokenizer,
    /// One more than its largest id, added tokens included: ids need not be dense, and a model's
    /// embedding must have a row for the largest.
    vocabulary: u64,
}

/// A tokenizer that cannot be made or used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// Neither `bytes`, `gpt2`, nor a path that exists.
    #[error(
        "unknown tokenizer `{0}`: expected `bytes`, `gpt2`, or a directory holding a \
         `tokenizer.json` (or the file itself), and no such path exists"
    )]
    Unknown(String),
    /// The BPE tables could not be loaded.
    #[error("GPT-2 tokenizer: {0}")]
    Bpe(String),
    /// A directory without a `tokenizer.json`.
    #[error("{}: no tokenizer.json in this directory", .0.display())]
    Missing(PathBuf),
    /// A `tokenizer.json` that cannot be read or is not one the `tokenizers` crate understands.
    #[error("{path}: not a readable tokenizer.json: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What the `tokenizers` crate (or the file system) said.
        message: String,
    },
    /// Text the tokenizer cannot encode (a model without an unknown token meeting text outside
    /// its vocabulary, for instance).
    #[error("the {name} tokenizer cannot encode the text: {message}")]
    Encode {
        /// The tokenizer.
        name: String,
        /// What the `tokenizers` crate said.
        message: String,
    },
    /// The model's vocabulary is too small for the tokenizer.
    #[error(
        "the {name} tokenizer needs a vocabulary of at least {needs}, the model has {has} \
         (try `--dim vocab={needs}`)"
    )]
    Vocabulary {
        /// The tokenizer.
        name: String,
        /// Its vocabulary.
        needs: u64,
        /// The model's.
        has: u64,
    },
}

impl Tokenizer {
    /// `bytes`, `gpt2`, or else a path: a directory holding a `tokenizer.json`, or such a file
    /// (under any name). The two names win over a directory of the same name (`./bytes` names
    /// the directory).
    pub fn named(name: &str) -> Result<Tokenizer, TokenizerError> {
        match name {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => tiktoken_rs::r50k_base()
                .map(|b| Tokenizer::Gpt2(Box::new(b)))
                .map_err(|e| TokenizerError::Bpe(e.to_string())),
            other if Path::new(other).exists() => Tokenizer::open(Path::new(other)),
            other => Err(TokenizerError::Unknown(other.to_owned())),
        }
    }

    /// The Hugging Face tokenizer in `path`: a directory holding `tokenizer.json`, or the file.
    pub fn open(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let file = if path.is_dir() {
            let file = path.join("tokenizer.json");
            if !file.is_file() {
                return Err(TokenizerError::Missing(path.to_owned()));
            }
            file
        } else {
            path.to_owned()
        };
        let shown = file.display().to_string();
        let invalid = |message: String| TokenizerError::Invalid {
            path: shown.clone(),
            message,
        };
        let bytes = std::fs::read(&file).map_err(|e| invalid(e.to_string()))?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| invalid(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        inner.with_padding(None);
        let vocabulary = inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |id| u64::from(id) + 1);
        if vocabulary == 0 {
            return Err(invalid("its vocabulary is empty".into()));
        }
        Ok(Tokenizer::Json(Box::new(JsonTokenizer {
            path: shown,
            inner,
            vocabulary,
        })))
    }

    /// The number of distinct tokens it produces (for a `tokenizer.json`, one more than its
    /// largest id, special tokens included).
    pub fn vocabulary(&self) -> u64 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Gpt2(_) => 50_257,
            Tokenizer::Json(t) => t.vocabulary,
        }
    }

    /// Checks a model's vocabulary can hold every token.
    pub fn check(&self, model_vocab: u64) -> Result<(), TokenizerError> {
        if model_vocab < self.vocabulary() {
            return Err(TokenizerError::Vocabulary {
                name: self.name().to_owned(),
                needs: self.vocabulary(),
                has: model_vocab,
            });
        }
        Ok(())
    }

    /// Its name, as `--tokenizer` takes it and a checkpoint records it: `bytes`, `gpt2`, or the
    /// `tokenizer.json` file's path.
    pub fn name(&self) -> &str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::Gpt2(_) => "gpt2",
            Tokenizer::Json(t) => &t.path,
        }
    }

    /// The tokens of `text`, with a `tokenizer.json`'s post-processor's special tokens (see the
    /// module's documentation).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Gpt2(bpe) => Ok(bpe.encode_ordinary(text).into_iter().collect()),
            Tokenizer::Json(t) => t
                .inner
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode {
                    name: t.path.clone(),
                    message: e.to_string(),
                }),
        }
    }

    /// The text of `tokens` (invalid UTF-8 replaced; a `tokenizer.json`'s special tokens and
    /// ids it does not know left out).
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2(bpe) => bpe
                .decode(tokens.to_vec())
                .unwrap_or_else(|_| String::from("\u{fffd}")),
            Tokenizer::Json(t) => t
                .inner
                .decode(tokens, true)
                .unwrap_or_else(|_| String::from("\u{fffd}")),
        }
    }
}
