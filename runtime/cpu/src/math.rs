//! Scalar math written to vectorize: a branch-free `exp`, the logistic-based activations in
//! `f32`, and `f64` reductions over `f32` slices kept in independent lanes (a strict sequential
//! `f64` sum cannot be vectorized; eight lanes can, and are as accurate).

/// `e^x` in `f32` to about 1 ulp (Cephes' `expf`: `2^n · p(r)` with `r = x − n·ln 2` in
/// `[−ln2/2, ln2/2]`), without branches or calls so that loops over it vectorize. Saturates at
/// `e^88` above 88, is 0 below −87 (where `e^x` is under `1.7e-38`), and keeps NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // ln 2 split so that n·C1 is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // n is in [−126, 127]: a normal power of two. It is read off t's low mantissa bits (t is
    // ROUND + n), which vectorizes where `n as i32` (a saturating conversion) does not.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else {
        p * scale
    }
}

/// `e^x` in `f64` to about 1 ulp (Cephes' `exp`: `2^n · (1 + 2·P/(Q − P))` with a rational
/// approximation on `[−ln2/2, ln2/2]`), branch-free like [`exp`]. 0 below −708, saturates above
/// 709, keeps NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients as published
pub(crate) fn exp64(x: f64) -> f64 {
    const LO: f64 = -708.0;
    const HI: f64 = 709.0;
    const C1: f64 = 6.931_457_519_531_25e-1;
    const C2: f64 = 1.428_606_820_309_417_232_1e-6;
    // 1.5·2^52: adding and subtracting it rounds to the nearest integer.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f64::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let rr = r * r;
    let p = r * ((1.261_771_930_748_105_908_8e-4 * rr + 3.029_944_077_074_419_613e-2) * rr + 1.0);
    let q = ((3.001_985_051_386_644_550_4e-6 * rr + 2.524_483_403_496_841_041_9e-3) * rr
        + 2.272_655_482_081_550_287_7e-1)
        * rr
        + 2.0;
    let e = 1.0 + 2.0 * (p / (q - p));
    // n is in [−1022, 1023]: a normal power of two, read off t's low mantissa bits.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f64::from_bits(n_int.wrapping_add(1023) << 52);
    if x < LO {
        0.0
    } else {
        e * scale
    }
}

/// The standard normal CDF `Φ(x)` with relative error below 2e-7 everywhere, left tail
/// included: `erfc(z) = t·e^(−z² + P(t))`, `t = 1/(1 + z/2)` (Numerical Recipes' Chebyshev
/// fit, fractional error under 1.2e-7), evaluated in `f64` without branches.
#[inline(always)]
pub(crate) fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() * std::f64::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let half_erfc = 0.5 * t * exp64(-z * z + poly);
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// Exact GeLU, `x·Φ(x)` (BERT's), in `f64`.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * normal_cdf(x)) as f32
}

/// Exact GeLU's derivative, `Φ(x) + x·φ(x)`.
#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f64 {
    let x = x as f64;
    let pdf = exp64(-0.5 * x * x) * 0.398_942_280_401_432_7;
    normal_cdf(x) + x * pdf
}

/// `(σ(z), σ(−z))`, each to full relative accuracy (no `1 − σ` cancellation).
#[inline(always)]
pub(crate) fn sigmoid_pair(z: f32) -> (f32, f32) {
    let e = exp(-z.abs());
    let a = 1.0 / (1.0 + e);
    let b = e * a;
    if z >= 0.0 {
        (a, b)
    } else {
        (b, a)
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_C: f32 = 0.044_715;

/// GPT-2's GeLU, `0.5·x·(1 + tanh u)` with `u = √(2/π)(x + 0.044715x³)`, computed as
/// `x·σ(2u)` (the same function, without tanh's cancellation for negative `x`).
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    let u2 = 2.0 * SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x);
    x * sigmoid_pair(u2).0
}

/// The derivative of [`gelu_tanh`]: with `s = σ(2u)`, `0.5(1 + tanh u) = s` and
/// `1 − tanh² u = 4s(1 − s)`.
#[inline(always)]
pub(crate) fn gelu_tanh_grad(x: f32) -> f32 {
    let u2 = 2.0 * SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x);
    let (s, s_neg) = sigmoid_pair(u2);
    s + 2.0 * x * s * s_neg * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x)
}

/// `x·σ(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid_pair(x).0
}

/// The derivative of [`silu`]: `σ(x)·(1 + x·σ(−x))`.
#[inline(always)]
pub(crate) fn silu_grad(x: f32) -> f32 {
    let (s, s_neg) = sigmoid_pair(x);
    s * (1.0 + x * s_neg)
}

/// `f32::max(x, 0)` (a NaN gives 0).
#[inline(always)]
pub(crate) fn relu(x: f32) -> f32 {
    x.max(0.0)
}

// Each activation's vector-Jacobian product `dy · act'(x)`, as `ActGrad` and the fused
// `BiasActGrad` compute it.

/// Exact GeLU's: the product in `f64`.
#[inline(always)]
pub(crate) fn gelu_vjp(x: f32, dy: f32) -> f32 {
    (dy as f64 * gelu_grad(x)) as f32
}

/// GPT-2 GeLU's.
#[inline(always)]
pub(crate) fn gelu_tanh_vjp(x: f32, dy: f32) -> f32 {
    dy * gelu_tanh_grad(x)
}

/// SiLU's vector-Jacobian product, `dy · silu'(x)`.
#[inline(always)]
pub(crate) fn silu_vjp(x: f32, dy: f32) -> f32 {
    dy * silu_grad(x)
}

