//! Sharded checkpoints: what is saved at one tensor-parallel degree reads back bit for bit,
//! reshards through other degrees unchanged, holds each rank's share in its file, is replaced
//! atomically, and fails with clean messages.

mod common;

use common::{model, TempDir};
use ferrotron_exec::init::init_params;
use ferrotron_exec::{shard_params, Tensor};
use ferrotron_io::checkpoint::{self, CheckpointError, CheckpointMeta};
use ferrotron_io::safetensors_io::{self, SafetensorsFile};
use ferrotron_ir::Graph;
use ferrotron_partitioner::{partition, Layout, PartitionOptions, Plan};
use std::collections::HashMap;
use std::path::PathBuf;

fn plan(g: &Graph, tp: u64) -> Plan {
    partition(
        g,
        &PartitionOptions {
            tp,
            ..Default::default()
        },
    )
    .unwrap()
}

impl TempDir {
    /// The names in the directory, sorted.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Weights and two moment-like groups, all different.
fn state(g: &Graph) -> Vec<(String, HashMap<String, Tensor>)> {
    let params = init_params(g, 11);
    let m: HashMap<String, Tensor> = init_params(g, 12)
        .into_iter()
        .map(|(n, mut t)| {
            t.data
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x += i as f32 * 1e-3);
            (n, t)
        })
        .collect();
    let v: HashMap<String, Tensor> = m
        .iter()
        .map(|(n, t)| {
            let mut t = t.clone();
            t.data.iter_mut().for_each(|x| *x = *x * *x + 1e-8);
            (n.clone(), t)
        })
        .collect();
    vec![
        ("params".into(), params),
        ("adam_m".into(), m),
        ("adam_v".into(), v),
    ]
}

fn refs(state: &[(String, HashMap<String, Tensor>)]) -> Vec<(&str, &HashMap<String, Tensor>)> {
    state.iter().map(|(n, t)| (n.as_str(), t)).collect()
}

fn meta() -> CheckpointMeta {
    CheckpointMeta {
        model: "tiny-gpt".into(),
        step: 1234,
        seed: 7,
        data_position: 98_765,
        extra: serde_json::json!({"lr": 3e-4, "warmup": 100, "schedule": "cosine"}),
        ..Default::default()
    }
}

/// Bit-for-bit equality of every group and tensor.
fn assert_same(
    got: &HashMap<String, HashMap<String, Tensor>>,
    want: &[(String, HashMap<String, Tensor>)],
) {
    assert_eq!(got.len(), want.len());
    for (group, tensors) in want {
        let g = &got[group];
        assert_eq!(g.len(), tensors.len(), "{group}");
        for (name, t) in tensors {
            let l = &g[name];
            assert_eq!(l.shape, t.shape, "{group}/{name}");
            let bits = |x: &Tensor| x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(l) == bits(t), "{group}/{name} differs");
        }
    }
}

fn assert_meta_kept(got: &CheckpointMeta, tp: u64) {
    let m = meta();
    assert_eq!(got.model, m.model);
    assert_eq!(got.step, m.step);
    assert_eq!(got.seed, m.seed);
    assert_eq!(got.data_position, m.data_position);
    assert_eq!(got.extra, m.extra);
    assert_eq!(got.tp, tp);
    assert_eq!(got.dp, 1);
    assert_eq!(got.groups, ["params", "adam_m", "adam_v"]);
}

#[test]
fn save_then_load_is_bit_for_bit() {
    let g = model(&[]);
    let p = plan(&g, 2);
    let s = state(&g);
    let tmp = TempDir::new("roundtrip");
    let dir = tmp.join("ckpt");
    checkpoint::save(&dir, &p, &meta(), &refs(&s)).unwrap();
    assert_eq!(tmp.entries(), ["ckpt"], "no temporary directory left");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["meta.json", "rank-0.safetensors", "rank-1.safetensors"]
    );

    let (m, groups) = checkpoint::load(&dir).unwrap();
    assert_meta_kept(&m, 2);
    assert_eq!(m.tensors.len(), g.params.len());
    assert_same(&groups, &s);
}

