//! Benchmark: single-precision GEMM through the CPU kernels, to race OpenBLAS (numpy).
//!
//! `cargo bench -p ferrotron-cpu --bench matmul` prints GFLOP/s (best of several runs) for
//! square 1024³ and 2048³ products on 1 and 2 threads, two ways: `kernels::eval` of a `MatMul`
//! node (what the executor runs: output allocation included) and a raw `gemm::gemm` call into a
//! preallocated buffer (the library's ceiling). A GPT-2-small-shaped product (tokens × hidden ·
//! hidden × 4·hidden) is shown too. Then every product GPT-2 small's training step multiplies
//! (batch 4 × 128 tokens at tp = 1: the layer's forward GEMMs and their two gradients each, with
//! the transposes the step uses; the per-head attention products, batched over batch × heads;
//! the tied 50,257-wide output layer and its gradients), through `eval`.
//! `benches/sgemm_numpy.sh` prints numpy's numbers for the same sizes and products.
//!
//! Options (after `--`): `--quick` (one size, fewer runs: a smoke test); `--only TEXT` (only
//! GPT-2's products whose name contains TEXT, no square sizes). Built with
//! `--no-default-features`, gemm runs its AVX2 kernels even on an AVX-512 processor
//! (`benches/sgemm_numpy.sh --avx2` holds OpenBLAS to its AVX2 kernels likewise).

use ferrotron_cpu::kernels::eval;
use ferrotron_exec::{Placement, Tensor};
use ferrotron_ir::op::Op;
use std::time::Instant;

