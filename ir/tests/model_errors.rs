//! Every kind of model-file mistake gives an error with file, line and column, the node's name,
//! and what was expected. Each test writes a small model with one mistake and checks the whole
//! message, so a regression in wording or location shows up here.

use ferrotron_ir::lang::ErrorKind;
use ferrotron_ir::{parse_model, LoadOptions, ModelError};

/// A two-statement model; `body` is spliced in at line 14, and `extra` after the params.
fn model(dims: &str, extra: &str, body: &str) -> String {
    format!(
        r#"// a small model for error tests
Model(
    name: "small",
    dims: {{
        "batch": 2,
        "hidden": 8,{dims}
    }},
    inputs: {{
        "x": Input(shape: ["batch", "hidden"], dtype: F32),
    }},
    params: {{
        "w": Param(shape: ["hidden", "hidden"], init: Normal(std: 0.02)),{extra}
    }},
    body: {{{body}
    }},
    outputs: ["y"],
)
"#
    )
}

fn check(src: &str) -> ModelError {
    check_with(src, LoadOptions::default())
}

fn check_with(src: &str, opts: LoadOptions) -> ModelError {
    parse_model(src, "small.ron", &opts).expect_err("the model should be rejected")
}

#[test]
fn the_template_itself_is_valid() {
    let src = model(
        "",
        "",
        r#"
        "y": MatMul(a: "x", b: "w"),"#,
    );
    let g = parse_model(&src, "small.ron", &LoadOptions::default()).unwrap();
    assert_eq!(g.nodes.len(), 1);
}

#[test]
fn ron_syntax_error_has_line_and_column() {
    let src = model(
        "",
        "",
        r#"
        "y": MatMul(a: "x" b: "w"),"#,
    );
    let e = check(&src);
    assert!(matches!(*e.kind, ErrorKind::Syntax(_)));
    let pos = e.pos.unwrap();
    assert_eq!((pos.line, pos.col), (15, 28), "{e}");
    assert!(e.to_string().starts_with("small.ron:15:28: "), "{e}");
}

#[test]
fn unknown_op() {
    let src = model(
        "",
        "",
        r#"
        "y": MatMull(a: "x", b: "w"),"#,
    );
    let e = check(&src).to_string();
    assert!(e.starts_with("small.ron:15:"), "{e}");
    assert!(
        e.contains("unknown op `MatMull` (did you mean `MatMul`?); known ops: Embedding, MatMul,"),
        "{e}"
    );
}

#[test]
fn unknown_field_of_an_op() {
    let src = model(
        "",
        "",
        r#"
        "y": MatMul(a: "x", b: "w", transpose: true),"#,
    );
    let e = check(&src).to_string();
    assert!(e.starts_with("small.ron:15:"), "{e}");
    assert!(e.contains("transpose"), "{e}");
}