#[test]
fn reshard_through_other_degrees_is_exact() {
    let g = model(&[]);
    let s = state(&g);
    let tmp = TempDir::new("reshard");
    let (a, b, c) = (tmp.join("tp2"), tmp.join("tp1"), tmp.join("tp4"));
    checkpoint::save(&a, &plan(&g, 2), &meta(), &refs(&s)).unwrap();
    checkpoint::reshard(&a, &b, &plan(&g, 1)).unwrap();
    checkpoint::reshard(&b, &c, &plan(&g, 4)).unwrap();
    assert!(checkpoint::rank_file(&c, 3).exists());
    assert!(!checkpoint::rank_file(&b, 1).exists());
    for (dir, tp) in [(&a, 2), (&b, 1), (&c, 4)] {
        let (m, groups) = checkpoint::load(dir).unwrap();
        assert_meta_kept(&m, tp);
        assert_same(&groups, &s);
    }
    // In place, back to tp = 2.
    checkpoint::reshard(&c, &c, &plan(&g, 2)).unwrap();
    let (m, groups) = checkpoint::load(&c).unwrap();
    assert_meta_kept(&m, 2);
    assert_same(&groups, &s);
    assert!(
        !checkpoint::rank_file(&c, 2).exists(),
        "old rank files gone"
    );
    assert_eq!(tmp.entries(), ["tp1", "tp2", "tp4"]);
}