fn random(rng: &mut u64, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            // xorshift64: fast, deterministic, good enough for benchmark inputs.
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

/// The best wall time of `runs` calls of `f`, in seconds (after one warm-up call).
fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn raw_gemm(
    a: &Tensor,
    b: &Tensor,
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && c.len() >= m * n);
    // SAFETY: row-major operands of the asserted sizes; `c` does not alias them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            1,
            k as isize,
            b.data.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// One product of GPT-2 small's training step: `batch` independent `m × k · k × n` products,
/// `a` stored as `[k, m]` when `ta`, `b` as `[n, k]` when `tb`.
struct Product {
    name: &'static str,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
}

/// GPT-2 small's step at batch 4 × 128 (512 tokens), tp = 1: a linear layer `y = x·W`
/// (`x` `[512, i]`, `W` `[i, o]`) multiplies `x·W` forward, `dy·Wᵀ` and `xᵀ·dy` backward.
fn gpt2_products() -> Vec<Product> {
    let t = 512;
    let p = |name, batch, (m, n, k), ta, tb| Product {
        name,
        batch,
        m,
        n,
        k,
        ta,
        tb,
    };
    let mut out = Vec::new();
    for (name, i, o) in [
        ("c_attn", 768, 2304),
        ("attn c_proj", 768, 768),
        ("c_fc", 768, 3072),
        ("mlp c_proj", 3072, 768),
    ] {
        out.push(p(name, 1, (t, o, i), false, false));
        out.push(p(name, 1, (t, i, o), false, true));
        out.push(p(name, 1, (i, o, t), true, false));
    }
    // Attention, 4 × 12 heads of 128 × 64: scores q·kᵀ, context p·v, and their gradients.
    out.push(p("scores q·kᵀ", 48, (128, 128, 64), false, true));
    out.push(p("context p·v", 48, (128, 64, 128), false, false));
    out.push(p("d p = dctx·vᵀ", 48, (128, 128, 64), false, true));
    out.push(p("d v = pᵀ·dctx", 48, (128, 64, 128), true, false));
    out.push(p("d q = ds·k", 48, (128, 64, 128), false, false));
    out.push(p("d k = dsᵀ·q", 48, (128, 64, 128), true, false));
    // The tied output layer: logits = h·wteᵀ, d h = dlogits·wte, d wte = dlogitsᵀ·h.
    out.push(p("logits h·wteᵀ", 1, (t, 50257, 768), false, true));
    out.push(p("d h = dlogits·wte", 1, (t, 768, 50257), false, false));
    out.push(p("d wte = dlogitsᵀ·h", 1, (50257, 768, t), true, false));
    // The same a chunk of rows at a time, as the fused output layer and loss multiplies them.
    for c in [128, 256] {
        out.push(p("chunk h·wteᵀ", 1, (c, 50257, 768), false, true));
        out.push(p("chunk dlogits·wte", 1, (c, 768, 50257), false, false));
        out.push(p("chunk dlogitsᵀ·h", 1, (50257, 768, c), true, false));
    }
    out
}

fn gpt2_step(rng: &mut u64, only: Option<&str>) {
    println!("\nGPT-2 small's training step (batch 4 × 128, tp = 1), eval MatMul, GFLOP/s");
    println!(
        "{:>22} {:>20} {:>5} {:>8} {:>8}",
        "product", "batch × m × n × k", "a b", "1 thread", "2 threads"
    );
    for p in gpt2_products()
        .into_iter()
        .filter(|p| only.is_none_or(|o| p.name.contains(o)))
    {
        let shape = |batch: usize, rows: usize, cols: usize| match batch {
            1 => vec![rows, cols],
            b => vec![b, rows, cols],
        };
        let a = match p.ta {
            true => random(rng, &shape(p.batch, p.k, p.m)),
            false => random(rng, &shape(p.batch, p.m, p.k)),
        };
        let b = match p.tb {
            true => random(rng, &shape(p.batch, p.n, p.k)),
            false => random(rng, &shape(p.batch, p.k, p.n)),
        };
        let flops = 2.0 * (p.batch * p.m * p.n * p.k) as f64;
        let op = Op::MatMul {
            a: &a,
            b: &b,
            transpose_a: p.ta,
            transpose_b: p.tb,
        };
        let rates: Vec<f64> = [1, 2]
            .into_iter()
            .map(|threads| {
                let t = best(6, || {
                    let out = eval(&op, &Placement::default(), threads).expect("matmul");
                    std::hint::black_box(out);
                });
                flops / t / 1e9
            })
            .collect();
        let flags = format!(
            "{}{}",
            if p.ta { "T" } else { "N" },
            if p.tb { "T" } else { "N" }
        );
        println!(
            "{:>22} {:>20} {:>5} {:>8.1} {:>8.1}",
            p.name,
            format!("{}×{}×{}×{}", p.batch, p.m, p.n, p.k),
            flags,
            rates[0],
            rates[1]
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let shapes: Vec<(usize, usize, usize)> = if quick {
        vec![(1024, 1024, 1024)]
    } else if only.is_some() {
        Vec::new()
    } else {
        vec![(1024, 1024, 1024), (2048, 2048, 2048), (8192, 3072, 768)]
    };
    println!(
        "sgemm, GFLOP/s (best of the runs; {} cores here; gemm's {} kernels)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if cfg!(feature = "avx512") {
            "AVX-512 (where the CPU has it)"
        } else {
            "AVX2"
        }
    );
    println!(
        "{:>18} {:>8} {:>12} {:>12}",
        "m × n × k", "threads", "eval MatMul", "raw gemm"
    );
    for (m, n, k) in shapes {
        let a = random(&mut rng, &[m, k]);
        let b = random(&mut rng, &[k, n]);
        let flops = 2.0 * (m * n * k) as f64;
        let runs = match (quick, flops > 3e10) {
            (true, _) => 2,
            (false, true) => 4,
            (false, false) => 8,
        };
        for threads in [1, 2] {
            let at = Placement::default();
            let op = Op::MatMul {
                a: &a,
                b: &b,
                transpose_a: false,
                transpose_b: false,
            };
            let t_eval = best(runs, || {
                let out = eval(&op, &at, threads).expect("matmul");
                std::hint::black_box(out);
            });
            let mut c = vec![0f32; m * n];
            let t_raw = best(runs, || {
                raw_gemm(&a, &b, &mut c, (m, n, k), threads);
                std::hint::black_box(&mut c);
            });
            println!(
                "{:>18} {:>8} {:>12.1} {:>12.1}",
                format!("{m}×{n}×{k}"),
                threads,
                flops / t_eval / 1e9,
                flops / t_raw / 1e9
            );
        }
    }
    if !quick {
        gpt2_step(&mut rng, only);
    }
}
