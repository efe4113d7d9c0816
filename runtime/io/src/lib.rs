//! What crosses the process boundary: checkpoints, safetensors files, Hugging Face weights,
//! tokenizers, and generation from a checkpoint. Every function takes the paths its caller
//! gives it.
//!
//! ```text
//! safetensors_io ─► checkpoint (sharded rank files + meta.json, atomic; reshard) ─► training
//!                                                          (a Trainer's save and resume)
//!               └─► hf (GPT-2 weights in, gradients out, token batches)
//!               └─► weights (a checkpoint directory or file of any imported family, by hf_names)
//! checkpoint + config.json ─► export (a transformers model directory: weights out)
//! tokenizer (bytes, GPT-2 BPE, a Hugging Face tokenizer.json) ─► generate (a checkpoint's forward
//!   pass, token by token)
//! import (a transformers config.json ─► a model file; each family's weight names)
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod export;
pub mod generate;
pub mod hf;
pub mod import;
pub mod safetensors_io;
pub mod tokenizer;
pub mod training;
pub mod weights;
