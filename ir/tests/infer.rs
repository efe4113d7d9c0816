//! Shape inference, op by op, without a graph or a model file.

use ferrotron_ir::op::{Factor, MeshAxis};
use ferrotron_ir::{infer, DType, Dim, Op, OpError, Shape, TensorType};

fn f32(sizes: &[u64]) -> TensorType {
    TensorType::new(DType::F32, Shape::from_sizes(sizes))
}

fn i64(sizes: &[u64]) -> TensorType {
    TensorType::new(DType::I64, Shape::from_sizes(sizes))
}

fn one(op: Op<TensorType, Dim>) -> Result<Vec<u64>, OpError> {
    infer(&op).map(|mut v| v.remove(0).shape.sizes())
}

fn dims(sizes: &[u64]) -> Vec<Dim> {
    sizes.iter().map(|&s| Dim::new(s)).collect()
}

#[test]
fn matmul_batches_broadcast_and_transposes() {
    let mm = |a, b, ta, tb| {
        one(Op::MatMul {
            a,
            b,
            transpose_a: ta,
            transpose_b: tb,
        })
    };
    assert_eq!(
        mm(f32(&[2, 5, 3]), f32(&[3, 7]), false, false).unwrap(),
        [2, 5, 7]
    );
    assert_eq!(
        mm(f32(&[2, 5, 3]), f32(&[7, 3]), false, true).unwrap(),
        [2, 5, 7]
    );
    assert_eq!(mm(f32(&[3, 5]), f32(&[3, 7]), true, false).unwrap(), [5, 7]);
    // Grouped-query attention: [b, kv, group, s, d] · [b, kv, 1, s, d]^T.
    assert_eq!(
        mm(f32(&[2, 2, 3, 5, 8]), f32(&[2, 2, 1, 5, 8]), false, true).unwrap(),
        [2, 2, 3, 5, 5]
    );
    let err = mm(f32(&[2, 5, 3]), f32(&[4, 7]), false, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "matmul inner dimensions differ: [2, 5, 3] · [4, 7] contracts 3 with 4"
    );
    assert!(matches!(
        mm(f32(&[3]), f32(&[3, 7]), false, false),
        Err(OpError::Rank { .. })
    ));
    assert!(matches!(
        mm(f32(&[2, 5, 3]), f32(&[4, 3, 7]), false, false),
        Err(OpError::Broadcast { .. })
    ));
}

#[test]
fn elementwise_broadcasting_follows_numpy() {
    assert_eq!(
        one(Op::Add(f32(&[2, 16, 64]), f32(&[16, 64]))).unwrap(),
        [2, 16, 64]
    );
    assert_eq!(
        one(Op::Mul(f32(&[2, 1, 64]), f32(&[5, 1]))).unwrap(),
        [2, 5, 64]
    );
    assert_eq!(one(Op::Sub(f32(&[]), f32(&[3]))).unwrap(), [3]);
    let err = one(Op::Div(f32(&[2, 3]), f32(&[4]))).unwrap_err();
    assert_eq!(err.to_string(), "shapes [2, 3] and [4] do not broadcast");
    let err = one(Op::Add(f32(&[2]), i64(&[2]))).unwrap_err();
    assert!(matches!(err, OpError::DtypeMismatch { .. }), "{err}");
}

#[test]
fn embedding_and_cross_entropy() {
    let emb = Op::Embedding {
        table: f32(&[97, 64]),
        ids: i64(&[2, 16]),
    };
    assert_eq!(one(emb).unwrap(), [2, 16, 64]);
    let bad_ids = Op::Embedding {
        table: f32(&[97, 64]),
        ids: f32(&[2, 16]),
    };
    assert!(matches!(one(bad_ids), Err(OpError::Dtype { .. })));
    let ce = |logits, targets, shift| {
        one(Op::CrossEntropy {
            classes: None,
            logits,
            targets,
            shift,
        })
    };
    assert_eq!(
        ce(f32(&[2, 16, 97]), i64(&[2, 16]), true).unwrap(),
        Vec::<u64>::new()
    );
    let err = ce(f32(&[2, 16, 97]), i64(&[2, 15]), true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the targets has shape [2, 15], expected [2, 16]"
    );
    assert!(ce(f32(&[2, 1, 97]), i64(&[2, 1]), true).is_err());
    assert!(ce(f32(&[2, 1, 97]), i64(&[2, 1]), false).is_ok());
}

#[test]
fn norms_softmax_rotary_dropout() {
    let ln = |x, w: Option<TensorType>| {
        one(Op::LayerNorm {
            x,
            weight: w.clone(),
            bias: w,
            eps: 1e-5,
        })
    };
    assert_eq!(ln(f32(&[2, 8]), Some(f32(&[8]))).unwrap(), [2, 8]);
    assert!(matches!(
        ln(f32(&[2, 8]), Some(f32(&[4]))),
        Err(OpError::ShapeMismatch { .. })
    ));
    assert!(one(Op::RmsNorm {
        x: f32(&[2, 8]),
        weight: None,
        eps: 0.0
    })
    .is_err());
    assert!(one(Op::Softmax {
        x: f32(&[2, 4, 4]),
        causal: true
    })
    .is_ok());
    assert!(one(Op::Softmax {
        x: f32(&[2, 5, 4]),
        causal: true
    })
    .is_err());
    assert!(one(Op::Rotary {
        inverse: false,
        x: f32(&[2, 12, 6, 8]),
        base: 1e4,
        scaling: None,
    })
    .is_ok());
    assert!(matches!(
        one(Op::Rotary {
            inverse: false,
            x: f32(&[2, 12, 6, 7]),
            base: 1e4,
            scaling: None,
        }),
        Err(OpError::Indivisible { .. })
    ));
    assert!(one(Op::Dropout {
        x: f32(&[3]),
        p: 1.0
    })
    .is_err());
    assert!(one(Op::Scale {
        x: f32(&[3]),
        factor: Factor::InvSqrt(Dim::new(0))
    })
    .is_err());
}

