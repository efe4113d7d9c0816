//! Every kernel the launch code uses: its name, its source file, whether it comes in `_f32` and
//! `_bf16` instantiations, and its parameters' kinds in order.
//!
//! This list is the contract between the Rust launches and the CUDA sources. [`super::Kernels`]
//! loads exactly these functions; every launch goes through `Launch` (`launch.rs`), which
//! refuses (with a [`ferrotron_exec::KernelError::Device`] naming the kernel) an argument
//! whose kind or position differs from the entry; and `runtime/cuda/tests/compile.rs` compiles
//! the sources with NVRTC and checks every entry against the PTX's `.entry` signature (names,
//! parameter count, each parameter's PTX type, and the byte size of struct parameters), without
//! a GPU. A renamed kernel, a parameter added on one side only, or an `int` passed where the
//! kernel takes `long long` is caught by one of the two.

use super::structs::{
    AdamWParams, AttnShape, DropShape, Gather, Inputs, Strided2, SumToShape, Tile,
};
use std::mem::size_of;

/// The kind of one kernel parameter, as the launch passes it and as PTX declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (`T*`): PTX `.u64`.
    Ptr,
    /// `long long` (`i64` in Rust): PTX `.u64`.
    I64,
    /// `unsigned long long` (`u64`): PTX `.u64`.
    U64,
    /// `int` (`i32`): PTX `.u32`.
    I32,
    /// `float` (`f32`): PTX `.f32`.
    F32,
    /// `double` (`f64`): PTX `.f64`.
    F64,
    /// A struct passed by value, of this many bytes: PTX `.align 8 .b8 [size]`.
    Struct(usize),
}

impl Param {
    /// How PTX declares a parameter of this kind: its type (`u64`, `f32`, `b8`) and, for a
    /// struct, its size in bytes.
    pub fn ptx(self) -> (&'static str, Option<usize>) {
        match self {
            Param::Ptr | Param::I64 | Param::U64 => ("u64", None),
            Param::I32 => ("u32", None),
            Param::F32 => ("f32", None),
            Param::F64 => ("f64", None),
            Param::Struct(n) => ("b8", Some(n)),
        }
    }
}

/// One kernel of the sources.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    /// The name (without the storage-type suffix).
    pub name: &'static str,
    /// The source file (an entry of [`crate::nvrtc::SOURCES`]).
    pub source: &'static str,
    /// Whether the kernel is instantiated per storage type (`name_f32`, `name_bf16`).
    pub typed: bool,
    /// The parameters in order.
    pub params: &'static [Param],
}

impl KernelSpec {
    /// The symbols this entry stands for (`gelu_f32`, `gelu_bf16`; or the bare name).
    pub fn symbols(&self) -> Vec<String> {
        if self.typed {
            vec![format!("{}_f32", self.name), format!("{}_bf16", self.name)]
        } else {
            vec![self.name.to_string()]
        }
    }
}

use Param::{Ptr, Struct, F32, F64, I32, I64, U64};

macro_rules! kernels {
    ($($id:ident = $name:literal in $src:literal, $typed:expr, [$($p:expr),* $(,)?];)*) => {
        $(
            #[doc = concat!("`", $name, "` (", $src, ").")]
            pub const $id: KernelSpec = KernelSpec {
                name: $name,
                source: $src,
                typed: $typed,
                params: &[$($p),*],
            };
        )*
        /// Every kernel the launch code uses.
        pub const KERNELS: &[KernelSpec] = &[$($id),*];
    };
}

