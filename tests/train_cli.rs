//! `ferrotron train`, `reshard` and `generate` end to end: a run resumed from a checkpoint
//! continues bit-identically (same losses, learning rates and gradient norms as the
//! uninterrupted run), a checkpoint reshards to another tp and resumes there, and generation
//! from it produces text.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ferrotron(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

fn ok(args: &[&str]) {
    let out = ferrotron(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const MODEL: [&str; 8] = [
    "models/tiny-gpt.ron",
    "--dim",
    "vocab=256",
    "--dim",
    "batch=4",
    "--dim",
    "seq=16",
    "--tp=2",
];

fn train(extra: &[&str]) {
    let mut args = vec!["train"];
    args.extend(MODEL);
    args.extend(["--data", "README.md", "--lr", "3e-3", "--warmup", "3"]);
    args.extend(extra);
    ok(&args);
}

/// `step,loss,lr,grad_norm` of each logged step (tokens/s dropped).
fn log(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_owned())
        .collect()
}

#[test]
fn resume_is_bit_identical_and_checkpoints_reshard() {
    let dir: PathBuf = std::env::temp_dir().join(format!("ferrotron-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();

    train(&["--steps", "8", "--log", &p("straight.csv")]);
    train(&[
        "--steps",
        "4",
        "--save",
        &p("ck4"),
        "--log",
        &p("resumed.csv"),
    ]);
    train(&[
        "--steps",
        "8",
        "--resume",
        &p("ck4"),
        "--log",
        &p("resumed.csv"),
    ]);
    let straight = log(Path::new(&p("straight.csv")));
    assert_eq!(straight.len(), 8);
    assert_eq!(log(Path::new(&p("resumed.csv"))), straight);

    // The same checkpoint at tp = 1: resharded, it resumes there too.
    let (from, to) = (p("ck4"), p("ck4-tp1"));
    let mut args = vec!["reshard"];
    args.extend(&MODEL[..7]);
    args.extend(["--tp=1", "--from", &from, "--to", &to]);
    ok(&args);
    assert!(Path::new(&p("ck4-tp1")).join("rank-0.safetensors").exists());
    assert!(!Path::new(&p("ck4-tp1")).join("rank-1.safetensors").exists());

    let mut args = vec!["generate"];
    args.extend(MODEL);
    let ck = p("ck4");
    args.extend([
        "--checkpoint",
        &ck,
        "--prompt",
        "ferrotron",
        "--tokens",
        "8",
    ]);
    let out = ferrotron(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ferrotron") && text.trim_end().len() >= "ferrotron".len());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint written with the distributed optimizer holds whole tensors: it resumes without
/// it, at another dp, where the uninterrupted replicated run would have been.
#[test]
fn a_distributed_optimizer_checkpoint_resumes_without_it_at_another_dp() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("ferrotron-train-zero-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    train(&["--steps", "6", "--dp", "2", "--log", &p("straight.csv")]);
    train(&[
        "--steps",
        "3",
        "--dp",
        "2",
        "--zero",
        "1",
        "--save",
        &p("ck3"),
        "--log",
        &p("resumed.csv"),
    ]);
    train(&[
        "--steps",
        "6",
        "--dp",
        "4",
        "--resume",
        &p("ck3"),
        "--log",
        &p("resumed.csv"),
    ]);
    let loss = |l: &String| -> f64 { l.split(',').nth(1).unwrap().parse().unwrap() };
    let straight = log(Path::new(&p("straight.csv")));
    let resumed = log(Path::new(&p("resumed.csv")));
    assert_eq!(straight.len(), 6);
    assert_eq!(resumed.len(), 6);
    for (a, b) in straight.iter().zip(&resumed) {
        assert!((loss(a) - loss(b)).abs() < 1e-5, "{a} vs {b}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--json`: one object at the end, its losses those the log records, the steady step the
/// median after the first, the step's measured peak the memory plan's.
#[test]
fn json_summary_matches_the_log() {
    let dir = std::env::temp_dir().join(format!("ferrotron-train-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("log.csv");
    let mut args = vec!["train"];
    args.extend(MODEL);
    let csv_arg = csv.display().to_string();
    args.extend([
        "--data",
        "README.md",
        "--steps",
        "4",
        "--json",
        "--log",
        &csv_arg,
    ]);
    let out = ferrotron(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    // f32 losses, printed shortest in the log.
    let losses: Vec<f32> = j["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(losses.len(), 4, "{j}");
    let logged: Vec<f32> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses, logged);
    assert_eq!(
        (j["step"].as_u64(), j["steps_taken"].as_u64()),
        (Some(4), Some(4))
    );
    let (first, step) = (
        j["first_step_s"].as_f64().unwrap(),
        j["step_s"].as_f64().unwrap(),
    );
    assert!(first > 0.0 && step > 0.0, "{j}");
    let tps = j["tokens_per_second"].as_f64().unwrap();
    assert!((tps * step - 4.0 * 16.0).abs() < 1e-6, "{j}");
    // The step's memory: measured, and planned to the byte; the moments apart.
    let peak = j["peak_bytes_per_rank"].as_u64().unwrap();
    assert!(peak > 0, "{j}");
    assert_eq!(j["planned_peak_bytes_per_rank"].as_u64(), Some(peak), "{j}");
    assert!(j["arena_bytes_per_rank"].as_u64().unwrap() < peak, "{j}");
    assert!(j["optimizer_bytes_per_rank"].as_u64().unwrap() > 0, "{j}");
    // The steps after the first place every value in the rank's arena: none is allocated on
    // its own, so no page of a value is touched for the first time.
    assert!(j["arena_placed_last_step"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["arena_missed_last_step"].as_u64(), Some(0), "{j}");
    for field in [
        "user_s_per_step",
        "system_s_per_step",
        "minor_faults_per_step",
    ] {
        assert!(j[field].as_f64().is_some_and(|x| x >= 0.0), "{field}: {j}");
    }
    assert!(j["resident_bytes"].as_u64().unwrap() > peak, "{j}");
    std::fs::remove_dir_all(&dir).ok();
}
