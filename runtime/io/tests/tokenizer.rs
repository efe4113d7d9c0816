//! The tokenizers behind `--tokenizer`: `bytes` and `gpt2` offline as before, and Hugging Face
//! `tokenizer.json` files through the `tokenizers` crate, here the two small fixtures in
//! `tests/fixtures/tokenizers/` (at the workspace's root):
//!
//! - `byte-level/`: a BPE on a byte-level alphabet with Llama 3's pre-tokenizer (its split
//!   expression, then bytes to printable characters), the same kind as GPT-2's, Llama 3's and
//!   Qwen2's; its special tokens come after the model's vocabulary, as in Llama 3, and its
//!   post-processor puts `<|begin_of_text|>` first.
//! - `metaspace/`: a SentencePiece-style BPE as Llama 2's is converted: `▁` for a space, byte
//!   fallback (`<0x00>`…`<0xFF>`) for characters outside the vocabulary, `<s>` first.
//!
//! Both are built by this file with the `tokenizers` crate, trained on [`CORPUS`]; to write them
//! again: `FERROTRON_WRITE_FIXTURES=1 cargo test -p ferrotron-io --test tokenizer fixtures`.

use ferrotron_io::tokenizer::{Tokenizer, TokenizerError};
use std::path::PathBuf;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, TokenizerBuilder, TokenizerImpl};

/// What the fixtures learnt their merges from.
const CORPUS: &str = "\
A tensor-parallel layer splits its weight matrices across the ranks of a group. The first \
linear layer of the feed-forward block is split by columns, the second by rows, so that one \
all-reduce at the end of the block sums the partial results. Attention is split by heads: \
each rank keeps its own queries, keys and values, and the output projection is split by rows.
The embedding is split by vocabulary: each rank holds a range of the rows, looks up the tokens \
that fall in it, and an all-reduce gathers the rest. The loss is computed on the split logits \
without gathering them, with one all-reduce for the maximum and one for the sum.
Pipeline parallelism puts consecutive layers on consecutive stages and sends activations \
forward and gradients backward between them, one micro-batch at a time; data parallelism \
replicates the whole model and averages the gradients of the replicas after every step.
In 2019, 8 GPUs trained a model of 8.3 billion parameters; the plan for 512 GPUs was the same.
";

/// Llama 3's pre-tokenizing split (contractions, words, groups of up to three digits,
/// punctuation, line breaks, other spaces).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

type Builder = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

fn special(text: &str) -> AddedToken {
    AddedToken::from(text.to_owned(), true)
}

/// The byte-level fixture's `tokenizer.json`.
fn byte_level_json() -> String {
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .expect("Llama 3's expression compiles");
    let pre = PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ]);
    let mut tk: Builder = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(pre.into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .expect("the tokenizer builds");
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(320)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tk.train(&mut trainer, CORPUS.lines())
        .expect("the BPE trains");
    // After the model's vocabulary, as Llama 3's 128,000 + 256 are.
    tk.add_special_tokens([special("<|begin_of_text|>"), special("<|end_of_text|>")])
        .expect("special tokens added");
    let bos = tk.token_to_id("<|begin_of_text|>").expect("just added");
    let post = TemplateProcessing::builder()
        .try_single("<|begin_of_text|> $A")
        .expect("template")
        .try_pair("<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1")
        .expect("template")
        .special_tokens(vec![("<|begin_of_text|>", bos)])
        .build()
        .expect("template");
    tk.with_post_processor(Some(post));
    tk.to_string(true).expect("serializes")
}

