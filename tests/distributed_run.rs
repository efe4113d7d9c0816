//! `ferrotron run` under `ferrotron launch`: one rank per process, CPU ranks talking over TCP.
//! Each process verifies its own gradient shards against the unpartitioned model, and the loss
//! the job reports is the in-process run's.

mod common;

use common::reported_loss as loss;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ferrotron");
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt.ron");

fn ferrotron(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("ferrotron runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ranks_as_processes_verify_and_match_the_in_process_run() {
    for (procs, mesh) in [
        ("2", vec!["--tp", "2"]),
        ("4", vec!["--tp", "2", "--dp", "2", "--sequence-parallel"]),
        (
            "3",
            vec!["--tp", "3", "--dim", "hidden=96", "--dim", "heads=3"],
        ),
    ] {
        let mut job = vec!["launch", "--nproc-per-node", procs, "--timeout", "60", "--"];
        job.extend(["run", MODEL, "--verify"]);
        job.extend(mesh.iter().copied());
        let (ok, stdout, stderr) = ferrotron(&job);
        assert!(ok, "{job:?}\n{stdout}\n{stderr}");
        let verified = stdout.matches("verified").count();
        assert_eq!(verified.to_string(), procs, "every rank verifies: {stdout}");
        let mut single = vec!["run", MODEL, "--verify"];
        single.extend(mesh.iter().copied());
        let (ok, alone, stderr) = ferrotron(&single);
        assert!(ok, "{stderr}");
        let (a, b) = (loss(&stdout), loss(&alone));
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    }
}

#[test]
fn a_world_size_that_is_not_the_mesh_is_an_error() {
    let (ok, stdout, stderr) = ferrotron(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--timeout",
        "30",
        "--",
        "run",
        MODEL,
        "--tp",
        "2",
    ]);
    assert!(!ok, "{stdout}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("the launcher started 3 ranks, the plan needs tp × dp × pp = 2 × 1 × 1 = 2"),
        "{all}"
    );
}

/// The `loss` column of a training log (`step,loss,lr,grad_norm,tokens_per_second`).
fn losses(log: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .expect("the log was written")
        .lines()
        .map(|l| {
            l.split(',')
                .nth(1)
                .and_then(|x| x.parse().ok())
                .expect("a loss")
        })
        .collect()
}