#[test]
fn unknown_dimension() {
    let src = model(
        "",
        r#"
        "b": Param(shape: ["hiden"], init: Zeros),"#,
        r#"
        "y": MatMul(a: "x", b: "w"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:13:9: in `b`: unknown dimension `hiden` (did you mean `hidden`?)"
    );
}

#[test]
fn unknown_dimension_in_an_op_attribute() {
    let src = model(
        "",
        "",
        r#"
        "y": Reshape(x: "x", shape: ["batch", "hiddn"]),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: in `y`: unknown dimension `hiddn` (did you mean `hidden`?)"
    );
}

#[test]
fn shape_mismatch_names_both_shapes_and_the_node() {
    let src = model(
        r#"
        "ffn": "4 * hidden","#,
        r#"
        "w2": Param(shape: ["ffn", "hidden"], init: Zeros),"#,
        r#"
        "y": MatMul(a: "x", b: "w2"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:17:9: in `y`: MatMul: matmul inner dimensions differ: \
         [batch=2, hidden=8] · [ffn=32, hidden=8] contracts hidden=8 with ffn=32"
    );
}

#[test]
fn broadcast_mismatch() {
    let src = model(
        "",
        r#"
        "b": Param(shape: [3], init: Zeros),"#,
        r#"
        "y": Add("x", "b"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:16:9: in `y`: Add: shapes [batch=2, hidden=8] and [3] do not broadcast"
    );
}

#[test]
fn cycle_is_named() {
    let src = model(
        "",
        "",
        r#"
        "y": Add("a", "x"),
        "a": Gelu("y"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: values depend on each other in a cycle: y → a → y"
    );
}

#[test]
fn undefined_value() {
    let src = model(
        "",
        "",
        r#"
        "h": MatMul(a: "x", b: "ww"),
        "y": Gelu("h"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: in `h`: `ww` is not defined here (did you mean `w`?)"
    );
}

#[test]
fn duplicate_statement_name_in_a_map() {
    let src = model(
        "",
        "",
        r#"
        "y": Gelu("x"),
        "y": Relu("x"),"#,
    );
    let e = check(&src);
    assert_eq!(e.pos.map(|p| p.line), Some(16), "{e}");
    assert!(e.to_string().contains("duplicate name `y`"), "{e}");
}

#[test]
fn statement_shadowing_a_parameter() {
    let src = model(
        "",
        "",
        r#"
        "w": Gelu("x"),
        "y": Relu("w"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: in `w`: `w` is defined more than once"
    );
}

#[test]
fn non_divisible_reshape() {
    let src = model(
        "",
        "",
        r#"
        "y": Reshape(x: "x", shape: [3, 5]),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: in `y`: Reshape: cannot reshape [batch=2, hidden=8] (16 elements) to [3, 5] (15 elements)"
    );
}

#[test]
fn non_divisible_dimension_expression() {
    let src = model(
        r#"
        "heads": 3,
        "head_dim": "hidden / heads","#,
        "",
        r#"
        "y": Gelu("x"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:8:9: in `head_dim`: `hidden / heads`: 8 / 3 is not a whole number"
    );
}

#[test]
fn overridden_dimension_that_breaks_a_shape() {
    let src = model(
        r#"
        "heads": 2,
        "head_dim": "hidden / heads","#,
        "",
        r#"
        "y": Reshape(x: "x", shape: ["batch", "heads", "head_dim"]),"#,
    );
    parse_model(&src, "small.ron", &LoadOptions::default()).unwrap();
    let opts = |o: &[(&str, u64)]| LoadOptions {
        overrides: o.iter().map(|&(n, v)| (n.to_owned(), v)).collect(),
        ..LoadOptions::default()
    };
    assert_eq!(
        check_with(&src, opts(&[("hidden", 9)])).to_string(),
        "small.ron:8:9: in `head_dim`: `hidden / heads`: 9 / 2 is not a whole number (with --dim hidden=9)"
    );
    assert_eq!(
        check_with(&src, opts(&[("head_dim", 3)])).to_string(),
        "small.ron:17:9: in `y`: Reshape: cannot reshape [batch=2, hidden=8] (16 elements) to \
         [batch=2, heads=2, head_dim=3] (12 elements) (with --dim head_dim=3)"
    );
    assert_eq!(
        check_with(&src, opts(&[("hiden", 9)])).to_string(),
        "small.ron: --dim hiden: the model has no such dimension (did you mean `hidden`?); \
         its dimensions are: batch, hidden, heads, head_dim"
    );
}

#[test]
fn dimension_cycle() {
    let src = model(
        r#"
        "a": "b + 1",
        "b": "2 * a","#,
        "",
        r#"
        "y": Gelu("x"),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:7:9: in `a`: dimensions are defined in a cycle: a → b → a"
    );
}

#[test]
fn undefined_output() {
    let src = model(
        "",
        "",
        r#"
        "z": Gelu("x"),"#,
    )
    .replace(r#"outputs: ["y"]"#, r#"outputs: ["zz"]"#);
    assert_eq!(
        check(&src).to_string(),
        "small.ron:17:5: `zz` is not defined here (did you mean `z`?)"
    );
}

#[test]
fn wrong_number_of_split_outputs() {
    let src = model(
        "",
        "",
        r#"
        "a, y": Split(x: "x", axis: -1, sizes: [2, 2, 4]),"#,
    );
    assert_eq!(
        check(&src).to_string(),
        "small.ron:15:9: in `a,y`: Split produces 3 output(s), but 2 name(s) are given"
    );
}

/// A model with one block, applied by `apply` (spliced into the body).
fn block_model(block_body: &str, apply: &str) -> String {
    format!(
        r#"Model(
    name: "blocks",
    dims: {{ "hidden": 8, "layers": 3 }},
    inputs: {{ "x": Input(shape: [2, "hidden"], dtype: F32) }},
    blocks: {{
        "layer": Block(
            inputs: ["h"],
            params: {{ "w": Param(shape: ["hidden", "hidden"], init: Normal(std: 0.02)) }},
            body: {{{block_body}
            }},
            outputs: ["out"],
        ),
    }},
    body: {{
        {apply}
    }},
    outputs: ["y"],
)
"#
    )
}

#[test]
fn repeated_blocks_expand_with_prefixed_names() {
    let src = block_model(
        r#"
                "mm": MatMul(a: "h", b: "w"),
                "out": Gelu("mm"),"#,
        r#""y": Repeat(block: "layer", times: "layers", inputs: ["x"]),"#,
    );
    let g = parse_model(&src, "blocks.ron", &LoadOptions::default()).unwrap();
    assert_eq!(g.layers().count(), 3);
    assert!(g.params.values().any(|p| p.name == "y.2.w"));
    assert!(g.node_named("y.1.mm").is_some());
}

#[test]
fn error_inside_a_block_names_the_expanded_node() {
    let src = block_model(
        r#"
                "mm": MatMul(a: "w", b: "h"),
                "out": Gelu("mm"),"#,
        r#""y": Repeat(block: "layer", times: "layers", inputs: ["x"]),"#,
    );
    assert_eq!(
        check_named(&src).to_string(),
        "blocks.ron:10:17: in `y.0.mm`: MatMul: matmul inner dimensions differ: \
         [hidden=8, hidden=8] · [2, hidden=8] contracts hidden=8 with 2"
    );
}

fn check_named(src: &str) -> ModelError {
    parse_model(src, "blocks.ron", &LoadOptions::default()).unwrap_err()
}

#[test]
fn written_name_colliding_with_an_expanded_one() {
    let body = r#"
                "out": Gelu("h"),"#;
    let src = block_model(
        body,
        r#""y": Repeat(block: "layer", times: 2, inputs: ["x"]),
        "y.1.out": Gelu("x"),"#,
    );
    assert_eq!(
        check_named(&src).to_string(),
        "blocks.ron:17:9: in `y.1.out`: `y.1.out` is defined more than once"
    );
}

#[test]
fn unknown_block_and_wrong_arity() {
    let body = r#"
                "out": Gelu("h"),"#;
    let e = check_named(&block_model(
        body,
        r#""y": Call(block: "layr", inputs: ["x"]),"#,
    ));
    assert_eq!(
        e.to_string(),
        "blocks.ron:16:9: in `y`: unknown block `layr` (did you mean `layer`?)"
    );
    let e = check_named(&block_model(
        body,
        r#""y": Call(block: "layer", inputs: ["x", "x"]),"#,
    ));
    assert_eq!(
        e.to_string(),
        "blocks.ron:16:9: in `y`: block `layer` takes 1 input(s), 2 given"
    );
}

#[test]
fn repeat_that_changes_the_carried_type() {
    let body = r#"
                "out": Slice(x: "h", axis: 1, start: 0, end: 4),"#;
    let e = check_named(&block_model(
        body,
        r#""y": Repeat(block: "layer", times: 2, inputs: ["x"]),"#,
    ));
    assert_eq!(
        e.to_string(),
        "blocks.ron:16:9: in `y`: `layer` cannot be repeated: its output `out` is f32[2, 4] \
         but the input `h` it feeds is f32[2, hidden=8]"
    );
}

#[test]
fn block_applying_itself() {
    let body = r#"
                "out": Call(block: "layer", inputs: ["h"]),"#;
    let e = check_named(&block_model(
        body,
        r#""y": Call(block: "layer", inputs: ["x"]),"#,
    ));
    assert_eq!(
        e.to_string(),
        "blocks.ron:10:17: in `y.out`: block `layer` applies itself: layer → layer"
    );
}

#[test]
fn expansion_size_is_bounded() {
    let body = r#"
                "out": Gelu("h"),"#;
    let src = block_model(
        body,
        r#""y": Repeat(block: "layer", times: 100000000000, inputs: ["x"]),"#,
    );
    let opts = LoadOptions {
        max_nodes: 1000,
        ..LoadOptions::default()
    };
    let e = parse_model(&src, "blocks.ron", &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "blocks.ron:10:17: in `y.1000.out`: the model expands to more than 1000 nodes"
    );
}

#[test]
fn missing_file() {
    let e = ferrotron_ir::load_model(
        std::path::Path::new("no/such/model.ron"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(*e.kind, ErrorKind::Io(_)));
    assert!(
        e.to_string()
            .starts_with("no/such/model.ron: cannot read the file"),
        "{e}"
    );
}

#[test]
fn a_parameter_layout_pin_is_read_and_checked() {
    let body = r#"
        "y": MatMul(a: "x", b: "w"),"#;
    let pinned = model(
        "",
        r#"
        "v": Param(shape: ["hidden"], init: Zeros, layout: Split(0)),"#,
        body,
    );
    let g = parse_model(&pinned, "small.ron", &LoadOptions::default()).unwrap();
    let v = g.params.values().find(|p| p.name == "v").unwrap();
    assert_eq!(v.pin, Some(ferrotron_ir::Pin::Split(0)));

    let wrong = model(
        "",
        r#"
        "v": Param(shape: ["hidden"], init: Zeros, layout: Split(1)),"#,
        body,
    );
    let e = check(&wrong);
    let msg = e.to_string();
    assert!(msg.starts_with("small.ron:13:"), "{msg}");
    assert!(
        msg.contains("the parameter has rank 1, so Split(0) to Split(0) or Replicated"),
        "{msg}"
    );
    let typo = model(
        "",
        r#"
        "v": Param(shape: ["hidden"], init: Zeros, layout: Sideways),"#,
        body,
    );
    let msg = check(&typo).to_string();
    assert!(msg.starts_with("small.ron:13:"), "{msg}");
}