/// The SentencePiece-style fixture's `tokenizer.json`: trained on `▁`-marked words, then given
/// `<unk>`, `<s>`, `</s>` and the 256 byte tokens first, as Llama 2's vocabulary has them.
fn metaspace_json() -> String {
    let metaspace = Metaspace::new('▁', PrependScheme::First, true);
    let mut tk: Builder = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(metaspace.clone().into()))
        .build()
        .expect("the tokenizer builds");
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(200)
        .min_frequency(2)
        .build();
    tk.train(&mut trainer, CORPUS.lines())
        .expect("the BPE trains");
    let learnt: serde_json::Value =
        serde_json::from_str(&tk.to_string(false).expect("serializes")).expect("JSON");
    let mut pieces: Vec<(String, u32)> = learnt["model"]["vocab"]
        .as_object()
        .expect("a vocabulary")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("an id") as u32))
        .collect();
    pieces.sort_by_key(|p| p.1);
    let merges: Vec<(String, String)> = learnt["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| {
            let pair = m.as_array().expect("a pair");
            let side = |i: usize| pair[i].as_str().expect("a string").to_owned();
            (side(0), side(1))
        })
        .collect();
    let mut order: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    order.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    order.extend(pieces.into_iter().map(|p| p.0));
    let vocab: Vocab = order
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .expect("the BPE builds");
    let decoder = DecoderSequence::new(vec![
        Replace::new("▁", " ").expect("pattern").into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ]);
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .expect("template")
        .try_pair("<s> $A:0 <s>:1 $B:1")
        .expect("template")
        .special_tokens(vec![("<s>", 1)])
        .build()
        .expect("template");
    let mut tk: Builder = TokenizerBuilder::new()
        .with_model(bpe)
        .with_pre_tokenizer(Some(metaspace.into()))
        .with_post_processor(Some(post.into()))
        .with_decoder(Some(decoder.into()))
        .build()
        .expect("the tokenizer builds");
    tk.add_special_tokens([special("<unk>"), special("<s>"), special("</s>")])
        .expect("special tokens added");
    tk.to_string(true).expect("serializes")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers")
}

fn fixture(name: &str) -> Tokenizer {
    let dir = fixtures().join(name);
    Tokenizer::named(dir.to_str().expect("a UTF-8 path")).expect("the fixture loads")
}

/// The committed fixtures are what the builders make (training is deterministic), so they can
/// be made again: with `FERROTRON_WRITE_FIXTURES=1` this writes them instead of comparing.
#[test]
fn the_fixtures_are_what_the_builders_make() {
    let write = std::env::var_os("FERROTRON_WRITE_FIXTURES").is_some();
    for (name, json) in [
        ("byte-level", byte_level_json()),
        ("metaspace", metaspace_json()),
    ] {
        let dir = fixtures().join(name);
        let file = dir.join("tokenizer.json");
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&file, json + "\n").unwrap();
            continue;
        }
        let committed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let built: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(
            committed == built,
            "{} differs from what the builder makes (FERROTRON_WRITE_FIXTURES=1 rewrites it)",
            file.display()
        );
    }
}

const TEXTS: [&str; 5] = [
    "The embedding is split by vocabulary.",
    "pipeline stages, 512 GPUs and 8.3 billion parameters",
    "tabs\tand  spaces,\nline breaks\n\n",
    "Unseen: Straße, 東京, ünïcödé and 🦀!",
    "",
];

#[test]
fn text_round_trips_through_every_fixture() {
    for name in ["byte-level", "metaspace"] {
        let t = fixture(name);
        for text in TEXTS {
            let ids = t.encode(text).unwrap();
            assert!(
                ids.iter().all(|&id| u64::from(id) < t.vocabulary()),
                "{name}: {ids:?}"
            );
            assert_eq!(t.decode(&ids), text, "{name}: {ids:?}");
        }
    }
}

#[test]
fn the_byte_level_fixture_merges_words_and_starts_with_its_bos() {
    let t = fixture("byte-level");
    let ids = t.encode("The embedding is split by vocabulary").unwrap();
    let bos = t.encode("").unwrap();
    assert_eq!(bos.len(), 1, "the post-processor adds only the BOS");
    assert_eq!(ids[0], bos[0]);
    // Special tokens come after the model's vocabulary, so the BOS is the largest id.
    assert_eq!(u64::from(bos[0]) + 2, t.vocabulary());
    // Merges learnt: fewer tokens than bytes.
    assert!(
        ids.len() < "The embedding is split by vocabulary".len(),
        "{ids:?}"
    );
    // Literal special-token text is that token, as in the `tokenizers` crate.
    let literal = t.encode("<|begin_of_text|>").unwrap();
    assert_eq!(literal, [bos[0], bos[0]]);
    assert_eq!(t.decode(&literal), "");
}

