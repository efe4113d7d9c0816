//! The CUDA kernels without a GPU: every source compiles with NVRTC for sm_80 and sm_90 with no
//! error and no warning; every kernel the launch code uses (`cuda::kernels::KERNELS`) is an
//! `.entry` of its source's PTX with the parameters the launch passes (count, each one's PTX
//! type, each struct's byte size), and the PTX has no entry the list lacks; the disk cache
//! round-trips and recompiles a corrupted entry; and opening a GPU where there is none is a
//! clean `CudaError::Unavailable`.
//!
//! NVRTC comes from PyPI (`nvidia-cuda-nvrtc`, CUDA 13), which the CUDA stand-in's build
//! installs (`cuda-emu`); it is loaded from there unless the loader finds one already. Without
//! it the NVRTC tests print `SKIPPED: libnvrtc not found` and pass, unless
//! `FERROTRON_REQUIRE_NVRTC=1` (CI), where they fail.

use ferrotron_cuda::kernels::{Param, KERNELS};
use ferrotron_cuda::libs::Lib;
use ferrotron_cuda::nvrtc::{self, Source, SOURCES};
use ferrotron_cuda::{CudaError, Gpu};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// A line on the process's stderr, past the test harness's capture (which takes `eprintln!`
/// only): a skipped test or a timing is visible in a plain `cargo test` run.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether NVRTC is there; without it, fail under `FERROTRON_REQUIRE_NVRTC=1`, else say so.
fn nvrtc_available(test: &str) -> bool {
    if ferrotron_cuda_emu::load_nvrtc() && Lib::Nvrtc.present() {
        return true;
    }
    let why = "libnvrtc not found (pip install nvidia-cuda-nvrtc and add its lib directory \
               to LD_LIBRARY_PATH)";
    assert!(
        std::env::var("FERROTRON_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "FERROTRON_REQUIRE_NVRTC=1 but {why}"
    );
    say(&format!("SKIPPED: {why} [{test}]"));
    false
}

/// One parameter as PTX declares it: its type (`u64`, `f32`, `b8`) and array size.
#[derive(Debug, PartialEq)]
struct PtxParam {
    ty: String,
    bytes: Option<usize>,
}

/// Every `.entry` of a PTX module with its parameters.
fn entries(ptx: &str) -> HashMap<String, Vec<PtxParam>> {
    let mut out = HashMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(at) = line.find(".entry ") else {
            continue;
        };
        let name = line[at + 7..]
            .trim()
            .trim_end_matches('(')
            .trim()
            .to_string();
        let mut params = Vec::new();
        for p in lines.by_ref() {
            let p = p.trim();
            if p.starts_with(')') {
                break;
            }
            // `.param .u64 k_param_0,` or `.param .align 8 .b8 k_param_1[128]`
            let words: Vec<&str> = p.trim_end_matches(',').split_whitespace().collect();
            let ty = words
                .iter()
                .rev()
                .nth(1)
                .map(|t| t.trim_start_matches('.').to_string())
                .unwrap_or_default();
            let last = words.last().copied().unwrap_or_default();
            let bytes = last
                .find('[')
                .and_then(|i| last[i + 1..].trim_end_matches(']').parse().ok());
            params.push(PtxParam { ty, bytes });
        }
        out.insert(name, params);
    }
    out
}

