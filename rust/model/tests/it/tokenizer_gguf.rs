//! The tokenizers rebuilt from the two real GGUFs: round trips, known ids, special tokens,
//! fingerprints, and streaming detokenisation.
//!
//! The expected ids were produced by Hugging Face `tokenizers` 0.23.3 (Python) configured by
//! transformers 5.24's GGUF loader from the same files, with SmolLM2's pre-tokenizer set to its
//! `tokenizer.json` one (digits split, then byte-level). The model files live in the model cache
//! (`uhlm models fetch`); tests skip with a note when a file is absent.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use uhlm_model::stream::StreamDecoder;
use uhlm_model::tokenizer::Tokenizer;

fn model_file(name: &str) -> Option<PathBuf> {
    let dir = uhlm_model::fetch::models_dir().ok()?;
    let path = dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipping: {} is not in the model cache", path.display());
        None
    }
}

fn load(name: &str) -> Option<Tokenizer> {
    let path = model_file(name)?;
    let mut file = std::fs::File::open(&path).expect("open model");
    let content = gguf_file::Content::read(&mut file).expect("read gguf");
    Some(Tokenizer::from_gguf(&content).expect("tokenizer from gguf"))
}

fn smollm2() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| load("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .as_ref()
}

fn gemma3() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| load("gemma-3-270m-q4_k_m.gguf")).as_ref()
}

const ROUND_TRIP: &[&str] = &[
    "Hello world",
    "plain ascii, with punctuation!? (and brackets) [x] {y}",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "  two  spaces   three    four",
    "line one\nline two\n\nline four\r\nwindows",
    "\ttabbed\t\tcolumns\t",
    "Café naïve résumé über façade Ångström",
    "日本語のテキストと中文文本",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "   leading and trailing   ",
    "",
    "\u{E000}\u{10FFFD} private use",
];