/// `g` partitioned at `tp` into `pp` stages.
fn staged(g: &Graph, tp: u64, pp: u64) -> Plan {
    partition(
        g,
        &PartitionOptions {
            tp,
            pp,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn reshard_between_tensor_and_pipeline_degrees_is_exact() {
    let g = model(&[("layers", 4)]);
    let s = state(&g);
    let tmp = TempDir::new("reshard-pp");
    let (a, b, c, d) = (
        tmp.join("tp2pp2"),
        tmp.join("tp1pp4"),
        tmp.join("tp4pp1"),
        tmp.join("back"),
    );
    checkpoint::save(&a, &staged(&g, 2, 2), &meta(), &refs(&s)).unwrap();
    // Per stage and tp rank; the tied embedding in the first and last stage's files.
    assert!(checkpoint::stage_file(&a, 2, 1, 1).exists());
    let wte = |dir: &PathBuf, pp: u64, stage: u64| {
        SafetensorsFile::open(&checkpoint::stage_file(dir, pp, stage, 0))
            .unwrap()
            .tensor("params/wte")
            .is_ok()
    };
    assert!(wte(&a, 2, 0) && wte(&a, 2, 1));
    checkpoint::reshard(&a, &b, &staged(&g, 1, 4)).unwrap();
    assert!(wte(&b, 4, 0) && !wte(&b, 4, 1) && wte(&b, 4, 3));
    checkpoint::reshard(&b, &c, &staged(&g, 4, 1)).unwrap();
    checkpoint::reshard(&c, &d, &staged(&g, 2, 2)).unwrap();
    for (dir, tp, pp) in [(&a, 2, 2), (&b, 1, 4), (&c, 4, 1), (&d, 2, 2)] {
        let (m, groups) = checkpoint::load(dir).unwrap();
        assert_meta_kept(&m, tp);
        assert_eq!(m.pp, pp);
        assert_same(&groups, &s);
    }
    // The round trip (2, 2) → (1, 4) → (4, 1) → (2, 2) wrote the same shards, bit for bit.
    for stage in 0..2 {
        for t in 0..2 {
            let open = |dir: &PathBuf| {
                SafetensorsFile::open(&checkpoint::stage_file(dir, 2, stage, t)).unwrap()
            };
            let (x, y) = (open(&a), open(&d));
            let mut names = x.names();
            names.sort();
            let mut other = y.names();
            other.sort();
            assert_eq!(names, other, "stage {stage} rank {t}");
            for n in names {
                let bits = |t: Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(x.tensor(&n).unwrap()) == bits(y.tensor(&n).unwrap()),
                    "{n}"
                );
            }
        }
    }
}

#[test]
fn each_rank_file_holds_its_share() {
    let g = model(&[]);
    let p = plan(&g, 2);
    let s = state(&g);
    let tmp = TempDir::new("share");
    let dir = tmp.join("ckpt");
    checkpoint::save(&dir, &p, &meta(), &refs(&s)).unwrap();
    let shards = shard_params(&p, &s[0].1).unwrap();
    let mut split = 0;
    for t in 0..2u64 {
        let file = SafetensorsFile::open(&checkpoint::rank_file(&dir, t)).unwrap();
        assert_eq!(file.names().len(), 3 * g.params.len());
        for (i, shard) in p.params.iter().enumerate() {
            let full: u64 = shard.shape.iter().product();
            let local = file.tensor(&format!("params/{}", shard.name)).unwrap();
            match shard.layout.tp {
                Layout::Split(d) => {
                    split += 1;
                    assert_eq!(local.numel() as u64 * 2, full, "{}", shard.name);
                    assert_eq!(local.shape[d] as u64 * 2, shard.shape[d], "{}", shard.name);
                }
                _ => assert_eq!(local.numel() as u64, full, "{}", shard.name),
            }
            // Exactly what the runtime hands that rank.
            assert_eq!(local, shards[t as usize][i], "{}", shard.name);
        }
    }
    assert!(split >= 2 * 8, "most of the weights are split ({split})");
    // The padded embedding: 97 rows padded to 256, 128 per rank.
    let wte = p.params.iter().find(|s| s.name == "wte").unwrap();
    assert_eq!(wte.model_shape, [97, 64]);
    let file = SafetensorsFile::open(&checkpoint::rank_file(&dir, 1)).unwrap();
    assert_eq!(
        file.shape("adam_v/wte").unwrap(),
        [wte.shape[0] as usize / 2, 64]
    );
}

#[test]
fn a_failed_save_leaves_the_old_checkpoint() {
    let g = model(&[]);
    let p = plan(&g, 2);
    let s = state(&g);
    let tmp = TempDir::new("failed-save");
    let dir = tmp.join("ckpt");
    checkpoint::save(&dir, &p, &meta(), &refs(&s)).unwrap();
    let before: Vec<Vec<u8>> = ["meta.json", "rank-0.safetensors", "rank-1.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();

    let mut bad = state(&g);
    bad[1]
        .1
        .insert("h.1.mlp.c_fc.weight".into(), Tensor::zeros(vec![64, 128]));
    let mut later = meta();
    later.step += 1;
    let err = checkpoint::save(&dir, &p, &later, &refs(&bad)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::Input { .. }), "{msg}");
    for part in ["adam_m", "h.1.mlp.c_fc.weight", "[64, 128]", "[64, 256]"] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }

    let mut missing = state(&g);
    missing[2].1.remove("ln_f.bias");
    let msg = checkpoint::save(&dir, &p, &later, &refs(&missing))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adam_v") && msg.contains("ln_f.bias") && msg.contains("missing"),
        "{msg}"
    );

    let mut extra = state(&g);
    extra[0]
        .1
        .insert("h.9.ln_1.weight".into(), Tensor::zeros(vec![64]));
    let msg = checkpoint::save(&dir, &p, &later, &refs(&extra))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("h.9.ln_1.weight") && msg.contains("not a parameter"),
        "{msg}"
    );

    assert_eq!(tmp.entries(), ["ckpt"], "no temporary directory left");
    let after: Vec<Vec<u8>> = ["meta.json", "rank-0.safetensors", "rank-1.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert!(before == after, "the old checkpoint is untouched");
    let (m, groups) = checkpoint::load(&dir).unwrap();
    assert_eq!(m.step, meta().step);
    assert_same(&groups, &s);
}

#[test]
fn a_save_replaces_an_existing_checkpoint() {
    let g = model(&[]);
    let s = state(&g);
    let tmp = TempDir::new("replace");
    let dir = tmp.join("ckpt");
    checkpoint::save(&dir, &plan(&g, 4), &meta(), &refs(&s)).unwrap();
    let mut later = meta();
    later.step = 2000;
    let newer = vec![s[0].clone()];
    checkpoint::save(&dir, &plan(&g, 2), &later, &refs(&newer)).unwrap();
    let (m, groups) = checkpoint::load(&dir).unwrap();
    assert_eq!((m.step, m.tp), (2000, 2));
    assert_same(&groups, &newer);
    assert!(!checkpoint::rank_file(&dir, 3).exists());
    assert_eq!(tmp.entries(), ["ckpt"]);
}

