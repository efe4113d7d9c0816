//! The GPU benchmark: forward + backward of one GPT layer at the Megatron paper's 8.3B shape
//! (hidden 3072, 32 heads, sequence 1024, micro-batch 8) in bf16 on one GPU, its achieved
//! TFLOP/s, and the ratio to a large cuBLAS bf16 GEMM measured in the same run
//! (`ferrotron_cuda::bench`, where the method is described).
//!
//! `cargo bench -p ferrotron-cuda --bench gpu_layer` prints one JSON object (and writes it to
//! `$OUT/gpu_layer.json` when `OUT` is set); without a GPU it says so and exits 0. The model file
//! is `$FERROTRON_MODELS/megatron-8.3b.ron`, by default the repository's `models/`.

use ferrotron_cuda::bench::{self, LayerBench};
use ferrotron_cuda::{Cuda, CudaError, Storage};
use ferrotron_ir::{load_model, LoadOptions};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cuda = match Cuda::new(0, 1, Storage::Bf16) {
        Ok(c) => c,
        Err(CudaError::Unavailable(why)) => {
            // On the GPU check (scripts/gpu-check.sh) a missing device is a failure.
            if std::env::var_os("FERROTRON_REQUIRE_GPU").is_some() {
                return Err(format!("FERROTRON_REQUIRE_GPU is set but: {why}").into());
            }
            println!("SKIPPED: no CUDA device ({why})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let models = std::env::var("FERROTRON_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let path = models.join("megatron-8.3b.ron");
    let load = |overrides: &[(String, u64)]| {
        let opts = LoadOptions {
            overrides: overrides.to_vec(),
            ..LoadOptions::default()
        };
        load_model(&path, &opts).map_err(|e| e.to_string())
    };
    let report = bench::run(&cuda, load, &LayerBench::PAPER)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Ok(out) = std::env::var("OUT") {
        let path = PathBuf::from(out).join("gpu_layer.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
