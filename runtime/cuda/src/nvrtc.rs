//! The kernels' CUDA C sources and their compilation by NVRTC, cached on disk.
//!
//! Where it sits: [`super::Gpu::open`] asks [`super::kernels::Kernels::load`] for the device's
//! kernels, which calls [`compile`] with the device's architecture (`sm_90`) and loads the
//! result into the context. Each source in [`SOURCES`] (`cu/*.cu`, embedded with
//! `include_str!`) is compiled as its own program, behind the shared prelude [`PRELUDE`]
//! (`cu/common.cuh`: bf16 conversions, reductions, the CPU backend's math); a `#line` directive
//! keeps NVRTC's messages pointing at the source file's own lines.
//!
//! What NVRTC is asked for (found by experiment with NVRTC 13.2): `--gpu-architecture=sm_90`
//! yields both PTX and a cubin (SASS for exactly that architecture), `compute_90` yields PTX
//! only. The cubin is what gets loaded: it needs no JIT at start-up, and unlike PTX it does not
//! require a driver at least as new as NVRTC (PTX from NVRTC 13.2 carries an ISA version a
//! CUDA 13.0 driver rejects). For an architecture this NVRTC does not know (a GPU newer than
//! it) the target is `compute_XX` of the newest one it knows below, and the driver JIT-compiles
//! that PTX. The PTX is kept either way: the compile test reads its `.entry` signatures.
//!
//! Options: no fast math (`--fmad=false`, `--ftz=false`, IEEE division and square root), so that
//! the kernels reproduce the CPU backend's `f32` arithmetic (see `cu/common.cuh`); `-std=c++17`;
//! `-lineinfo` (profilers and compute-sanitizer map back to the sources).
//!
//! The cache: one file per source under [`cache_dir`], keyed by a 128-bit hash of the prelude,
//! the source, the options, the target and NVRTC's version; written to a temporary file and
//! renamed into place (concurrent processes never see half a file); read back only when its
//! magic, length and checksum hold: a corrupt or unreadable entry is compiled again and
//! rewritten, never an error. A cache that cannot be written is skipped.

use super::libs::{self, Lib};
use super::CudaError;
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

/// One kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// Its file name under `runtime/cuda/src/cu/` (`elementwise.cu`).
    pub name: &'static str,
    /// Its text.
    pub code: &'static str,
}

/// The prelude every source is compiled behind (`cu/common.cuh`).
pub const PRELUDE: &str = include_str!("cu/common.cuh");

/// Every kernel source, one NVRTC program (and one loaded module) each.
pub const SOURCES: &[Source] = &[
    Source {
        name: "elementwise.cu",
        code: include_str!("cu/elementwise.cu"),
    },
    Source {
        name: "norm.cu",
        code: include_str!("cu/norm.cu"),
    },
    Source {
        name: "layout.cu",
        code: include_str!("cu/layout.cu"),
    },
    Source {
        name: "embedding.cu",
        code: include_str!("cu/embedding.cu"),
    },
    Source {
        name: "cross_entropy.cu",
        code: include_str!("cu/cross_entropy.cu"),
    },
    Source {
        name: "reduce.cu",
        code: include_str!("cu/reduce.cu"),
    },
    Source {
        name: "optim.cu",
        code: include_str!("cu/optim.cu"),
    },
    Source {
        name: "attention.cu",
        code: include_str!("cu/attention.cu"),
    },
];

/// Bumped whenever the cache file format or what goes into a key changes.
const CACHE_FORMAT: u32 = 1;
const MAGIC: &[u8; 4] = b"FTKC";

/// One compiled source.
#[derive(Clone, Debug)]
pub struct Module {
    /// The source's file name.
    pub source: &'static str,
    /// The PTX (always present).
    pub ptx: String,
    /// The cubin, when the target is a real architecture (`sm_XX`).
    pub cubin: Option<Vec<u8>>,
    /// NVRTC's log (warnings); empty when the module came from the cache.
    pub log: String,
    /// Whether the module was read from the cache.
    pub cached: bool,
}

/// Every source compiled for one device.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The device's architecture as asked for (`sm_90`).
    pub arch: String,
    /// What NVRTC compiled for: the architecture itself, or `compute_XX` (PTX only) for a
    /// device newer than this NVRTC.
    pub target: String,
    /// NVRTC's version, `(major, minor)`: it is part of the cache key.
    pub nvrtc_version: (i32, i32),
    /// One module per entry of [`SOURCES`], in order.
    pub modules: Vec<Module>,
}