#[test]
fn the_metaspace_fixture_falls_back_to_bytes_and_starts_with_s() {
    let t = fixture("metaspace");
    let ids = t.encode("the rank").unwrap();
    assert_eq!(ids[0], 1, "<s> first");
    // `é` is not in the corpus: its two UTF-8 bytes, as <0xC3> <0xA9> (ids 3 + byte).
    let ids = t.encode("é").unwrap();
    assert!(
        ids.ends_with(&[3 + 0xC3, 3 + 0xA9]),
        "byte fallback: {ids:?}"
    );
    assert_eq!(t.decode(&ids), "é");
    // As with SentencePiece (and Llama 2): the decoder takes away the space the pre-tokenizer
    // put before the first word, and with it one space a text starts with.
    assert_eq!(t.decode(&t.encode("  two").unwrap()), " two");
}

#[test]
fn the_vocabulary_check_names_both_sizes() {
    for name in ["byte-level", "metaspace"] {
        let t = fixture(name);
        let needs = t.vocabulary();
        t.check(needs).unwrap();
        t.check(needs + 37).unwrap();
        let e = t.check(needs - 1).unwrap_err();
        assert!(matches!(e, TokenizerError::Vocabulary { .. }));
        let message = e.to_string();
        assert!(
            message.contains(&format!("at least {needs}"))
                && message.contains(&format!("the model has {}", needs - 1))
                && message.contains("tokenizer.json"),
            "{message}"
        );
    }
}

#[test]
fn ids_outside_the_tokenizer_decode_to_nothing() {
    let t = fixture("byte-level");
    let mut ids = t.encode("the rank").unwrap();
    let vocabulary = t.vocabulary() as u32;
    ids.extend([vocabulary, vocabulary + 100]);
    assert_eq!(t.decode(&ids), "the rank");
}

#[test]
fn missing_and_invalid_tokenizer_files_are_named() {
    let dir = std::env::temp_dir().join(format!("ferrotron-bad-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shown = dir.to_str().unwrap();

    let e = Tokenizer::named(shown).err().unwrap();
    assert!(matches!(e, TokenizerError::Missing(_)), "{e}");
    assert!(e.to_string().contains("no tokenizer.json"), "{e}");

    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::named(shown).err().unwrap();
    assert!(matches!(e, TokenizerError::Invalid { .. }), "{e}");
    assert!(
        e.to_string().contains("tokenizer.json: not a readable"),
        "{e}"
    );

    std::fs::write(dir.join("tokenizer.json"), "not JSON").unwrap();
    let file = dir.join("tokenizer.json");
    let e = Tokenizer::named(file.to_str().unwrap()).err().unwrap();
    assert!(matches!(e, TokenizerError::Invalid { .. }), "{e}");

    let e = Tokenizer::named("gpt3").err().unwrap();
    assert!(matches!(e, TokenizerError::Unknown(_)), "{e}");
    assert!(e.to_string().contains("`bytes`, `gpt2`"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bytes_and_gpt2_work_offline_as_before() {
    let bytes = Tokenizer::named("bytes").unwrap();
    assert_eq!(bytes.encode("Hi").unwrap(), [72, 105]);
    assert_eq!(bytes.vocabulary(), 256);
    assert_eq!(bytes.name(), "bytes");
    let gpt2 = Tokenizer::named("gpt2").unwrap();
    assert_eq!(gpt2.encode("Hello world").unwrap(), [15496, 995]);
    assert_eq!(gpt2.decode(&[15496, 995]), "Hello world");
    assert_eq!(gpt2.vocabulary(), 50_257);
    let e = gpt2.check(50_000).unwrap_err().to_string();
    assert!(e.contains("50257") && e.contains("50000"), "{e}");
}
