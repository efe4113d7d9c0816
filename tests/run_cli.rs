//! `ferrotron run` end to end: a zoo model partitioned and run on CPU threads, verified against
//! the unpartitioned model, with the JSON fields the README documents.

use std::process::Command;

fn ferrotron(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .output()
        .expect("the ferrotron binary runs")
}

#[test]
fn run_verify_json() {
    for extra in [
        vec!["--tp", "2"],
        vec!["--tp", "2", "--dp", "2", "--sequence-parallel"],
    ] {
        let mut args = vec!["run", "models/tiny-gpt.ron", "--verify", "--json"];
        args.extend(extra.iter().copied());
        let out = ferrotron(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["verified"], true, "{j}");
        let loss = j["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        assert!(j["max_rel_error"].as_f64().unwrap() < 1e-4);
        assert!(j["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(j["peak_bytes_per_rank"].as_u64().unwrap() > 0);
    }
}

#[test]
fn run_text_and_errors() {
    let out = ferrotron(&["run", "models/tiny-llama.ron", "--tp", "2", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verified ("), "{text}");
    assert!(text.contains("tokens/s"), "{text}");
    let out = ferrotron(&["run", "models/tiny-llama.ron", "--tp", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("valid tp sizes"),
        "{err}"
    );
}