#[test]
fn movement_ops() {
    let reshape = |x, to: &[u64]| one(Op::Reshape { x, shape: dims(to) });
    assert_eq!(
        reshape(f32(&[2, 16, 64]), &[2, 16, 4, 16]).unwrap(),
        [2, 16, 4, 16]
    );
    let err = reshape(f32(&[2, 6]), &[4, 4]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reshape [2, 6] (12 elements) to [4, 4] (16 elements)"
    );
    let t = |x, perm: &[usize]| {
        one(Op::Transpose {
            x,
            perm: perm.to_vec(),
        })
    };
    assert_eq!(t(f32(&[2, 3, 4]), &[2, 0, 1]).unwrap(), [4, 2, 3]);
    assert!(matches!(
        t(f32(&[2, 3, 4]), &[0, 0, 1]),
        Err(OpError::Perm { .. })
    ));
    assert!(matches!(
        t(f32(&[2, 3, 4]), &[0, 1]),
        Err(OpError::Perm { .. })
    ));
    let slice = |start, end| {
        one(Op::Slice {
            x: f32(&[32, 64]),
            dim: 0,
            start: Dim::new(start),
            end: Dim::new(end),
        })
    };
    assert_eq!(slice(0, 16).unwrap(), [16, 64]);
    assert_eq!(slice(4, 32).unwrap(), [28, 64]);
    assert!(matches!(slice(0, 33), Err(OpError::Slice { .. })));
    assert!(matches!(slice(5, 4), Err(OpError::Slice { .. })));
    let split = infer(&Op::Split {
        x: f32(&[2, 16, 192]),
        dim: -1,
        sizes: dims(&[64, 64, 64]),
    })
    .unwrap();
    assert_eq!(split.len(), 3);
    assert!(split.iter().all(|t| t.shape.sizes() == [2, 16, 64]));
    assert!(matches!(
        infer(&Op::Split {
            x: f32(&[2, 16, 192]),
            dim: -1,
            sizes: dims(&[64, 64]),
        }),
        Err(OpError::Split { .. })
    ));
    assert!(matches!(
        infer(&Op::Split {
            x: f32(&[2, 16, 192]),
            dim: 3,
            sizes: dims(&[192]),
        }),
        Err(OpError::Axis { .. })
    ));
    let cat = one(Op::Concat {
        xs: vec![f32(&[2, 3]), f32(&[2, 5])],
        dim: 1,
    });
    assert_eq!(cat.unwrap(), [2, 8]);
    assert!(one(Op::Concat {
        xs: vec![f32(&[2, 3]), f32(&[3, 5])],
        dim: 1
    })
    .is_err());
}

#[test]
fn collectives() {
    let x = f32(&[2, 16, 64]);
    for op in [
        Op::AllReduce {
            x: x.clone(),
            axis: MeshAxis::Tp,
        },
        Op::F {
            x: x.clone(),
            axis: MeshAxis::Tp,
        },
        Op::G {
            x: x.clone(),
            axis: MeshAxis::Tp,
        },
    ] {
        assert_eq!(one(op).unwrap(), [2, 16, 64]);
    }
    let gather = Op::AllGather {
        partial_grad: false,
        x: x.clone(),
        dim: 1,
        axis: MeshAxis::Tp,
        parts: 4,
    };
    assert_eq!(one(gather).unwrap(), [2, 64, 64]);
    let scatter = |parts| {
        one(Op::ReduceScatter {
            x: x.clone(),
            dim: 1,
            axis: MeshAxis::Tp,
            parts,
        })
    };
    assert_eq!(scatter(4).unwrap(), [2, 4, 64]);
    assert!(matches!(scatter(3), Err(OpError::Indivisible { .. })));
    assert!(matches!(scatter(0), Err(OpError::Indivisible { .. })));
}

#[test]
fn named_dimensions_survive_inference() {
    let hidden = Dim::named(64, "hidden");
    let x = TensorType::new(
        DType::F32,
        Shape(vec![Dim::named(16, "seq"), hidden.clone()]),
    );
    let w = TensorType::new(DType::F32, Shape(vec![hidden, Dim::named(256, "ffn")]));
    let out = &infer(&Op::MatMul {
        a: x,
        b: w,
        transpose_a: false,
        transpose_b: false,
    })
    .unwrap()[0];
    assert_eq!(out.to_string(), "f32[seq=16, ffn=256]");
}

#[test]
fn huge_shapes_are_errors_not_overflows() {
    let big = u64::MAX / 2;
    assert!(matches!(
        one(Op::Add(f32(&[big, 4]), f32(&[1]))),
        Err(OpError::Overflow(_))
    ));
    assert!(one(Op::AllGather {
        partial_grad: false,
        x: f32(&[big]),
        dim: 0,
        axis: MeshAxis::Dp,
        parts: 4
    })
    .is_err());
}