fn compile_checked(arch: &str) -> nvrtc::Compiled {
    let started = Instant::now();
    let compiled = nvrtc::compile_with_cache(arch, None)
        .unwrap_or_else(|e| panic!("NVRTC failed for {arch}: {e}"));
    say(&format!(
        "compiled {} sources for {arch} (target {}, NVRTC {}.{}) in {:.2}s",
        compiled.modules.len(),
        compiled.target,
        compiled.nvrtc_version.0,
        compiled.nvrtc_version.1,
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(compiled.target, arch, "NVRTC should support {arch} itself");
    for m in &compiled.modules {
        let log = m.log.to_lowercase();
        assert!(
            !log.contains("warning") && !log.contains("error"),
            "{} for {arch} compiled with diagnostics:\n{}",
            m.source,
            m.log
        );
        assert!(
            m.cubin.as_ref().is_some_and(|c| !c.is_empty()),
            "{} for {arch}: no cubin",
            m.source
        );
        assert!(!m.cached);
    }
    compiled
}

fn check_signatures(arch: &str, compiled: &nvrtc::Compiled) {
    let mut found: HashMap<&str, HashMap<String, Vec<PtxParam>>> = HashMap::new();
    for m in &compiled.modules {
        found.insert(m.source, entries(&m.ptx));
    }
    let mut problems = Vec::new();
    let mut listed: HashMap<&str, Vec<String>> = HashMap::new();
    for spec in KERNELS {
        let Some(module) = found.get(spec.source) else {
            problems.push(format!("{}: no source {}", spec.name, spec.source));
            continue;
        };
        for symbol in spec.symbols() {
            listed.entry(spec.source).or_default().push(symbol.clone());
            let Some(params) = module.get(&symbol) else {
                problems.push(format!("`{symbol}` is not an entry of {}", spec.source));
                continue;
            };
            if params.len() != spec.params.len() {
                problems.push(format!(
                    "`{symbol}` takes {} parameters in the PTX, the launch passes {}",
                    params.len(),
                    spec.params.len()
                ));
                continue;
            }
            for (i, (got, want)) in params.iter().zip(spec.params).enumerate() {
                let (ty, bytes) = want.ptx();
                if got.ty != ty || got.bytes != bytes {
                    problems.push(format!(
                        "`{symbol}` parameter {i}: PTX .{}{}, the launch passes {want:?}",
                        got.ty,
                        got.bytes.map(|b| format!("[{b}]")).unwrap_or_default()
                    ));
                }
            }
        }
    }
    // No kernel the launch code does not know (a stale or misspelt one).
    for (source, module) in &found {
        for name in module.keys() {
            if !listed.get(source).is_some_and(|l| l.contains(name)) {
                problems.push(format!("{source} has `{name}`, which no launch uses"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{arch}: kernels and launches disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_and_matches_its_launches() {
    if !nvrtc_available("compile") {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let compiled = compile_checked(arch);
        check_signatures(arch, &compiled);
    }
    // Struct parameters have a size (a zero would mean a missing `#[repr(C)]` twin).
    assert!(KERNELS
        .iter()
        .all(|k| k.params.iter().all(|p| *p != Param::Struct(0))));
}

#[test]
fn a_compile_error_carries_nvrtcs_log() {
    if !nvrtc_available("compile error") {
        return;
    }
    let bad = Source {
        name: "bad.cu",
        code: "extern \"C\" __global__ void k(float* x) { x[0] = no_such_thing; }\n",
    };
    match nvrtc::compile_source(&bad, "sm_90") {
        Err(CudaError::Compile {
            source_name,
            arch,
            log,
        }) => {
            assert_eq!((source_name.as_str(), arch.as_str()), ("bad.cu", "sm_90"));
            assert!(log.contains("no_such_thing"), "{log}");
            // The `#line` directive points at the source's own line 1.
            assert!(log.contains("bad.cu(1)"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!(
            "ferrotron-cuda-compile-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_cache_round_trips_and_recompiles_a_corrupt_entry() {
    if !nvrtc_available("cache") {
        return;
    }
    let dir = TempDir::new("cache");
    let arch = "sm_90";
    let started = Instant::now();
    let first = nvrtc::compile_with_cache(arch, Some(&dir.0)).unwrap();
    let compile_s = started.elapsed().as_secs_f64();
    assert!(first.modules.iter().all(|m| !m.cached));
    let files: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        files.len(),
        SOURCES.len(),
        "one cache file per source: {files:?}"
    );
    assert!(files
        .iter()
        .all(|f| f.extension().is_some_and(|e| e == "bin")));

    let started = Instant::now();
    let second = nvrtc::compile_with_cache(arch, Some(&dir.0)).unwrap();
    let cached_s = started.elapsed().as_secs_f64();
    say(&format!(
        "{arch}: compiled in {compile_s:.2}s, from the cache in {cached_s:.3}s"
    ));
    for (a, b) in first.modules.iter().zip(&second.modules) {
        assert!(b.cached, "{} not read from the cache", b.source);
        assert_eq!(a.ptx, b.ptx);
        assert_eq!(a.cubin, b.cubin);
    }

    // Damage one entry (a flipped byte in the middle) and truncate another: both compile again
    // and are rewritten; the rest still come from the cache.
    let (victim, short) = (SOURCES[0], SOURCES[SOURCES.len() - 1]);
    let v = nvrtc::cache_path(&dir.0, &victim, arch, first.nvrtc_version);
    let s = nvrtc::cache_path(&dir.0, &short, arch, first.nvrtc_version);
    let mut bytes = std::fs::read(&v).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&v, &bytes).unwrap();
    let bytes = std::fs::read(&s).unwrap();
    std::fs::write(&s, &bytes[..bytes.len() / 3]).unwrap();
    let third = nvrtc::compile_with_cache(arch, Some(&dir.0)).unwrap();
    for m in &third.modules {
        let damaged = m.source == victim.name || m.source == short.name;
        assert_eq!(m.cached, !damaged, "{}", m.source);
    }
    for (a, b) in first.modules.iter().zip(&third.modules) {
        assert_eq!(a.ptx, b.ptx);
    }
    let fourth = nvrtc::compile_with_cache(arch, Some(&dir.0)).unwrap();
    assert!(
        fourth.modules.iter().all(|m| m.cached),
        "rewritten entries read back"
    );
    // No temporary files left behind.
    let left: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "bin"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn opening_a_gpu_without_one_is_a_clean_error() {
    // Runs without any CUDA library: the probe must answer before cudarc would panic.
    match Gpu::open(0) {
        Ok(gpu) => eprintln!("a GPU is present: {gpu:?}"),
        Err(CudaError::Unavailable(why)) => {
            assert!(!why.is_empty());
            assert!(
                why.contains("libcuda") || why.contains("device") || why.contains("driver"),
                "not a helpful message: {why}"
            );
            eprintln!("as expected without a GPU: {why}");
        }
        Err(e) => panic!("expected CudaError::Unavailable, got {e}"),
    }
    // A device that certainly does not exist.
    assert!(matches!(Gpu::open(1 << 20), Err(CudaError::Unavailable(_))));
}
