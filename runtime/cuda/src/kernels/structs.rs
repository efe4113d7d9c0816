//! The structs kernels take by value, laid out as their C twins in `cu/*.cu` (`#[repr(C)]`,
//! same field order; the compile test checks each one's size against the PTX parameter).

use cudarc::driver::DeviceRepr;

/// The most axes a strided view may have after merging (`FT_MAX_DIMS` in `cu/common.cuh`).
pub const MAX_DIMS: usize = 8;

/// `Strided2` (elementwise.cu): the output's axes and both operands' strides along them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Strided2 {
    pub rank: i32,
    pub pad: i32,
    pub size: [i64; MAX_DIMS],
    pub sa: [i64; MAX_DIMS],
    pub sb: [i64; MAX_DIMS],
}

/// `DropShape` (elementwise.cu): the local axes and the full tensor's strides along them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropShape {
    pub rank: i32,
    pub pad: i32,
    pub size: [i64; MAX_DIMS],
    pub stride: [i64; MAX_DIMS],
}

/// `Gather` (layout.cu): the output's axes and the input's strides along them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Gather {
    pub rank: i32,
    pub pad: i32,
    pub size: [i64; MAX_DIMS],
    pub stride: [i64; MAX_DIMS],
}

/// `Tile` (layout.cu): a tiled transpose.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Tile {
    pub rank_o: i32,
    pub pad: i32,
    pub size_o: [i64; MAX_DIMS],
    pub src_o: [i64; MAX_DIMS],
    pub dst_o: [i64; MAX_DIMS],
    pub n_other: i64,
    pub na: i64,
    pub nb: i64,
    pub sa_dst: i64,
    pub sb_src: i64,
}

/// `SumToShape` (layout.cu): kept and reduced axes of a `SumTo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SumToShape {
    pub rank_k: i32,
    pub rank_r: i32,
    pub inner_reduced: i32,
    pub pad: i32,
    pub size_k: [i64; MAX_DIMS],
    pub stride_k: [i64; MAX_DIMS],
    pub size_r: [i64; MAX_DIMS],
    pub stride_r: [i64; MAX_DIMS],
    pub out_n: i64,
    pub red_n: i64,
    pub chunk: i64,
}

/// `AttnShape` (attention.cu): one fused attention's sizes, layout, scale, causality and dropout
/// mask (`drop`, `first`, `threshold`: the probabilities' [`DropShape`] and counters; `dropout` 0
/// when there is none, `scale` then 1). `heads`: the heads interleaved with the sequence (its
/// operands `[..., seq, heads, width]`), 1 when heads first; batch entry `b` is head
/// `b % heads` of outer entry `b / heads`, its row `i` of a `w`-wide operand at
/// `((outer · rows + i) · heads + head) · w`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnShape {
    pub batch: i64,
    pub queries: i64,
    pub keys: i64,
    pub d: i64,
    pub dv: i64,
    pub heads: i64,
    pub factor: f64,
    pub first: u64,
    pub threshold: u64,
    pub scale: f32,
    pub causal: i32,
    pub dropout: i32,
    pub pad: i32,
    pub drop: DropShape,
}

/// The most buffers one `reduce_n` launch combines (`FT_MAX_INPUTS` in reduce.cu).
pub const MAX_INPUTS: usize = 16;

/// `Inputs` (reduce.cu): device addresses of the buffers to combine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs {
    pub p: [u64; MAX_INPUTS],
}

/// `AdamW` (optim.cu): one step's constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub one_minus_beta1: f64,
    pub beta2: f64,
    pub one_minus_beta2: f64,
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub decay: f64,
    pub grad_scale: f64,
}

// SAFETY: plain `#[repr(C)]` structs of integers and floats, with no padding the C side does
// not have (every field is naturally aligned in both layouts), valid for any bit pattern.
unsafe impl DeviceRepr for Strided2 {}
// SAFETY: as above.
unsafe impl DeviceRepr for DropShape {}
// SAFETY: as above.
unsafe impl DeviceRepr for Gather {}
// SAFETY: as above.
unsafe impl DeviceRepr for Tile {}
// SAFETY: as above.
unsafe impl DeviceRepr for SumToShape {}
// SAFETY: as above.
unsafe impl DeviceRepr for Inputs {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamWParams {}
// SAFETY: as above (`DropShape` is one of them, 8-byte aligned after four 4-byte fields).
unsafe impl DeviceRepr for AttnShape {}