/// A saved tp = 2 checkpoint to break.
fn saved(tmp: &TempDir) -> PathBuf {
    let g = model(&[]);
    let s = state(&g);
    let dir = tmp.join("ckpt");
    checkpoint::save(&dir, &plan(&g, 2), &meta(), &refs(&s)).unwrap();
    dir
}

#[test]
fn a_missing_rank_file_is_named() {
    let tmp = TempDir::new("missing-rank");
    let dir = saved(&tmp);
    std::fs::remove_file(checkpoint::rank_file(&dir, 1)).unwrap();
    let err = checkpoint::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::MissingFile { .. }), "{msg}");
    assert!(
        msg.contains("rank-1.safetensors") && msg.contains("missing file"),
        "{msg}"
    );
    assert!(msg.contains("tp = 2"), "{msg}");

    let msg = checkpoint::load(&tmp.join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("meta.json") && msg.contains("missing file"),
        "{msg}"
    );
}

#[test]
fn a_corrupted_meta_json_gives_line_and_column() {
    let tmp = TempDir::new("bad-meta");
    let dir = saved(&tmp);
    let path = checkpoint::meta_file(&dir);
    let text = std::fs::read_to_string(&path).unwrap();
    // Break the third line.
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "  \"step\": 12x34,";
    std::fs::write(&path, lines.join("\n")).unwrap();
    let err = checkpoint::load(&dir).unwrap_err();
    let msg = err.to_string();
    match &err {
        CheckpointError::Meta { line, col, .. } => {
            assert_eq!(*line, 3, "{msg}");
            assert!(*col > 1, "{msg}");
        }
        other => panic!("not a meta.json error: {other}"),
    }
    assert!(
        msg.contains("meta.json:3:") && msg.contains("bad meta.json"),
        "{msg}"
    );

    // Valid JSON that does not hold together.
    std::fs::write(&path, text.replacen("\"tp\": 2", "\"tp\": 3", 1)).unwrap();
    let msg = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("bad meta.json") && msg.contains("tp = 3"),
        "{msg}"
    );
    std::fs::write(&path, "").unwrap();
    let msg = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(msg.contains("bad meta.json"), "{msg}");
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    let tmp = TempDir::new("missing-tensor");
    let dir = saved(&tmp);
    let rank1 = checkpoint::rank_file(&dir, 1);
    let file = SafetensorsFile::open(&rank1).unwrap();
    let mut kept: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .filter(|n| n != "adam_m/h.0.attn.c_attn.weight")
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    let write = |kept: &[(String, Tensor)]| {
        let r: Vec<(&str, &Tensor)> = kept.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors_io::write(&rank1, &r, None).unwrap();
    };
    write(&kept);
    let err = checkpoint::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::MissingTensor { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("rank-1.safetensors")
            && msg.contains("`adam_m/h.0.attn.c_attn.weight` is missing"),
        "{msg}"
    );

    kept.push((
        "adam_m/h.0.attn.c_attn.weight".into(),
        Tensor::zeros(vec![64, 64]),
    ));
    write(&kept);
    let msg = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("adam_m/h.0.attn.c_attn.weight")
            && msg.contains("[64, 64]")
            && msg.contains("[64, 96]"),
        "{msg}"
    );

    std::fs::write(&rank1, b"not a safetensors file").unwrap();
    let msg = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("rank-1.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn a_plan_for_another_model_is_refused() {
    let tmp = TempDir::new("other-plan");
    let dir = saved(&tmp);
    let deeper = model(&[("layers", 3)]);
    let err = checkpoint::reshard(&dir, &tmp.join("out"), &plan(&deeper, 2)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::PlanMismatch { .. }), "{msg}");
    assert!(
        msg.contains("`h.2.") && msg.contains("not in the checkpoint"),
        "{msg}"
    );

    let wider = model(&[("vocab", 101)]);
    let msg = checkpoint::reshard(&dir, &tmp.join("out"), &plan(&wider, 1))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`wte`") && msg.contains("[97, 64]") && msg.contains("[101, 64]"),
        "{msg}"
    );
    assert!(!tmp.join("out").exists());
    assert_eq!(tmp.entries(), ["ckpt"]);
}
