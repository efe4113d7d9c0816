//! Sharding rules against the cases the Megatron paper derives by hand: the MLP's column- then
//! row-parallel GEMMs, attention split by heads (and grouped-query attention), the
//! vocabulary-parallel embedding, output layer and cross-entropy, and the rejections the layout
//! verifier relies on.

use ferrotron_ir::op::{Factor, MeshAxis};
use ferrotron_ir::{DType, Dim, Op, Shape, TensorType};
use ferrotron_partitioner::layout::{conversion, Conversion, Layout};
use ferrotron_partitioner::rules::{output_layouts, reshape_split, RuleError, Sharded};
use Layout::*;

fn t(sizes: &[u64], layout: Layout) -> Sharded {
    Sharded {
        ty: TensorType::new(DType::F32, Shape::from_sizes(sizes)),
        layout,
    }
}

fn ids(sizes: &[u64], layout: Layout) -> Sharded {
    Sharded {
        ty: TensorType::new(DType::I64, Shape::from_sizes(sizes)),
        layout,
    }
}

fn out(op: Op<Sharded, Dim>) -> Layout {
    let v = output_layouts(&op).unwrap_or_else(|e| panic!("{} rejected: {e}", op.mnemonic()));
    v[0]
}

fn mm(a: Sharded, b: Sharded, transpose_b: bool) -> Op<Sharded, Dim> {
    Op::MatMul {
        a,
        b,
        transpose_a: false,
        transpose_b,
    }
}

const B: u64 = 2;
const S: u64 = 16;
const H: u64 = 64;
const FFN: u64 = 256;

#[test]
fn mlp_is_column_then_row_parallel() {
    // Y = GeLU(X·A) with A split by columns: no communication.
    let xa = out(mm(t(&[B, S, H], Replicated), t(&[H, FFN], Split(1)), false));
    assert_eq!(xa, Split(2));
    assert_eq!(
        out(Op::Add(t(&[B, S, FFN], xa), t(&[FFN], Split(0)))),
        Split(2)
    );
    assert_eq!(out(Op::GeluTanh(t(&[B, S, FFN], Split(2)))), Split(2));
    // Z = Y·B with B split by rows: a partial sum, which g all-reduces.
    let yb = out(mm(t(&[B, S, FFN], Split(2)), t(&[FFN, H], Split(0)), false));
    assert_eq!(yb, Partial);
    assert_eq!(
        out(Op::G {
            x: t(&[B, S, H], Partial),
            axis: MeshAxis::Tp
        }),
        Replicated
    );
    // The row-parallel bias must be added once, after g: adding it to the partial sum is rejected.
    assert!(output_layouts(&Op::Add(t(&[B, S, H], Partial), t(&[H], Replicated))).is_err());
    assert_eq!(
        out(Op::Add(t(&[B, S, H], Replicated), t(&[H], Replicated))),
        Replicated
    );
}

#[test]
fn attention_is_split_by_heads() {
    let (heads, hd) = (4, 16);
    let q = out(mm(t(&[B, S, H], Replicated), t(&[H, H], Split(1)), false));
    assert_eq!(q, Split(2));
    let reshape = |x, to: &[u64]| Op::Reshape {
        x,
        shape: to.iter().map(|&s| Dim::new(s)).collect(),
    };
    let q_heads = out(reshape(t(&[B, S, H], q), &[B, S, heads, hd]));
    assert_eq!(q_heads, Split(2), "hidden split → heads split");
    let q_t = out(Op::Transpose {
        x: t(&[B, S, heads, hd], q_heads),
        perm: vec![0, 2, 1, 3],
    });
    assert_eq!(q_t, Split(1));
    let scores = out(mm(
        t(&[B, heads, S, hd], q_t),
        t(&[B, heads, S, hd], q_t),
        true,
    ));
    assert_eq!(
        scores,
        Split(1),
        "heads are a batch axis of the score matmul"
    );
    let scaled = out(Op::Scale {
        x: t(&[B, heads, S, S], scores),
        factor: Factor::InvSqrt(Dim::new(hd)),
    });
    let probs = out(Op::Softmax {
        x: t(&[B, heads, S, S], scaled),
        causal: true,
    });
    assert_eq!(probs, Split(1));
    let ctx = out(mm(
        t(&[B, heads, S, S], probs),
        t(&[B, heads, S, hd], q_t),
        false,
    ));
    let ctx_t = out(Op::Transpose {
        x: t(&[B, heads, S, hd], ctx),
        perm: vec![0, 2, 1, 3],
    });
    let flat = out(reshape(t(&[B, S, heads, hd], ctx_t), &[B, S, H]));
    assert_eq!(flat, Split(2));
    assert_eq!(
        out(mm(t(&[B, S, H], flat), t(&[H, H], Split(0)), false)),
        Partial
    );
}