impl Compiled {
    /// The module of `source`.
    pub fn module(&self, source: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.source == source)
    }
}

/// The source as NVRTC receives it: the prelude, then the file, each with its own line numbers.
pub fn full_source(src: &Source) -> String {
    format!(
        "#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{}\"\n{}",
        src.name, src.code
    )
}

/// NVRTC's options for `target` (`sm_90` or `compute_90`).
pub fn options(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "-std=c++17".into(),
        // No contraction into FMAs, no flush-to-zero, IEEE division and square root: the
        // kernels round as the CPU backend does.
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "-lineinfo".into(),
    ]
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    libs::require(&[Lib::Nvrtc])?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: libnvrtc is present (checked above); the call writes two ints we own.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Unavailable(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// The architectures this NVRTC compiles for (`[75, 80, 86, ..]`).
pub fn supported_archs() -> Result<Vec<u32>, CudaError> {
    libs::require(&[Lib::Nvrtc])?;
    let fail = |e| CudaError::Unavailable(format!("nvrtcGetSupportedArchs failed: {e:?}"));
    let mut n: c_int = 0;
    // SAFETY: libnvrtc is present; the call writes one int.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(fail)?;
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    // SAFETY: `archs` has room for the `n` ints NVRTC said it would write.
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(fail)?;
    Ok(archs.into_iter().map(|a| a.max(0) as u32).collect())
}

/// `sm_90` → 90 (`sm_90a` → 90).
fn arch_number(arch: &str) -> Option<u32> {
    let digits: String = arch
        .strip_prefix("sm_")?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// What to compile for `arch` with an NVRTC that supports `supported`: the architecture itself
/// when supported (cubin + PTX), else PTX for the newest supported one below it.
pub fn target_for(arch: &str, supported: &[u32]) -> Result<String, CudaError> {
    let n = arch_number(arch).ok_or_else(|| {
        CudaError::Unavailable(format!("`{arch}` is not an architecture name like sm_90"))
    })?;
    if supported.contains(&n) {
        return Ok(arch.to_string());
    }
    match supported.iter().copied().filter(|&s| s < n).max() {
        Some(s) => Ok(format!("compute_{s}")),
        None => Err(CudaError::Unavailable(format!(
            "this NVRTC cannot compile for {arch} (it supports sm_{}); install an NVRTC for \
             your GPU (CUDA 12 for GPUs older than sm_75)",
            supported
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", sm_")
        ))),
    }
}

/// Every source compiled for `arch` (`sm_90`), from the cache in [`cache_dir`] where it holds
/// them.
pub fn compile(arch: &str) -> Result<Compiled, CudaError> {
    compile_with_cache(arch, cache_dir().as_deref())
}

/// [`compile`] with the cache in `cache` (`None`: no cache).
pub fn compile_with_cache(arch: &str, cache: Option<&Path>) -> Result<Compiled, CudaError> {
    libs::require(&[Lib::Nvrtc])?;
    let nvrtc_version = version()?;
    let target = target_for(arch, &supported_archs()?)?;
    // The sources compile in parallel (NVRTC programs are independent and thread-safe).
    let results: Vec<Result<Module, CudaError>> = std::thread::scope(|s| {
        let handles: Vec<_> = SOURCES
            .iter()
            .map(|src| {
                let target = &target;
                s.spawn(move || cached_or_compiled(src, target, nvrtc_version, cache))
            })
            .collect();
        handles
            .into_iter()
            .zip(SOURCES)
            .map(|(h, src)| {
                h.join().unwrap_or_else(|_| {
                    Err(CudaError::Compile {
                        source_name: src.name.into(),
                        arch: arch.into(),
                        log: "the compiling thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    Ok(Compiled {
        arch: arch.to_string(),
        target,
        nvrtc_version,
        modules: results.into_iter().collect::<Result<_, _>>()?,
    })
}

fn cached_or_compiled(
    src: &Source,
    target: &str,
    version: (i32, i32),
    cache: Option<&Path>,
) -> Result<Module, CudaError> {
    let path = cache.map(|dir| cache_path(dir, src, target, version));
    if let Some(m) = path.as_deref().and_then(|p| read_cache(p, src.name)) {
        return Ok(m);
    }
    let m = compile_source(src, target)?;
    if let Some(p) = &path {
        // Best effort: a read-only or full disk only costs the next start a compile.
        let _ = write_cache(p, &m);
    }
    Ok(m)
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed only here.
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

/// The bytes NVRTC wrote into a buffer, up to its terminating NUL.
fn until_nul(buf: &[c_char]) -> Vec<u8> {
    buf.iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect()
}

/// Compiles one source for `target` (no cache). A compile error (or a PTX that cannot be
/// retrieved) is [`CudaError::Compile`] with NVRTC's log.
pub fn compile_source(src: &Source, target: &str) -> Result<Module, CudaError> {
    libs::require(&[Lib::Nvrtc])?;
    let fail = |log: String| CudaError::Compile {
        source_name: src.name.to_string(),
        arch: target.to_string(),
        log,
    };
    let code = CString::new(full_source(src))
        .map_err(|_| fail("the source contains a NUL byte".into()))?;
    let name = CString::new(src.name).map_err(|_| fail("the name contains a NUL byte".into()))?;
    let prog = Program(
        nvrtc_result::create_program(&code, Some(&name))
            .map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?,
    );
    let opts = options(target);
    // SAFETY: `prog` is a live program; the options are valid C strings for the call.
    let compiled = unsafe { nvrtc_result::compile_program(prog.0, &opts) };
    // SAFETY: `prog` is a live program (the log exists after a failed compile too).
    let log = unsafe { nvrtc_result::get_program_log(prog.0) }
        .map(|l| String::from_utf8_lossy(&until_nul(&l)).trim().to_string())
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(format!("{e:?} (options {opts:?})\n{log}")));
    }
    // SAFETY: `prog` compiled successfully, so its PTX exists.
    let ptx = unsafe { nvrtc_result::get_ptx(prog.0) }
        .map_err(|e| fail(format!("nvrtcGetPTX: {e:?}\n{log}")))?;
    let ptx =
        String::from_utf8(until_nul(&ptx)).map_err(|_| fail("the PTX is not UTF-8".into()))?;
    let cubin = if target.starts_with("sm_") {
        let mut size = 0usize;
        // SAFETY: `prog` compiled for a real architecture; the call writes one usize.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}")))?;
        let mut bin = vec![0u8; size];
        // SAFETY: `bin` has the `size` bytes NVRTC said the cubin takes.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, bin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))?;
        (size > 0).then_some(bin)
    } else {
        None
    };
    Ok(Module {
        source: src.name,
        ptx,
        cubin,
        log,
        cached: false,
    })
}

// ---------------------------------------------------------------------------------------------
// The cache

/// The cache directory: `$FERROTRON_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrotron`, else
/// `~/.cache/ferrotron`; kernels go to its `kernels/` subdirectory. `None` without any of them.
pub fn cache_dir() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let root = non_empty("FERROTRON_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ferrotron")))
        .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache").join("ferrotron")))?;
    Some(root.join("kernels"))
}

/// 128-bit FNV-1a: stable across Rust versions and platforms (std's hasher is not promised to
/// be), and ample for a cache key.
fn fnv128(parts: &[&[u8]]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for part in parts {
        // The length first, so that the parts' boundaries are part of the key.
        for &b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// The cache file of `src` for `target` under NVRTC `version`: its name holds the key.
pub fn cache_file_name(src: &Source, target: &str, version: (i32, i32)) -> String {
    let opts = options(target).join("\u{1f}");
    let ver = format!("{CACHE_FORMAT}/{}.{}", version.0, version.1);
    let key = fnv128(&[
        ver.as_bytes(),
        target.as_bytes(),
        opts.as_bytes(),
        src.name.as_bytes(),
        PRELUDE.as_bytes(),
        src.code.as_bytes(),
    ]);
    let stem = src.name.trim_end_matches(".cu");
    format!("{stem}-{target}-{key:032x}.bin")
}

/// Where the cache in `dir` keeps `src` compiled for `target` by NVRTC `version`.
pub fn cache_path(dir: &Path, src: &Source, target: &str, version: (i32, i32)) -> PathBuf {
    dir.join(cache_file_name(src, target, version))
}

/// `MAGIC, format, ptx len, ptx, cubin len, cubin, fnv128(everything before)`.
fn encode(m: &Module) -> Vec<u8> {
    let cubin = m.cubin.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(m.ptx.len() + cubin.len() + 40);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&CACHE_FORMAT.to_le_bytes());
    out.extend_from_slice(&(m.ptx.len() as u64).to_le_bytes());
    out.extend_from_slice(m.ptx.as_bytes());
    out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(cubin);
    let sum = fnv128(&[&out]);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn decode(bytes: &[u8], source: &'static str) -> Option<Module> {
    let (body, sum) = bytes.split_at(bytes.len().checked_sub(16)?);
    if fnv128(&[body]).to_le_bytes() != sum {
        return None;
    }
    let (magic, rest) = body.split_at_checked(4)?;
    let (format, rest) = rest.split_at_checked(4)?;
    if magic != MAGIC || format != CACHE_FORMAT.to_le_bytes() {
        return None;
    }
    let take = |rest: &[u8]| -> Option<(Vec<u8>, usize)> {
        let (len, tail) = rest.split_at_checked(8)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
        Some((tail.get(..len)?.to_vec(), 8 + len))
    };
    let (ptx, used) = take(rest)?;
    let (cubin, used2) = take(&rest[used..])?;
    if used + used2 != rest.len() {
        return None;
    }
    Some(Module {
        source,
        ptx: String::from_utf8(ptx).ok()?,
        cubin: (!cubin.is_empty()).then_some(cubin),
        log: String::new(),
        cached: true,
    })
}

/// The cached module at `path`, or `None` when it is absent, unreadable or corrupt.
pub fn read_cache(path: &Path, source: &'static str) -> Option<Module> {
    decode(&std::fs::read(path).ok()?, source)
}

fn write_cache(path: &Path, m: &Module) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
    std::fs::write(&tmp, encode(m))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_what_nvrtc_supports() {
        let s = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(target_for("sm_90", &s).unwrap(), "sm_90");
        assert_eq!(target_for("sm_87", &s).unwrap(), "compute_86");
        assert_eq!(target_for("sm_130", &s).unwrap(), "compute_120");
        assert!(matches!(
            target_for("sm_70", &s),
            Err(CudaError::Unavailable(_))
        ));
        assert!(target_for("gfx90a", &s).is_err());
    }

    #[test]
    fn cache_files_round_trip_and_reject_damage() {
        let m = Module {
            source: "x.cu",
            ptx: ".version 9.0\n.entry k()".into(),
            cubin: Some(vec![1, 2, 3, 0, 255]),
            log: "warning".into(),
            cached: false,
        };
        let bytes = encode(&m);
        let back = decode(&bytes, "x.cu").unwrap();
        assert_eq!(
            (back.ptx.as_str(), back.cubin.as_deref()),
            (m.ptx.as_str(), m.cubin.as_deref())
        );
        assert!(back.cached && back.log.is_empty());
        for i in [0, 5, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad, "x.cu").is_none(), "byte {i} flipped");
        }
        assert!(decode(&bytes[..bytes.len() - 3], "x.cu").is_none());
        assert!(decode(&[], "x.cu").is_none());
        let no_cubin = Module { cubin: None, ..m };
        assert!(decode(&encode(&no_cubin), "x.cu").unwrap().cubin.is_none());
    }

    #[test]
    fn cache_keys_change_with_what_goes_in() {
        let a = Source {
            name: "a.cu",
            code: "x",
        };
        let b = Source {
            name: "a.cu",
            code: "y",
        };
        let k = |s: &Source, t: &str, v| cache_file_name(s, t, v);
        assert_ne!(k(&a, "sm_90", (13, 2)), k(&b, "sm_90", (13, 2)));
        assert_ne!(k(&a, "sm_90", (13, 2)), k(&a, "sm_80", (13, 2)));
        assert_ne!(k(&a, "sm_90", (13, 2)), k(&a, "sm_90", (13, 0)));
        assert_eq!(k(&a, "sm_90", (13, 2)), k(&a, "sm_90", (13, 2)));
        assert!(k(&a, "sm_90", (13, 2)).starts_with("a-sm_90-"));
    }
}
