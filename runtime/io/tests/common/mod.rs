//! Helpers the I/O tests share: the tiny-gpt model and scratch directories.

use ferrotron_ir::{load_model, Graph, LoadOptions};
use std::path::{Path, PathBuf};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-gpt.ron");

/// `models/tiny-gpt.ron` with its dimensions overridden.
pub fn model(overrides: &[(&str, u64)]) -> Graph {
    let opts = LoadOptions {
        overrides: overrides.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    load_model(Path::new(MODEL), &opts).unwrap()
}

/// A fresh directory under the system's temporary directory, named after the test binary and
/// `name`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!(
            "ferrotron-{}-test-{name}-{}-{nanos}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