fn check_round_trips(t: &Tokenizer) {
    for text in ROUND_TRIP {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(&t.decode(&ids, false).unwrap(), text, "ids {ids:?}");
        assert_eq!(&t.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn smollm2_round_trips() {
    let Some(t) = smollm2() else { return };
    check_round_trips(t);
}

#[test]
fn gemma3_round_trips() {
    let Some(t) = gemma3() else { return };
    check_round_trips(t);
}

#[test]
fn smollm2_known_ids() {
    let Some(t) = smollm2() else { return };
    assert_eq!(t.vocab_size(), 49152);
    // Structure visible in the vocabulary itself.
    let hello = t.encode("Hello", false).unwrap();
    assert_eq!(hello.len(), 1);
    assert_eq!(t.token_piece(hello[0]), Some("Hello"));
    let world = t.encode(" world", false).unwrap();
    assert_eq!(world.len(), 1);
    assert_eq!(t.token_piece(world[0]), Some("Ġworld"));
    assert_eq!(
        t.encode("Hello world", false).unwrap(),
        [hello[0], world[0]]
    );
    // The `smollm` pre-tokenizer splits digits one by one.
    let digits = t.encode("2024", false).unwrap();
    let pieces: Vec<_> = digits.iter().map(|&i| t.token_piece(i).unwrap()).collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
    // Reference ids (see the module docs).
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[19556, 905]),
        (
            "The year 2024 had 366 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
            ],
        ),
        (
            "  two  spaces\tand\ttabs\n\nnewlines\n",
            &[
                216, 827, 216, 5600, 197, 397, 197, 100, 7366, 198, 198, 2241, 5110, 198,
            ],
        ),
        (
            "Café naïve résumé über",
            &[
                51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 5549, 137, 593,
            ],
        ),
        (
            "日本語のテキスト",
            &[
                23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
                226,
            ],
        ),
        (
            "emoji 😀🎉👍🏽 done",
            &[
                391, 33777, 40303, 218, 10813, 232, 227, 10813, 235, 231, 10813, 233, 138, 2294,
            ],
        ),
        (
            "<|im_start|>user\nHi<|im_end|>\n",
            &[1, 4093, 198, 26843, 2, 198],
        ),
        (
            "fn main() { println!(\"x = {}\", 42); }",
            &[
                7853, 1085, 1000, 1662, 1628, 34115, 17, 1470, 104, 446, 4548, 1002, 216, 36, 34,
                4258, 4029,
            ],
        ),
        ("   leading and trailing   ", &[256, 2899, 284, 35079, 333]),
    ];
    for (text, ids) in cases {
        assert_eq!(&t.encode(text, false).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn smollm2_special_tokens() {
    let Some(t) = smollm2() else { return };
    let im_end = t.encode("<|im_end|>", false).unwrap();
    assert_eq!(im_end, [2]);
    assert!(t.is_special(2));
    assert!(t.eos_ids().contains(&2), "eos {:?}", t.eos_ids());
    assert!(
        t.eos_ids().contains(&0),
        "<|endoftext|> ends generation too"
    );
    assert_eq!(t.bos_id(), Some(1));
    // SmolLM2 declares add_bos_token = false.
    assert!(!t.adds_bos());
    assert_eq!(
        t.encode("Hi", true).unwrap(),
        t.encode("Hi", false).unwrap()
    );
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
}

#[test]
fn gemma3_known_ids() {
    let Some(t) = gemma3() else { return };
    assert_eq!(t.vocab_size(), 262144);
    let hello = t.encode("Hello", false).unwrap();
    assert_eq!(hello.len(), 1);
    assert_eq!(t.token_piece(hello[0]), Some("Hello"));
    let world = t.encode(" world", false).unwrap();
    assert_eq!(world.len(), 1);
    assert_eq!(t.token_piece(world[0]), Some("▁world"));
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[9259, 1902]),
        (
            "The year 2024 had 366 days.",
            &[
                818, 1051, 236743, 236778, 236771, 236778, 236812, 1053, 236743, 236800, 236825,
                236825, 2668, 236761,
            ],
        ),
        (
            "  two  spaces\tand\ttabs\n\nnewlines\n",
            &[
                138, 13498, 138, 35220, 255968, 624, 255968, 39218, 108, 208697, 107,
            ],
        ),
        (
            "Café naïve résumé über",
            &[160319, 236859, 120362, 118515, 8046],
        ),
        ("日本語のテキスト", &[94951, 236945, 95830]),
        (
            "emoji 😀🎉👍🏽 done",
            &[67906, 163543, 242061, 240493, 242713, 3028],
        ),
        (
            "<start_of_turn>user\nHi<end_of_turn>\n",
            &[105, 2364, 107, 10979, 106, 107],
        ),
        (
            "fn main() { println!(\"x = {}\", 42); }",
            &[
                15059, 1689, 825, 642, 32374, 36492, 236781, 578, 63288, 236743, 236812, 236778,
                626, 682,
            ],
        ),
        ("   leading and trailing   ", &[139, 26016, 532, 45330, 139]),
    ];
    for (text, ids) in cases {
        assert_eq!(&t.encode(text, false).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn gemma3_special_tokens_and_bos() {
    let Some(t) = gemma3() else { return };
    assert_eq!(t.bos_id(), Some(2));
    assert!(t.adds_bos());
    let ids = t.encode("Hi", true).unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(&ids[1..], &t.encode("Hi", false).unwrap()[..]);
    assert_eq!(t.decode(&ids, true).unwrap(), "Hi");
    assert_eq!(t.decode(&ids, false).unwrap(), "<bos>Hi");
    let end_of_turn = t.encode("<end_of_turn>", false).unwrap();
    assert_eq!(end_of_turn.len(), 1);
    assert!(t.eos_ids().contains(&end_of_turn[0]));
    assert!(t.eos_ids().contains(&1), "<eos>");
    // Characters outside the vocabulary fall back to `<0xXX>` byte tokens.
    let ids = t.encode("\u{10FFFD}", false).unwrap();
    let pieces: Vec<_> = ids.iter().map(|&i| t.token_piece(i).unwrap()).collect();
    assert_eq!(pieces, ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBD>"]);
}

#[test]
fn fingerprints_identify_the_vocabulary() {
    let (Some(s), Some(g)) = (smollm2(), gemma3()) else {
        return;
    };
    assert_ne!(s.fingerprint(), g.fingerprint());
    let again = load("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    assert_eq!(again.fingerprint(), s.fingerprint());
}

/// Feeds `ids` one by one; checks every event is complete text and the events add up to the
/// full decode.
fn check_stream(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut decoder = StreamDecoder::new();
    let mut events = Vec::new();
    for &id in ids {
        if let Some(text) = decoder.push(t, id) {
            assert!(!text.contains('\u{FFFD}'), "split character in {text:?}");
            events.push(text);
        }
    }
    events.extend(decoder.finish());
    assert_eq!(events.concat(), t.decode(ids, true).unwrap());
    events
}

#[test]
fn streaming_never_splits_a_character() {
    for t in [smollm2(), gemma3()].into_iter().flatten() {
        for text in ROUND_TRIP {
            let ids = t.encode(text, false).unwrap();
            check_stream(t, &ids);
        }
    }
}

#[test]
fn streaming_emoji_spelled_in_byte_tokens() {
    // Gemma: a character outside the vocabulary arrives as four `<0xXX>` tokens.
    if let Some(t) = gemma3() {
        let ids = t.encode("a\u{10FFFD}b", false).unwrap();
        assert!(ids.len() >= 6);
        let events = check_stream(t, &ids);
        assert!(events.iter().any(|e| e.contains('\u{10FFFD}')));
    }
    // SmolLM2: byte-level BPE spreads an emoji over several tokens.
    if let Some(t) = smollm2() {
        let ids = t.encode("🏽", false).unwrap();
        assert!(
            ids.len() > 1,
            "expected the emoji to span tokens, got {ids:?}"
        );
        let mut decoder = StreamDecoder::new();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(decoder.push(t, id), None, "emitted part of an emoji");
        }
        assert_eq!(decoder.push(t, ids[ids.len() - 1]).as_deref(), Some("🏽"));
        assert_eq!(decoder.finish(), None);
    }
}

#[test]
fn streaming_a_truncated_character_flushes_as_replacement() {
    let Some(t) = smollm2() else { return };
    let ids = t.encode("🏽", false).unwrap();
    let mut decoder = StreamDecoder::new();
    assert_eq!(decoder.push(t, ids[0]), None);
    assert!(decoder.pending_bytes() > 0);
    assert_eq!(decoder.finish().as_deref(), Some("\u{FFFD}"));
    assert_eq!(t.decode(&ids[..1], false).unwrap(), "\u{FFFD}");
}

#[test]
fn decode_rejects_unknown_ids() {
    let Some(t) = smollm2() else { return };
    assert!(t.decode(&[49152], false).is_err());
    assert_eq!(t.token_piece(49152), None);
}
