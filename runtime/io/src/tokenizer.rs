//! Tokenizers for training text: byte-level (each byte is a token: any vocabulary of at least
//! 256) and GPT-2's byte-pair encoding (the 50,257-token vocabulary of the `gpt2` models, tables
//! shipped by the `tiktoken-rs` crate).

use thiserror::Error;

/// How training text becomes token ids, and back.
pub enum Tokenizer {
    /// Token = byte value.
    Bytes,
    /// GPT-2's BPE.
    Gpt2(Box<tiktoken_rs::CoreBPE>),
}

/// A tokenizer that cannot be made or used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// A name that is neither `bytes` nor `gpt2`.
    #[error("unknown tokenizer `{0}` (expected `bytes` or `gpt2`)")]
    Unknown(String),
    /// The BPE tables could not be loaded.
    #[error("GPT-2 tokenizer: {0}")]
    Bpe(String),
    /// The model's vocabulary is too small for the tokenizer.
    #[error("the {name} tokenizer needs a vocabulary of at least {needs}, the model has {has} (try `--dim vocab={needs}`)")]
    Vocabulary {
        /// The tokenizer.
        name: &'static str,
        /// Its vocabulary.
        needs: u64,
        /// The model's.
        has: u64,
    },
}

impl Tokenizer {
    /// `bytes` or `gpt2`.
    pub fn named(name: &str) -> Result<Tokenizer, TokenizerError> {
        match name {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => tiktoken_rs::r50k_base()
                .map(|b| Tokenizer::Gpt2(Box::new(b)))
                .map_err(|e| TokenizerError::Bpe(e.to_string())),
            other => Err(TokenizerError::Unknown(other.to_owned())),
        }
    }

    /// The number of distinct tokens it produces.
    pub fn vocabulary(&self) -> u64 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Gpt2(_) => 50_257,
        }
    }

    /// Checks a model's vocabulary can hold every token.
    pub fn check(&self, model_vocab: u64) -> Result<(), TokenizerError> {
        if model_vocab < self.vocabulary() {
            return Err(TokenizerError::Vocabulary {
                name: self.name(),
                needs: self.vocabulary(),
                has: model_vocab,
            });
        }
        Ok(())
    }

    /// Its name, as `--tokenizer` takes it and a checkpoint records it.
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }

    /// The tokens of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text).into_iter().collect(),
        }
    }

    /// The text of `tokens` (invalid UTF-8 replaced).
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2(bpe) => bpe
                .decode(tokens.to_vec())
                .unwrap_or_else(|_| String::from("\u{fffd}")),
        }
    }
}
