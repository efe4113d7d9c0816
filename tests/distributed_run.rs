//! `ferrotron run` under `ferrotron launch`: one rank per process, CPU ranks talking over TCP.
//! Each process verifies its own gradient shards against the unpartitioned model, and the loss
//! the job reports is the in-process run's.

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

/// The `loss N` figure of a `run` report.
fn loss(stdout: &str) -> f64 {
    let at = stdout.find("loss ").expect("a loss is printed") + 5;
    stdout[at..]
        .split(|c: char| c == ',' || c.is_whitespace())
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the loss parses")
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
        all.contains("the launcher started 3 ranks, the plan needs tp × dp = 2 × 1 = 2"),
        "{all}"
    );
}

#[test]
fn train_under_the_launcher_says_it_is_not_supported_yet() {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let (ok, stdout, stderr) = ferrotron(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--timeout",
        "30",
        "--",
        "train",
        MODEL,
        "--data",
        readme,
        "--steps",
        "1",
        "--dim",
        "vocab=256",
    ]);
    assert!(!ok, "{stdout}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("under `ferrotron launch` only `run` executes one rank per process"),
        "{all}"
    );
}