kernels! {
    UNARY = "unary" in "elementwise.cu", true, [Ptr, Ptr, I64, I32, F64];
    ACT_GRAD = "act_grad" in "elementwise.cu", true, [Ptr, Ptr, Ptr, I64, I32];
    BIAS_ACT = "bias_act" in "elementwise.cu", true, [Ptr, Ptr, Ptr, I64, I64, I32];
    BIAS_ACT_GRAD = "bias_act_grad" in "elementwise.cu", true,
        [Ptr, Ptr, Ptr, Ptr, I64, I64, I32];
    BINARY = "binary" in "elementwise.cu", true, [Ptr, Ptr, Ptr, I64, I64, I64, I32];
    BINARY_STRIDED = "binary_strided" in "elementwise.cu", true,
        [Ptr, Ptr, Ptr, Struct(size_of::<Strided2>()), I64, I32];
    FILL = "fill" in "elementwise.cu", true, [Ptr, I64, F32];
    CAST_F32_BF16 = "cast_f32_bf16" in "elementwise.cu", false, [Ptr, Ptr, I64];
    CAST_BF16_F32 = "cast_bf16_f32" in "elementwise.cu", false, [Ptr, Ptr, I64];
    DROPOUT = "dropout" in "elementwise.cu", true,
        [Ptr, Ptr, Struct(size_of::<DropShape>()), I64, U64, U64, F32];
    BIAS_DROPOUT_ADD = "bias_dropout_add" in "elementwise.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Struct(size_of::<DropShape>()), I64, I64, U64, U64, F32, I32];
    NORM_FWD = "norm_fwd" in "norm.cu", true,
        [Ptr, Ptr, Ptr, Ptr, I64, I64, F64, I32, I32, I32];
    NORM_BWD = "norm_bwd" in "norm.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, I64, I64, F64, I32, I32];
    NORM_PARAM_PARTIAL = "norm_param_partial" in "norm.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, I64, I64, I64, I32];
    SOFTMAX = "softmax" in "norm.cu", true, [Ptr, Ptr, I64, I64, I64, I32, I32, F64];
    SOFTMAX_GRAD = "softmax_grad" in "norm.cu", true, [Ptr, Ptr, Ptr, I64, I64, I32, F64];
    COPY_ROWS = "copy_rows" in "layout.cu", true, [Ptr, Ptr, I64, I64, I64, I64, I64, I64];
    GATHER = "gather" in "layout.cu", true, [Ptr, Ptr, Struct(size_of::<Gather>()), I64];
    TRANSPOSE_TILED = "transpose_tiled" in "layout.cu", true,
        [Ptr, Ptr, Struct(size_of::<Tile>())];
    SUM_TO_PARTIAL = "sum_to_partial" in "layout.cu", true,
        [Ptr, Ptr, Ptr, Struct(size_of::<SumToShape>())];
    SUM_PARTIALS = "sum_partials" in "layout.cu", true, [Ptr, Ptr, I64, I64];
    CHECK_INDICES = "check_indices" in "embedding.cu", false, [Ptr, Ptr, I64, F64, I64, I32];
    EMBEDDING = "embedding" in "embedding.cu", true, [Ptr, Ptr, Ptr, I64, I64, I64, I64];
    EMBEDDING_GRAD_ORDER = "embedding_grad_order" in "embedding.cu", false,
        [Ptr, Ptr, Ptr, Ptr, I64, I64, I64];
    EMBEDDING_GRAD = "embedding_grad" in "embedding.cu", true, [Ptr, Ptr, Ptr, Ptr, I64, I64];
    ROTARY_TABLE = "rotary_table" in "embedding.cu", false,
        [Ptr, I64, I64, I64, I64, F64, F64, F64, F64, F64, F64];
    ROTARY = "rotary" in "embedding.cu", true, [Ptr, Ptr, Ptr, I64, I64, I64, I64];
    CE_ROW_MAX = "ce_row_max" in "cross_entropy.cu", true, [Ptr, Ptr, I64, I64, I64];
    CE_ROW_SUMS = "ce_row_sums" in "cross_entropy.cu", true,
        [Ptr, Ptr, Ptr, Ptr, I64, I64, I64, I64, I64, I64, I32];
    CE_GRAD = "ce_grad" in "cross_entropy.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, I64, I64, I64, I64, I64, I64, I32, F64];
    CE_GRAD_INPLACE = "ce_grad_inplace" in "cross_entropy.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, I64, I64, I64, I64, I64, I64, I32, F64];
    CE_LOSS = "ce_loss" in "cross_entropy.cu", false,
        [Ptr, Ptr, Ptr, I64, I64, I64, I32, F64];
    REDUCE_N = "reduce_n" in "reduce.cu", true,
        [Ptr, Struct(size_of::<Inputs>()), I32, I32, I64];
    FIRST_NON_FINITE = "first_non_finite" in "reduce.cu", true, [Ptr, Ptr, I64];
    SUM_SQUARES = "sum_squares" in "reduce.cu", true, [Ptr, Ptr, I64];
    ADAMW = "adamw" in "optim.cu", true,
        [Ptr, Ptr, Ptr, Ptr, I64, Struct(size_of::<AdamWParams>())];
    SCALE_INPLACE = "scale_inplace" in "optim.cu", true, [Ptr, I64, F64];
    ATTN_FWD = "attn_fwd" in "attention.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, Struct(size_of::<AttnShape>())];
    ATTN_ROW_DOT = "attn_row_dot" in "attention.cu", true,
        [Ptr, Ptr, Ptr, Struct(size_of::<AttnShape>())];
    ATTN_BWD_DQ = "attn_bwd_dq" in "attention.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Struct(size_of::<AttnShape>())];
    ATTN_BWD_DKV = "attn_bwd_dkv" in "attention.cu", true,
        [Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Struct(size_of::<AttnShape>())];
}