#[test]
fn training_with_a_rank_per_process_follows_training_in_one_process() {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let dir = std::env::temp_dir().join(format!("ferrotron-dist-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (alone, launched) = (dir.join("alone.csv"), dir.join("launched.csv"));
    let train = [
        "train",
        MODEL,
        "--data",
        readme,
        "--steps",
        "4",
        "--dim",
        "vocab=256",
        "--tp",
        "2",
        "--dp",
        "2",
    ];
    let mut single: Vec<&str> = train.to_vec();
    single.extend(["--log", alone.to_str().unwrap()]);
    let (ok, _, stderr) = ferrotron(&single);
    assert!(ok, "{stderr}");
    let mut job = vec!["launch", "--nproc-per-node", "4", "--timeout", "60", "--"];
    job.extend(train);
    job.extend(["--log", launched.to_str().unwrap()]);
    let (ok, stdout, stderr) = ferrotron(&job);
    assert!(ok, "{stdout}\n{stderr}");
    let (a, b) = (losses(&alone), losses(&launched));
    assert_eq!(a.len(), 4);
    assert_eq!(a.len(), b.len(), "one log line per step, from rank 0 only");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs {b:?}");
    }
    // The distributed optimizer across processes: reduce-scatter and all-gather over TCP.
    let zero = dir.join("zero.csv");
    let mut job = vec!["launch", "--nproc-per-node", "4", "--timeout", "60", "--"];
    job.extend(train);
    job.extend(["--zero", "1", "--log", zero.to_str().unwrap()]);
    let (ok, stdout, stderr) = ferrotron(&job);
    assert!(ok, "{stdout}\n{stderr}");
    let z = losses(&zero);
    assert_eq!(a.len(), z.len());
    for (x, y) in a.iter().zip(&z) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs --zero 1 {z:?}");
    }
    // Checkpoints across processes: two steps saved by the launched job, two more resumed by
    // it, follow the uninterrupted run; and a single process resumes the launched checkpoint.
    let ckpt = dir.join("ckpt");
    let resumed = dir.join("resumed.csv");
    let with = |steps: &'static str, extra: Vec<&str>| {
        let mut v: Vec<String> = train.iter().map(|s| s.to_string()).collect();
        v[5] = steps.to_string(); // "--steps" N
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let ckpt_s = ckpt.to_str().unwrap();
    let resumed_s = resumed.to_str().unwrap();
    for (steps, extra) in [
        ("2", vec!["--save", ckpt_s]),
        ("4", vec!["--resume", ckpt_s, "--log", resumed_s]),
    ] {
        let mut job: Vec<String> = ["launch", "--nproc-per-node", "4", "--timeout", "60", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        job.extend(with(steps, extra));
        let job: Vec<&str> = job.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = ferrotron(&job);
        assert!(ok, "{job:?}\n{stdout}\n{stderr}");
    }
    let r = losses(&resumed);
    assert_eq!(r.len(), 2, "steps 2 and 3 after resuming");
    for (x, y) in a[2..].iter().zip(&r) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs resumed {r:?}");
    }
    let alone_resumed = dir.join("alone-resumed.csv");
    let single = with(
        "4",
        vec!["--resume", ckpt_s, "--log", alone_resumed.to_str().unwrap()],
    );
    let single: Vec<&str> = single.iter().map(String::as_str).collect();
    let (ok, _, stderr) = ferrotron(&single);
    assert!(ok, "{stderr}");
    let r = losses(&alone_resumed);
    for (x, y) in a[2..].iter().zip(&r) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{a:?} vs resumed in one process {r:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pipeline_stages_as_processes_verify_and_train() {
    // Every rank verifies its own stage's gradient shards; the loss crosses from the last stage.
    let mesh = ["--tp", "2", "--pp", "2", "--micro-batches", "2"];
    let mut job = vec!["launch", "--nproc-per-node", "4", "--timeout", "60", "--"];
    job.extend(["run", MODEL, "--verify"]);
    job.extend(mesh);
    let (ok, stdout, stderr) = ferrotron(&job);
    assert!(ok, "{job:?}\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.matches("verified").count(),
        4,
        "every rank: {stdout}"
    );
    assert!(stdout.contains("pp 1)"), "{stdout}");
    let mut single = vec!["run", MODEL, "--verify"];
    single.extend(mesh);
    let (ok, alone, stderr) = ferrotron(&single);
    assert!(ok, "{stderr}");
    let (a, b) = (loss(&stdout), loss(&alone));
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");

    // Training: the launched job's log follows the one-process run's.
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let dir = std::env::temp_dir().join(format!("ferrotron-pp-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (alone, launched) = (dir.join("alone.csv"), dir.join("launched.csv"));
    let train = [
        "train",
        MODEL,
        "--data",
        readme,
        "--steps",
        "2",
        "--dim",
        "vocab=256",
        "--tp",
        "2",
        "--pp",
        "2",
    ];
    let mut single: Vec<&str> = train.to_vec();
    single.extend(["--log", alone.to_str().unwrap()]);
    let (ok, _, stderr) = ferrotron(&single);
    assert!(ok, "{stderr}");
    let mut job = vec!["launch", "--nproc-per-node", "4", "--timeout", "60", "--"];
    job.extend(train);
    job.extend(["--log", launched.to_str().unwrap()]);
    let (ok, stdout, stderr) = ferrotron(&job);
    assert!(ok, "{stdout}\n{stderr}");
    let (a, b) = (losses(&alone), losses(&launched));
    assert_eq!(a.len(), 2);
    assert_eq!(a.len(), b.len(), "one log line per step, from rank 0 only");
    for (x, y) in a.iter().zip(&b) {
        assert!(y.is_finite(), "{b:?}");
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs {b:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