#[test]
fn grouped_query_attention_broadcasts_kv_heads_within_a_shard() {
    // q [b, kv, group, s, d] and k [b, kv, 1, s, d], both split over kv heads.
    let scores = out(mm(
        t(&[B, 2, 3, S, 8], Split(1)),
        t(&[B, 2, 1, S, 8], Split(1)),
        true,
    ));
    assert_eq!(scores, Split(1));
    // Splitting q's group axis against replicated k broadcasts k: also valid.
    let scores = out(mm(
        t(&[B, 2, 3, S, 8], Split(2)),
        t(&[B, 2, 1, S, 8], Replicated),
        true,
    ));
    assert_eq!(scores, Split(2));
    // But a split q against a replicated k that has the axis is a mismatch.
    assert!(output_layouts(&mm(
        t(&[B, 2, 3, S, 8], Split(1)),
        t(&[B, 2, 1, S, 8], Replicated),
        true
    ))
    .is_err());
}

#[test]
fn vocabulary_parallel_embedding_output_layer_and_loss() {
    let v = 128;
    let emb = Op::Embedding {
        table: t(&[v, H], Split(0)),
        ids: ids(&[B, S], Replicated),
    };
    assert_eq!(
        out(emb),
        Partial,
        "out-of-range ids give zeros; g sums the ranks' rows"
    );
    // Output layer tied to the embedding: [b,s,h] · [V,h]^T, V split → logits split over V.
    let logits = out(mm(t(&[B, S, H], Replicated), t(&[v, H], Split(0)), true));
    assert_eq!(logits, Split(2));
    let ce = |l| Op::CrossEntropy {
        classes: None,
        logits: t(&[B, S, v], l),
        targets: ids(&[B, S], Replicated),
        shift: true,
    };
    assert_eq!(
        out(ce(Split(2))),
        Replicated,
        "vocabulary-parallel cross-entropy"
    );
    assert_eq!(out(ce(Replicated)), Replicated);
    assert!(matches!(
        output_layouts(&ce(Partial)),
        Err(RuleError::PartialIntoNonlinear { .. })
    ));
    assert!(
        output_layouts(&ce(Split(1))).is_err(),
        "split over the sequence"
    );
}

#[test]
fn nonlinear_ops_never_take_a_partial_sum() {
    let p = || t(&[B, S, H], Partial);
    for op in [
        Op::Gelu(p()),
        Op::GeluTanh(p()),
        Op::Silu(p()),
        Op::Relu(p()),
        Op::Softmax {
            x: p(),
            causal: false,
        },
        Op::LayerNorm {
            x: p(),
            weight: None,
            bias: None,
            eps: 1e-5,
        },
        Op::RmsNorm {
            x: p(),
            weight: None,
            eps: 1e-5,
        },
    ] {
        let name = op.mnemonic();
        assert!(
            matches!(
                output_layouts(&op),
                Err(RuleError::PartialIntoNonlinear { .. })
            ),
            "{name}"
        );
    }
    // Linear ops pass it through.
    assert_eq!(
        out(Op::Scale {
            x: p(),
            factor: Factor::Const(0.5)
        }),
        Partial
    );
    assert_eq!(out(Op::Add(p(), p())), Partial);
    assert_eq!(out(Op::Mul(p(), t(&[H], Replicated))), Partial);
    assert!(output_layouts(&Op::Mul(p(), p())).is_err());
    assert!(output_layouts(&Op::Div(t(&[H], Replicated), p())).is_err());
}

