//! The CUDA backend's GPU tests, run on the CPU stand-in for the CUDA driver and cuBLAS
//! (`cuda-emu`): every op test of `cuda_ops.rs`, the fused attention's tests of
//! `cuda_attention.rs`, the fused loss's of `cuda_loss.rs` and every equivalence test of `cuda_equivalence.rs` (the tiny models at
//! tp = 1, 2, 4 and 3 on virtual ranks, bf16 mixed precision, training), against the CPU backend
//! (the attention against a host reference), with no GPU.
//!
//! The loader reads `LD_LIBRARY_PATH` when a process starts, so the one test here starts this
//! same executable again with the stand-in libraries first on the path and runs the included
//! GPU tests in it (`ops::…`, `equivalence::…`, `attention::…`, `loss::…`), with `FERROTRON_REQUIRE_GPU` set so that none
//! of them may skip. In this first process those included tests return at once without a word
//! (their helpers check for it). NVRTC goes on the path too (`cuda-emu`'s build provides it): the
//! backend compiles its kernels with it as on a GPU, and the stand-in then runs their natively
//! compiled twins.

#[path = "cuda_ops.rs"]
mod ops;

#[path = "cuda_equivalence.rs"]
mod equivalence;

#[path = "cuda_attention.rs"]
mod attention;

#[path = "cuda_loss.rs"]
mod loss;

use std::io::Write;
use std::process::Command;

/// Set in the started process.
const CHILD: &str = "FERROTRON_CUDA_EMU_CHILD";

fn skip(why: &str) {
    assert!(
        std::env::var_os("FERROTRON_REQUIRE_NVRTC").is_none(),
        "FERROTRON_REQUIRE_NVRTC is set but the emulated CUDA tests cannot run: {why}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: the CUDA tests on the emulated device ({why})"
    );
}

#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    if std::env::var_os(CHILD).is_some() {
        return; // the started process runs the included tests themselves
    }
    let existing = std::env::var("LD_LIBRARY_PATH").ok();
    let Some(path) = ferrotron_cuda_emu::library_path(existing.as_deref()) else {
        skip("no C++ compiler was found to build the stand-in libraries");
        return;
    };
    if ferrotron_cuda_emu::nvrtc_dir().is_none() && !ferrotron_cuda::libs::Lib::Nvrtc.present() {
        skip("no NVRTC: the build could not pip install nvidia-cuda-nvrtc (CUDA 13)");
        return;
    }
    // Both stream schedules of the stand-in (cuda-emu/csrc/driver.cpp): `lazy` runs a stream's
    // work only when something waits for it, `peers` runs every other stream's work before
    // queuing more; a missing wait between streams reads NaN under one or the other.
    for schedule in ["lazy", "peers"] {
        let cache = std::env::temp_dir().join(format!(
            "ferrotron-emu-kernels-{}-{schedule}",
            std::process::id()
        ));
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "ops::",
                "equivalence::",
                "attention::",
                "loss::",
                "--test-threads",
                "2",
            ])
            // 24 GB of tensors past 2^31 elements: a GPU's test, not this machine's memory.
            .args(["--skip", "tensors_past_two_to_the_31_elements"])
            .env("LD_LIBRARY_PATH", &path)
            .env(CHILD, "1")
            .env("FERROTRON_REQUIRE_GPU", "1")
            .env("FERROTRON_CACHE_DIR", &cache)
            .env("FTEMU_SCHEDULE", schedule)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&cache);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = writeln!(std::io::stderr(), "[{schedule}]\n{stdout}\n{stderr}");
        assert!(
            out.status.success(),
            "the emulated GPU tests failed ({schedule})"
        );
        // Every included test ran there (none filtered away, none skipped).
        let passed: usize = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("test result: ok. "))
            .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
            .sum();
        let listed = stdout
            .lines()
            .filter(|l| {
                [
                    "test ops::",
                    "test equivalence::",
                    "test attention::",
                    "test loss::",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .count();
        assert!(
            listed >= 25 && passed >= listed,
            "{schedule}: {listed} tests listed, {passed} passed"
        );
        assert!(
            !stderr.contains("SKIPPED"),
            "{schedule}: a test skipped on the emulated device"
        );
    }
}
