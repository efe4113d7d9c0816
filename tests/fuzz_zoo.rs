//! Mutation fuzzing of the model front-end: thousands of randomly damaged copies of the zoo's
//! files (truncations, byte flips, swapped, deleted and duplicated tokens, duplicated lines) must
//! each come back as `Ok` or as a `ModelError`, never as a panic. The seed is fixed so a failure
//! reproduces; the failing input is printed.

use ferrotron_ir::{parse_model, LoadOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};

const CASES_PER_FILE: usize = 300;

/// Splits source into tokens and the separators between them, keeping everything, so tokens can
/// be swapped and the text rebuilt.
fn tokens(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in src.chars() {
        let word = c.is_alphanumeric() || c == '_' || c == '.';
        if !word || (c == '"') {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(c.to_string());
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn mutate(src: &str, rng: &mut fastrand::Rng) -> String {
    let bytes = src.as_bytes();
    match rng.usize(0..6) {
        0 => String::from_utf8_lossy(&bytes[..rng.usize(0..bytes.len())]).into_owned(),
        1 => {
            let mut b = bytes.to_vec();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..b.len());
                b[i] = if rng.bool() {
                    rng.u8(..)
                } else {
                    *rng.choice(b"0123456789(){}[]:,\"-/*+ xyz".iter()).unwrap()
                };
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        2 => {
            let mut t = tokens(src);
            let (i, j) = (rng.usize(0..t.len()), rng.usize(0..t.len()));
            t.swap(i, j);
            t.concat()
        }
        3 => {
            let mut t = tokens(src);
            t.remove(rng.usize(0..t.len()));
            t.concat()
        }
        4 => {
            let mut t = tokens(src);
            let i = rng.usize(0..t.len());
            let copy = t[rng.usize(0..t.len())].clone();
            t.insert(i, copy);
            t.concat()
        }
        _ => {
            let mut lines: Vec<&str> = src.lines().collect();
            let i = rng.usize(0..lines.len());
            let line = lines[rng.usize(0..lines.len())];
            lines.insert(i, line);
            lines.join("\n")
        }
    }
}

#[test]
fn damaged_model_files_are_errors_never_panics() {
    let mut files: Vec<_> = std::fs::read_dir("models")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    // Small enough that a mutated `layers` cannot make a case slow; large enough for the zoo.
    let opts = LoadOptions {
        max_nodes: 5_000,
        ..LoadOptions::default()
    };
    let mut rng = fastrand::Rng::with_seed(0x5eed_f00d);
    let (mut cases, mut rejected) = (0, 0);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    'files: for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        let name = path.to_str().unwrap();
        for _ in 0..CASES_PER_FILE {
            let damaged = mutate(&src, &mut rng);
            cases += 1;
            match catch_unwind(AssertUnwindSafe(|| parse_model(&damaged, name, &opts))) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    rejected += 1;
                    // Every error says which file it is about.
                    assert!(e.to_string().contains(".ron"), "{e}");
                }
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failure = Some(format!("{name}: panic `{msg}` on input:\n{damaged}"));
                    break 'files;
                }
            }
        }
    }
    std::panic::set_hook(hook);
    if let Some(f) = failure {
        panic!("{f}");
    }
    assert!(cases >= 3_000, "{cases} cases");
    // Most damage must be caught; a mutation inside a comment or a number may stay valid.
    assert!(
        rejected * 2 > cases,
        "only {rejected} of {cases} damaged files were rejected"
    );
    println!("{cases} damaged files, {rejected} rejected with an error, none panicked");
}
