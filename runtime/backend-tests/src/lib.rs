//! The cross-backend tests live in `tests/`: the CUDA backend against the CPU backend, op by op
//! (`cuda_ops.rs`) and model by model (`cuda_equivalence.rs`), on a GPU or, with no GPU, on the
//! CPU stand-in for the CUDA libraries (`cuda_emulated.rs`). They are a crate of their own so
//! that neither backend depends on the other.
//!
//! The library holds what the test files share: the device they run on ([`device`]), how
//! close a result must be ([`assert_close`]), a model from the zoo ([`zoo_model`]) and a model's
//! step run two ways on the GPU and held to agree ([`runs_agree_on_the_gpu`]).

use ferrotron_cuda::{CudaError, Gpu, RankDevice};
use ferrotron_exec::Tensor;
use std::sync::OnceLock;

/// A line on the process's stderr, past the test harness's capture (which takes `eprintln!`
/// only): a skipped test or a timing is visible in a plain `cargo test` run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// Whether tests compiled into the test crate `crate_name` run in `cuda_emulated.rs`'s first
/// process, which only starts them again on the CPU stand-in: there they return at once,
/// quietly.
fn only_included(crate_name: &str) -> bool {
    crate_name == "cuda_emulated" && std::env::var_os("FERROTRON_CUDA_EMU_CHILD").is_none()
}

/// A rank (stream + cuBLAS handle) on GPU 0 for test `test` of the test crate `crate_name`
/// (`env!("CARGO_CRATE_NAME")`), or `None` after saying why there is none (a panic where a GPU
/// is there but does not start, or `FERROTRON_REQUIRE_GPU` is set).
pub fn device(test: &str, crate_name: &str) -> Option<RankDevice> {
    if only_included(crate_name) {
        return None;
    }
    let gpu = GPU.get_or_init(|| match Gpu::open(0) {
        Ok(g) => {
            say(&format!("{crate_name} on {g:?}, kernels {:?}", g.kernels));
            Ok(g)
        }
        Err(CudaError::Unavailable(why)) => Err(why),
        Err(e) => Err(format!("the GPU is there but could not start: {e}")),
    });
    match gpu {
        Ok(g) => Some(g.rank().expect("a stream and a cuBLAS handle")),
        Err(why) if why.starts_with("the GPU is there") => panic!("{why}"),
        Err(why) => {
            assert!(
                std::env::var_os("FERROTRON_REQUIRE_GPU").is_none(),
                "FERROTRON_REQUIRE_GPU is set but: {why}"
            );
            // The reason once per run, then one short line per test.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            let elsewhere = if ferrotron_cuda_emu::lib_dir().is_some() {
                "; cuda_emulated runs it on the CPU stand-in"
            } else {
                ""
            };
            if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                say(&format!("SKIPPED here: no CUDA device{elsewhere} [{test}]"));
            } else {
                say(&format!(
                    "SKIPPED here: no CUDA device ({why}){elsewhere} [{test}]"
                ));
            }
            None
        }
    }
}

/// How close a device result must be to the reference.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Relative, of |got| + |want|.
    pub rtol: f64,
    /// Absolute, as a fraction of the largest |want| of the output.
    pub floor: f64,
}

/// `|g − w| ≤ max(rtol·(|g| + |w|), floor·max|w|)` everywhere (NaNs must match, infinities be
/// equal); returns how many elements are not bit-identical.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> usize {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let scale = want
        .data
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max(v.abs() as f64));
    let atol = tol.floor * scale;
    let mut worst: Option<(usize, f64)> = None;
    let mut differ = 0;
    for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
        if g.to_bits() != w.to_bits() {
            differ += 1;
        }
        if g.is_nan() || w.is_nan() {
            assert!(
                g.is_nan() && w.is_nan(),
                "{what}: element {i}: got {g}, want {w}"
            );
            continue;
        }
        if g.is_infinite() || w.is_infinite() {
            assert_eq!(g, w, "{what}: element {i}");
            continue;
        }
        let (g64, w64) = (g as f64, w as f64);
        let err = (g64 - w64).abs();
        let bound = (tol.rtol * (g64.abs() + w64.abs())).max(atol);
        if err > bound {
            let excess = err / bound.max(f64::MIN_POSITIVE);
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, excess)) = worst {
        panic!(
            "{what}: element {i} of {:?}: got {}, want {} ({excess:.1}× the tolerance {tol:?}, \
             scale {scale:e})",
            want.shape, got.data[i], want.data[i]
        );
    }
    differ
}

/// `file` from the model zoo (`FERROTRON_MODELS`, else the repository's `models/`: the GPU
/// check carries the zoo beside its executables), with `dims` overriding its named dimensions.
pub fn zoo_model(file: &str, dims: &[(&str, u64)]) -> ferrotron_ir::Graph {
    let dir = std::env::var("FERROTRON_MODELS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").to_owned());
    let path = std::path::PathBuf::from(dir).join(file);
    let load = ferrotron_ir::LoadOptions {
        overrides: dims.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..ferrotron_ir::LoadOptions::default()
    };
    ferrotron_ir::load_model(&path, &load).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `g`'s step (weights and batch from `seed`) on the GPU at tp 1, 2 and 4 in `f32` and at
/// tp 2 in bf16, with `ours` and with `theirs` (a fusion on and off): the loss, the outputs
/// when `outputs` asks, and every gradient agree within the storage type's tolerances.
/// `check` sees each plan and the first options before they run (that the fusion under test
/// takes place there).
pub fn runs_agree_on_the_gpu(
    (g, seed): (&ferrotron_ir::Graph, u64),
    (ours, theirs): (&ferrotron_exec::RunOptions, &ferrotron_exec::RunOptions),
    outputs: ferrotron_exec::verify::Outputs,
    check: impl Fn(&str, &ferrotron_partitioner::Plan),
) {
    use ferrotron_cuda::{Cuda, Storage};
    use ferrotron_exec::verify::{compare_runs, Tolerances};
    let params = ferrotron_exec::init::test_params(g, seed);
    let batch = ferrotron_exec::init::random_batch(g, seed);
    for (tp, dtype) in [
        (1, Storage::F32),
        (2, Storage::F32),
        (4, Storage::F32),
        (2, Storage::Bf16),
    ] {
        let what = format!("tp {tp} {dtype:?}");
        let options = ferrotron_partitioner::PartitionOptions {
            tp,
            ..ferrotron_partitioner::PartitionOptions::default()
        };
        let plan =
            ferrotron_partitioner::partition(g, &options).unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&what, &plan);
        let cuda = Cuda::new(0, tp as usize, dtype).unwrap_or_else(|e| panic!("{what}: {e}"));
        let run = |opts| {
            ferrotron_exec::run(cuda.clone(), &plan, &params, &batch, opts)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        let (a, b) = (run(ours), run(theirs));
        let tol = match dtype {
            Storage::F32 => Tolerances::F32,
            Storage::Bf16 => Tolerances::BF16,
        };
        let v = compare_runs(&a, &b, tol, outputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let failed: Vec<_> = v.entries.iter().filter(|e| !e.ok()).collect();
        assert!(failed.is_empty(), "{what}: {failed:#?}");
        assert!(v.entries.len() > 3, "{what}: compared too little");
    }
}
