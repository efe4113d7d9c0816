//! No crate of the workspace has modules that import each other in a cycle (`plan` ↔ `check`,
//! `backend` ↔ `exec` once did): each module's uses of `crate::…` and `super::…` paths, outside
//! its tests, make the edges of a graph that must have no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 10] = [
    "ir/src",
    "partitioner/src",
    "runtime/exec/src",
    "runtime/cpu/src",
    "runtime/cuda/src",
    "runtime/launch/src",
    "runtime/io/src",
    "visualizer/src",
    "cuda-emu/src",
    "src",
];

/// Every module of a crate (`kernels::matmul`), with its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    parts.last().map(String::as_str),
                    Some("lib" | "main" | "mod")
                ) {
                    parts.pop();
                }
                out.insert(parts.join("::"), path);
            }
        }
    }
    out
}

/// The module paths `text` names after `prefix` (`crate::`, `super::`).
fn paths_after<'t>(text: &'t str, prefix: &str) -> Vec<Vec<&'t str>> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(rest[..end].split("::").filter(|s| !s.is_empty()).collect());
    }
    out
}

/// Each module's imports of its crate's other modules.
fn edges(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, file) in mods {
        let text = std::fs::read_to_string(file).unwrap();
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let here: Vec<&str> = name.split("::").filter(|s| !s.is_empty()).collect();
        let parent = &here[..here.len().saturating_sub(1)];
        let mut targets = BTreeSet::new();
        let found = paths_after(&code, "crate::").into_iter().chain(
            paths_after(&code, "super::").into_iter().map(|p| {
                let mut full = parent.to_vec();
                full.extend(p);
                full
            }),
        );
        for path in found {
            // The longest prefix that is a module.
            for k in (1..=path.len()).rev() {
                let candidate = path[..k].join("::");
                if mods.contains_key(&candidate) {
                    if &candidate != name {
                        targets.insert(candidate);
                    }
                    break;
                }
            }
        }
        graph.insert(name.clone(), targets);
    }
    graph
}

/// A cycle through `graph`, if it has one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == v) {
            return Some(path[at..].to_vec());
        }
        if done.contains(v) {
            return None;
        }
        path.push(v.to_owned());
        for w in &graph[v] {
            if let Some(c) = visit(w, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(v.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|v| visit(v, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for src in CRATES {
        let mods = modules(&root.join(src));
        assert!(
            mods.len() > 1 || src == "cuda-emu/src",
            "{src}: no modules found"
        );
        if let Some(c) = cycle(&edges(&mods)) {
            panic!(
                "{src}: modules import each other in a cycle: {}",
                c.join(" → ")
            );
        }
    }
}

#[test]
fn the_check_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("plan", &["check"][..]),
        ("check", &["rules", "plan"][..]),
        ("rules", &[][..]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.iter().map(|s| s.to_string()).collect()))
    .collect();
    let c = cycle(&graph).expect("a cycle");
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(paths_after("use crate::plan::{Plan}; super::x", "crate::") == [vec!["plan"]]);
}