#[test]
fn reductions_over_a_split_dimension_are_rejected() {
    let norm = Op::LayerNorm {
        x: t(&[B, S, H], Split(2)),
        weight: Some(t(&[H], Replicated)),
        bias: Some(t(&[H], Replicated)),
        eps: 1e-5,
    };
    assert_eq!(
        output_layouts(&norm).unwrap_err().to_string(),
        "LayerNorm works along dimension 2, which is split across ranks"
    );
    // Sequence parallelism: a norm over hidden with the sequence split is fine.
    let sp = Op::LayerNorm {
        x: t(&[B, S, H], Split(1)),
        weight: Some(t(&[H], Replicated)),
        bias: None,
        eps: 1e-5,
    };
    assert_eq!(out(sp), Split(1));
    let causal = |d| Op::Softmax {
        x: t(&[B, 4, S, S], Split(d)),
        causal: true,
    };
    assert!(
        output_layouts(&causal(2)).is_err(),
        "the mask needs global query positions"
    );
    assert!(output_layouts(&causal(3)).is_err());
    assert_eq!(out(causal(1)), Split(1));
    let rotary = |d| Op::Rotary {
        inverse: false,
        x: t(&[B, S, 4, 16], Split(d)),
        base: 1e4,
        scaling: None,
    };
    assert_eq!(out(rotary(2)), Split(2));
    assert!(output_layouts(&rotary(1)).is_err());
    assert!(output_layouts(&rotary(3)).is_err());
}

#[test]
fn reshape_moves_a_split_only_where_the_boundaries_line_up() {
    assert_eq!(reshape_split(&[2, 16, 64], &[2, 16, 4, 16], 2), Some(2));
    assert_eq!(reshape_split(&[2, 16, 4, 16], &[2, 16, 64], 2), Some(2));
    assert_eq!(
        reshape_split(&[2, 16, 4, 16], &[2, 16, 64], 3),
        None,
        "head_dim split"
    );
    assert_eq!(reshape_split(&[2, 16, 64], &[32, 64], 0), Some(0));
    assert_eq!(reshape_split(&[2, 16, 64], &[32, 64], 1), None);
    assert_eq!(reshape_split(&[6, 4], &[4, 6], 0), None);
}

#[test]
fn collectives_convert_the_layouts_they_exist_for() {
    let x = |l| t(&[B, S, H], l);
    assert_eq!(
        out(Op::AllGather {
            partial_grad: false,
            x: x(Split(1)),
            dim: 1,
            axis: MeshAxis::Tp,
            parts: 4
        }),
        Replicated
    );
    assert_eq!(
        out(Op::ReduceScatter {
            x: x(Partial),
            dim: 1,
            axis: MeshAxis::Tp,
            parts: 4
        }),
        Split(1)
    );
    assert!(output_layouts(&Op::G {
        x: x(Replicated),
        axis: MeshAxis::Tp
    })
    .is_err());
    assert!(output_layouts(&Op::F {
        x: x(Partial),
        axis: MeshAxis::Tp
    })
    .is_err());
}

#[test]
fn conversions_are_the_papers_collectives() {
    assert_eq!(conversion(Partial, Replicated), Some(Conversion::AllReduce));
    assert_eq!(
        conversion(Partial, Split(1)),
        Some(Conversion::ReduceScatter(1))
    );
    assert_eq!(
        conversion(Split(1), Replicated),
        Some(Conversion::AllGather(1))
    );
    assert_eq!(
        conversion(Replicated, Split(2)),
        Some(Conversion::LocalSlice(2))
    );
    assert_eq!(conversion(Split(2), Split(2)), None);
    assert_eq!(conversion(Replicated, Replicated), None);
}

#[test]
fn ill_formed_inputs_are_errors_not_panics() {
    assert!(matches!(
        output_layouts(&Op::Add(t(&[4], Split(3)), t(&[4], Replicated))),
        Err(RuleError::SplitOutOfRange {
            dim: 3,
            rank: 1,
            ..
        })
    ));
    assert!(output_layouts(&mm(t(&[4], Replicated), t(&[4, 4], Split(1)), false)).is_err());
    for x in [t(&[], Replicated), t(&[3], Split(0))] {
        let _ = output_layouts(&Op::Softmax {
            x: x.clone(),
            causal: true,
        });
        let _ = output_layouts(&Op::Rotary {
            inverse: false,
            x: x.clone(),
            base: 1e4,
            scaling: None,
        });
        let _ = output_layouts(&Op::RmsNorm {
            x,
            weight: None,
            eps: 1e-5,
        });
    }
}
