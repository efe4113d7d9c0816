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

/// The process ids of `parent`'s children.
fn children(parent: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether process `pid` has a thread named `name`.
fn has_thread(pid: u32, name: &str) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .any(|comm| comm.trim() == name)
}

/// The `FERROTRON_RANK` process `pid` was started with.
fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("FERROTRON_RANK="))
        .and_then(|r| r.parse().ok())
}

/// One rank of a launched job on NCCL stops (SIGSTOP) in the middle of its steps: the other's
/// watchdog reports the collective it waits in (the op, the node, the group) and the rank that
/// had not arrived, within the timeout, records it as the job's failure and exits, and the
/// launcher stops the job.
#[cfg(target_os = "linux")]
#[test]
fn a_stopped_rank_is_named_by_the_nccl_watchdog() {
    use std::time::{Duration, Instant};
    // Where the stand-in cannot run, this says so (and fails where it must run).
    if on_emulated_gpu(&["--version"]).is_none() {
        return;
    }
    let existing = std::env::var("LD_LIBRARY_PATH").ok();
    let path = ferrotron_cuda_emu::library_path(existing.as_deref()).unwrap();
    let cache =
        std::env::temp_dir().join(format!("ferrotron-cuda-cli-kernels-{}", std::process::id()));
    let timeout_s = 3;
    let mut job = Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--grace",
            "1",
            "--timeout",
        ])
        .arg(timeout_s.to_string())
        .args([
            "--",
            "run",
            "models/tiny-gpt.ron",
            "--backend",
            "cuda",
            "--tp",
            "2",
        ])
        .args(["--steps", "1000000"])
        .env("LD_LIBRARY_PATH", path)
        .env("FERROTRON_CACHE_DIR", cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both workers have made their watchdog (just before their NCCL groups); a second later
    // they are in their steps.
    let started = Instant::now();
    let workers = loop {
        let w = children(job.id());
        if w.len() == 2 && w.iter().all(|&p| has_thread(p, "nccl-watchdog")) {
            break w;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120) && job.try_wait().unwrap().is_none(),
            "the workers did not start their NCCL groups"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(1));
    let stopped = *workers.iter().find(|&&p| rank_of(p) == Some(1)).unwrap();
    // SAFETY: a signal to a child process of this test.
    assert_eq!(unsafe { libc::kill(stopped as i32, libc::SIGSTOP) }, 0);
    let at = Instant::now();
    let out = job.wait_with_output().unwrap();
    let took = at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("NCCL watchdog"), "{stderr}");
    assert!(stderr.contains("rank 0 failed"), "{stderr}");
    assert!(stderr.contains("tp group of ranks 0, 1"), "{stderr}");
    // Stopped between collectives (nearly always), rank 1 is named; stopped inside one, it had
    // begun it and only its absence is.
    assert!(
        stderr.contains("rank 1 had not arrived") || stderr.contains("not every member arrived"),
        "{stderr}"
    );
    assert!(
        took < Duration::from_secs(timeout_s + 20),
        "the job took {took:?} to stop"
    );
    // The node named is one of the plan's communicating nodes.
    let node = stderr
        .split("node `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no node named: {stderr}"));
    let graph =
        ferrotron_ir::load_model("models/tiny-gpt.ron".as_ref(), &Default::default()).unwrap();
    let options = ferrotron_partitioner::PartitionOptions {
        tp: 2,
        ..Default::default()
    };
    let plan = ferrotron_partitioner::partition(&graph, &options).unwrap();
    let op = plan
        .graph
        .nodes
        .values()
        .find(|n| n.name == node)
        .map(|n| &n.op)
        .unwrap_or_else(|| panic!("`{node}` is not a node of the plan"));
    assert!(
        op.is_collective()
            || matches!(
                op,
                ferrotron_ir::Op::CrossEntropy { .. } | ferrotron_ir::Op::CrossEntropyGrad { .. }
            ),
        "`{node}` does not communicate"
    );
}
