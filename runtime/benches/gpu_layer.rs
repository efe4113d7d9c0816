//! The GPU benchmark of issue 5: forward + backward of one GPT layer at the Megatron paper's
//! 8.3B shape (hidden 3072, 32 heads, sequence 1024, micro-batch 8) in bf16 on one GPU, its
//! achieved TFLOP/s, and the ratio to a large cuBLAS bf16 GEMM measured in the same run
//! (`ferrotron_runtime::cuda::bench`, where the method is described).
//!
//! `cargo bench -p ferrotron-runtime --bench gpu_layer` prints one JSON object (and writes it to
//! `$OUT/gpu_layer.json` when `OUT` is set); without a GPU it says so and exits 0.

use ferrotron_runtime::cuda::bench::{self, LayerBench};
use ferrotron_runtime::cuda::{Cuda, CudaError, DType};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cuda = match Cuda::new(0, 1, DType::Bf16) {
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
    let report = bench::run(&cuda, &bench::models_dir(), &LayerBench::PAPER)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Ok(out) = std::env::var("OUT") {
        let path = PathBuf::from(out).join("gpu_layer.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
