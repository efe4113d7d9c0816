//! Benchmark: single-precision GEMM through the CPU kernels, to race OpenBLAS (numpy).
//!
//! `cargo bench -p ferrotron-cpu --bench matmul` prints GFLOP/s (best of several runs) for
//! square 1024³ and 2048³ products on 1 and 2 threads, two ways: `kernels::eval` of a `MatMul`
//! node (what the executor runs: output allocation included) and a raw `gemm::gemm` call into a
//! preallocated buffer (the library's ceiling). A GPT-2-small-shaped product (tokens × hidden ·
//! hidden × 4·hidden) is shown too. `benches/sgemm_numpy.sh` prints numpy's numbers for the same
//! sizes.
//!
//! Options (after `--`): `--quick` (one size, fewer runs: a smoke test).

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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let shapes: Vec<(usize, usize, usize)> = if quick {
        vec![(1024, 1024, 1024)]
    } else {
        vec![(1024, 1024, 1024), (2048, 2048, 2048), (8192, 3072, 768)]
    };
    println!(
        "sgemm, GFLOP/s (best of the runs; {} cores here)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
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
}
