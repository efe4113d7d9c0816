//! `ferrotron run` and `train` with `--backend cuda`, end to end through the CLI, on the CPU
//! stand-in for the CUDA driver, cuBLAS and NCCL (`cuda-emu`): the CUDA backend's code path as
//! a user runs it (NVRTC compile, virtual ranks, verification against the CPU), and under
//! `ferrotron launch` one rank per process with NCCL collectives between them, with no GPU. Each
//! command runs with the stand-in first on `LD_LIBRARY_PATH`, then NVRTC (which the stand-in's
//! build provides). Without either, the tests say they are skipped (and fail under
//! `FERROTRON_REQUIRE_NVRTC`, as in CI).

mod common;

use common::reported_loss;
use std::process::{Command, Output};

/// `ferrotron args…` on the emulated device, or `None` (after saying why) where it cannot run.
fn on_emulated_gpu(args: &[&str]) -> Option<Output> {
    let existing = std::env::var("LD_LIBRARY_PATH").ok();
    let nvrtc = ferrotron_cuda_emu::nvrtc_dir().is_some() || nvrtc_on_path();
    let why = match ferrotron_cuda_emu::library_path(existing.as_deref()) {
        None => "no C++ compiler was found to build the stand-in libraries",
        Some(_) if !nvrtc => "no NVRTC: the build could not pip install nvidia-cuda-nvrtc",
        Some(path) => {
            let cache = std::env::temp_dir()
                .join(format!("ferrotron-cuda-cli-kernels-{}", std::process::id()));
            let out = Command::new(env!("CARGO_BIN_EXE_ferrotron"))
                .args(args)
                .env("LD_LIBRARY_PATH", path)
                .env("FERROTRON_CACHE_DIR", cache)
                .output()
                .expect("the ferrotron binary runs");
            return Some(out);
        }
    };
    assert!(
        std::env::var_os("FERROTRON_REQUIRE_NVRTC").is_none(),
        "FERROTRON_REQUIRE_NVRTC is set but the CUDA CLI tests cannot run: {why}"
    );
    eprintln!("SKIPPED: the CUDA CLI tests on the emulated device ({why})");
    None
}

fn nvrtc_on_path() -> bool {
    std::env::var("LD_LIBRARY_PATH").is_ok_and(|p| {
        p.split(':')
            .any(|d| !d.is_empty() && std::path::Path::new(d).join("libnvrtc.so.13").exists())
    })
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_backend_cuda_verifies_against_the_cpu_in_f32_and_bf16() {
    let base = [
        "run",
        "models/tiny-gpt.ron",
        "--backend",
        "cuda",
        "--verify",
        "--json",
    ];
    for (extra, tolerance) in [
        (&["--tp", "2"][..], 1e-4),
        (&["--tp", "2", "--dp", "2", "--sequence-parallel"][..], 1e-4),
        (&["--tp", "4", "--dtype", "bf16"][..], 6e-2),
    ] {
        let args = [&base[..], extra].concat();
        let Some(out) = on_emulated_gpu(&args) else {
            return;
        };
        let j = json(&out);
        assert_eq!(j["verified"], true, "{args:?}: {j}");
        let err = j["max_rel_error"].as_f64().unwrap();
        assert!(err < tolerance, "{args:?}: {err}");
    }
}

#[test]
fn train_backend_cuda_follows_the_cpu_in_one_process_and_launched() {
    let dir = std::env::temp_dir().join(format!("ferrotron-cuda-cli-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = |b: &str| dir.join(format!("{b}.csv"));
    // `launched-pp`: two pipeline stages, a process each, instead of two tp ranks.
    for backend in ["cuda", "cpu", "launched", "launched-pp"] {
        let path = log(backend);
        let launched = ["launch", "--nproc-per-node", "2", "--timeout", "120", "--"];
        let mesh = if backend == "launched-pp" {
            "--pp"
        } else {
            "--tp"
        };
        let args = [
            "train",
            "models/tiny-gpt.ron",
            "--dim",
            "vocab=256",
            mesh,
            "2",
            "--data",
            "README.md",
            "--steps",
            "4",
            "--backend",
            if backend == "cpu" { "cpu" } else { "cuda" },
            "--log",
            path.to_str().unwrap(),
        ];
        let args = if backend.starts_with("launched") {
            [&launched[..], &args[..]].concat()
        } else {
            args.to_vec()
        };
        let out = if backend != "cpu" {
            match on_emulated_gpu(&args) {
                Some(out) => out,
                None => return,
            }
        } else {
            Command::new(env!("CARGO_BIN_EXE_ferrotron"))
                .args(args)
                .output()
                .unwrap()
        };
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let losses = |b: &str| -> Vec<f64> {
        std::fs::read_to_string(log(b))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let cpu = losses("cpu");
    for run in ["cuda", "launched", "launched-pp"] {
        let gpu = losses(run);
        assert_eq!(gpu.len(), 4, "{run}");
        for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            assert!(
                (g - c).abs() <= 1e-4 * c.abs(),
                "{run}, step {step}: loss {g} on the GPU, {c} on the CPU"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn launch_backend_cuda_runs_a_rank_per_process_over_nccl() {
    for (procs, mesh, dtype) in [
        ("2", &["--tp", "2"][..], "f32"),
        (
            "4",
            &["--tp", "2", "--dp", "2", "--sequence-parallel"][..],
            "f32",
        ),
        ("2", &["--tp", "2"][..], "bf16"),
        // Pipeline stages in processes of their own, passing activations through host copies.
        (
            "4",
            &["--tp", "2", "--pp", "2", "--micro-batches", "2"][..],
            "f32",
        ),
        ("2", &["--pp", "2", "--micro-batches", "2"][..], "bf16"),
    ] {
        let mut job = vec![
            "launch",
            "--nproc-per-node",
            procs,
            "--timeout",
            "120",
            "--",
        ];
        job.extend([
            "run",
            "models/tiny-gpt.ron",
            "--backend",
            "cuda",
            "--verify",
        ]);
        job.extend(["--dtype", dtype]);
        job.extend(mesh);
        let Some(out) = on_emulated_gpu(&job) else {
            return;
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{job:?}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("run (cuda, {procs} processes)")),
            "{stdout}"
        );
        assert_eq!(
            stdout.matches(": verified").count().to_string(),
            procs,
            "every rank verifies its shards: {stdout}"
        );
        if dtype == "f32" {
            // The same loss as all ranks in one process on the CPU.
            let mut alone = vec!["run", "models/tiny-gpt.ron", "--verify"];
            alone.extend(mesh);
            let cpu = Command::new(env!("CARGO_BIN_EXE_ferrotron"))
                .args(&alone)
                .output()
                .unwrap();
            let (a, b) = (
                reported_loss(&stdout),
                reported_loss(&String::from_utf8_lossy(&cpu.stdout)),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{a} launched on the GPU, {b} on the CPU"
            );
        }
    }
}