/// ReLU's: `dy` where `x > 0`, else `dy · 0` (a NaN or infinite `dy` stays NaN).
#[inline(always)]
pub(crate) fn relu_vjp(x: f32, dy: f32) -> f32 {
    if x > 0.0 {
        dy
    } else {
        dy * 0.0
    }
}

const LANES: usize = 8;

/// `Σ f(x)` in `f64`, over eight independent lanes.
#[inline(always)]
pub(crate) fn sum_map(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ f(a, b)` in `f64` over two equally long slices, over eight independent lanes.
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ e^(x − max)` over `xs` in `f64`. The exponentials go through a stack buffer: a loop that
/// only maps vectorizes, one that maps and accumulates lanes does not.
#[inline(always)]
pub(crate) fn sum_exp_shifted(xs: &[f32], max: f32) -> f64 {
    const BLOCK: usize = 256;
    let mut buf = [0f32; BLOCK];
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let b = &mut buf[..block.len()];
        for (o, &x) in b.iter_mut().zip(block) {
            *o = exp(x - max);
        }
        total += sum_map(b, |v| v as f64);
    }
    total
}

/// `Σ xs` over `f64` values, over eight independent lanes.
#[inline(always)]
pub(crate) fn sum_f64(xs: &[f64]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().sum::<f64>()
}

/// `Σ a·b` over `f64` values, over eight independent lanes.
#[inline(always)]
pub(crate) fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `out[i] = e^(x[i] − max)`, returning `Σ out` in `f64`.
#[inline(always)]
pub(crate) fn exp_shifted(out: &mut [f32], xs: &[f32], max: f32) -> f64 {
    for (o, &v) in out.iter_mut().zip(xs) {
        *o = exp(v - max);
    }
    sum_map(&out[..xs.len().min(out.len())], |v| v as f64)
}

/// SplitMix64's first output for seed `i` (as `ferrotron_ir::reference::splitmix64`, inlined).
#[inline(always)]
pub(crate) fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `out[j] = src[j]·scale` where `splitmix64(start + j) >= threshold`, else 0. The mask is
/// drawn a block at a time into a buffer of its own, a loop of 64-bit integer arithmetic only,
/// so that it vectorizes (AVX-512 has 64-bit multiplies).
#[inline(always)]
pub(crate) fn dropout_row(out: &mut [f32], src: &[f32], start: u64, threshold: u64, scale: f32) {
    const BLOCK: usize = 64;
    let mut keep = [0u64; BLOCK];
    for (k, (o, src)) in out.chunks_mut(BLOCK).zip(src.chunks(BLOCK)).enumerate() {
        let base = start.wrapping_add((k * BLOCK) as u64);
        for (j, kp) in keep.iter_mut().enumerate() {
            *kp = (splitmix64(base.wrapping_add(j as u64)) >= threshold) as u64;
        }
        for ((o, &v), &kp) in o.iter_mut().zip(src).zip(&keep) {
            *o = if kp != 0 { v * scale } else { 0.0 };
        }
    }
}

/// `out = residual + dropout(x + bias)` for one row, with [`dropout_row`]'s mask (the row's
/// first counter `start`): the sum, the dropout and the residual sum each rounded as the three
/// ops store them, so the result is theirs to the bit. Inlined into its caller's vector
/// extension ([`crate::par::simd`]), as [`dropout_row`] is.
#[inline(always)]
pub(crate) fn bias_dropout_add_row(
    out: &mut [f32],
    (x, bias, residual): (&[f32], &[f32], &[f32]),
    start: u64,
    threshold: u64,
    scale: f32,
) {
    const BLOCK: usize = 64;
    let n = out.len();
    let (x, bias, residual) = (&x[..n], &bias[..n], &residual[..n]);
    for ((o, &x), &b) in out.iter_mut().zip(x).zip(bias) {
        *o = x + b;
    }
    let mut keep = [0u64; BLOCK];
    for (k, (o, r)) in out
        .chunks_mut(BLOCK)
        .zip(residual.chunks(BLOCK))
        .enumerate()
    {
        let base = start.wrapping_add((k * BLOCK) as u64);
        for (j, kp) in keep.iter_mut().enumerate() {
            *kp = (splitmix64(base.wrapping_add(j as u64)) >= threshold) as u64;
        }
        for ((o, &r), &kp) in o.iter_mut().zip(r).zip(&keep) {
            let dropped = if kp != 0 { *o * scale } else { 0.0 };
            *o = r + dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_total() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "{worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::INFINITY).is_finite());
    }

    #[test]
    fn exp64_is_accurate_and_total() {
        let mut worst = 0f64;
        let mut x = -707.0f64;
        while x <= 708.0 {
            let want = x.exp();
            worst = worst.max((exp64(x) - want).abs() / want);
            x += 0.013_7;
        }
        assert!(worst < 5e-16, "{worst:e}");
        assert_eq!(exp64(0.0), 1.0);
        assert_eq!(exp64(-1000.0), 0.0);
        assert!(exp64(f64::NAN).is_nan());
    }

    #[test]
    fn normal_cdf_keeps_relative_accuracy() {
        let mut worst = 0f64;
        let mut x = -37.0f64;
        while x <= 9.0 {
            let want = 0.5 * ferrotron_ir::reference::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
            worst = worst.max((normal_cdf(x) - want).abs() / want);
            x += 0.003_1;
        }
        assert!(worst < 2e-7, "{worst:e}");
    }

    #[test]
    fn splitmix64_is_the_references() {
        for i in 0..1000 {
            assert_eq!(splitmix64(i), ferrotron_ir::reference::splitmix64(i));
        }
    }
}
