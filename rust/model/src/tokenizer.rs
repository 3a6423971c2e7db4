//! Tokenizers rebuilt from GGUF metadata (or loaded from a `tokenizer.json`).
//!
//! A GGUF carries no `tokenizer.json`, only llama.cpp's description of the vocabulary. We rebuild
//! the Hugging Face tokenizer it stands for with the `tokenizers` crate, configured the way the
//! model's reference `tokenizer.json` is (the same recipe transformers uses to load GGUF files):
//!
//! - `gpt2` (byte-level BPE, e.g. SmolLM2): the file's merges, the pre-tokenizer named by
//!   `tokenizer.ggml.pre`, control tokens as special tokens.
//! - `llama` (SentencePiece BPE, e.g. Gemma 3): merges recovered from the vocabulary, byte
//!   fallback through the `<0xXX>` tokens, spaces spelled `▁`.
//!
//! Decoding does not go through `tokenizers`: every id maps to the exact bytes it stands for, so
//! a stream of ids can be turned into text byte-exactly and incrementally (see [`crate::stream`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata has no `{0}`")]
    MissingKey(String),
    #[error("GGUF metadata `{key}` is malformed: {reason}")]
    BadValue { key: String, reason: String },
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error(
        "unsupported byte-level pre-tokenizer `{0}` (supported: smollm, starcoder, refact, gpt2, default, llama3, llama-bpe, qwen2)"
    )]
    UnsupportedPreTokenizer(String),
    #[error("building the tokenizer failed: {0}")]
    Build(#[source] tokenizers::Error),
    #[error("loading tokenizer file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error("encoding failed: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("reading GGUF metadata from {path}: {reason}")]
    Gguf { path: String, reason: String },
    #[error("token id {id} is outside the vocabulary ({vocab_size} tokens)")]
    UnknownId { id: u32, vocab_size: usize },
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// Tokens that end a chat turn; generation stops on them as well as on the declared EOS.
const TURN_END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<eos>",
    "</s>",
];

/// SentencePiece's visible space.
const SPM_SPACE: char = '\u{2581}';

/// Splits digits one by one, then the GPT-2 pattern (llama.cpp's `smollm`/`starcoder` pre-tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split as llama.cpp runs it (`unicode_regex_split_custom_qwen2`), which differs from
/// the `tokenizer.json` regex in two ways: contractions match ASCII letters only (`'ſ` is no
/// `'s`), and letters and digits are those of llama.cpp's Unicode 15.1 tables (characters added
/// in Unicode 16 count as punctuation there, so `\p{L}`/`\p{N}` are limited to Age ≤ 15.1).
const QWEN2_SPLIT: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
    r"|[^\r\n[\p{L}\p{N}&&\p{Age=V15_1}]]?[\p{L}&&\p{Age=V15_1}]+",
    r"|[\p{N}&&\p{Age=V15_1}]",
    r"| ?[^\s[\p{L}\p{N}&&\p{Age=V15_1}]]+[\r\n]*",
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// A text ⇄ token-id mapping for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Token strings as the vocabulary spells them (`Ġworld`, `▁world`, `<0x0A>`).
    pieces: Vec<String>,
    /// The exact bytes each id decodes to.
    bytes: Vec<Box<[u8]>>,
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Vec<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    /// Prepend BOS ourselves on `encode(.., add_special = true)` (GGUF path).
    add_bos: bool,
    /// Let `tokenizers`' post-processor add special tokens (`tokenizer.json` path).
    post_processor_specials: bool,
    /// SentencePiece models that prepend a space to the text drop it again when decoding.
    strip_leading_space: bool,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// The vocabulary part of a GGUF, read once.
struct GgufVocab {
    model: String,
    pre: Option<String>,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Option<Vec<String>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    add_space_prefix: Option<bool>,
    architecture: Option<String>,
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    content.metadata.get(key)
}

fn bad(key: &str, reason: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::BadValue {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn string_array(
    content: &gguf_file::Content,
    key: &str,
) -> Result<Option<Vec<String>>, TokenizerError> {
    let Some(value) = meta(content, key) else {
        return Ok(None);
    };
    let items = value.to_vec().map_err(|e| bad(key, e))?;
    items
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn opt_u32(content: &gguf_file::Content, key: &str) -> Result<Option<u32>, TokenizerError> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_u32()
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map(Some)
            .map_err(|e| bad(key, e)),
    }
}

fn opt_bool(content: &gguf_file::Content, key: &str) -> Result<Option<bool>, TokenizerError> {
    meta(content, key)
        .map(|v| v.to_bool().map_err(|e| bad(key, e)))
        .transpose()
}

fn opt_string(content: &gguf_file::Content, key: &str) -> Result<Option<String>, TokenizerError> {
    meta(content, key)
        .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
        .transpose()
}

impl GgufVocab {
    fn read(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let model = opt_string(content, "tokenizer.ggml.model")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;
        let tokens = string_array(content, "tokenizer.ggml.tokens")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.tokens".into()))?;
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens", "empty vocabulary"));
        }
        let types = match meta(content, "tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => {
                let key = "tokenizer.ggml.token_type";
                let items = v.to_vec().map_err(|e| bad(key, e))?;
                let types = items
                    .iter()
                    .map(|t| t.to_i32().or_else(|_| t.to_u32().map(|x| x as i32)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(key, e))?;
                if types.len() != tokens.len() {
                    return Err(bad(
                        key,
                        format!("{} types for {} tokens", types.len(), tokens.len()),
                    ));
                }
                types
            }
        };
        let vocab = Self {
            model,
            pre: opt_string(content, "tokenizer.ggml.pre")?,
            merges: string_array(content, "tokenizer.ggml.merges")?,
            bos: opt_u32(content, "tokenizer.ggml.bos_token_id")?,
            eos: opt_u32(content, "tokenizer.ggml.eos_token_id")?,
            unk: opt_u32(content, "tokenizer.ggml.unknown_token_id")?,
            pad: opt_u32(content, "tokenizer.ggml.padding_token_id")?,
            add_bos: opt_bool(content, "tokenizer.ggml.add_bos_token")?,
            add_space_prefix: opt_bool(content, "tokenizer.ggml.add_space_prefix")?,
            architecture: opt_string(content, "general.architecture")?,
            tokens,
            types,
        };
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", vocab.bos),
            ("tokenizer.ggml.eos_token_id", vocab.eos),
            ("tokenizer.ggml.unknown_token_id", vocab.unk),
            ("tokenizer.ggml.padding_token_id", vocab.pad),
        ] {
            if let Some(id) = id
                && id as usize >= vocab.tokens.len()
            {
                return Err(bad(key, format!("id {id} outside the vocabulary")));
            }
        }
        Ok(vocab)
    }
}

/// GPT-2's reversible byte → printable-character table.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    table
}

fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// Bytes of a byte-level BPE piece (`Ġworld` → ` world`).
fn byte_level_bytes(piece: &str, table: &HashMap<char, u8>) -> Box<[u8]> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.into_boxed_slice()
}

/// `<0xAB>` → `0xAB`.
fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes of a SentencePiece piece (`▁world` → ` world`, `<0x0A>` → `\n`).
fn spm_bytes(piece: &str, is_byte_token: bool) -> Box<[u8]> {
    if is_byte_token && let Some(b) = parse_byte_token(piece) {
        return Box::new([b]);
    }
    piece
        .replace(SPM_SPACE, " ")
        .into_bytes()
        .into_boxed_slice()
}

fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let regex_split = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        // SmolLM2's tokenizer.json: digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" => Ok(PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "gpt2" | "default" | "gpt-2" => Ok(ByteLevel::new(false, true, true).into()),
        "llama3" | "llama-v3" | "llama-bpe" => regex_split(LLAMA3_SPLIT),
        "qwen2" => regex_split(QWEN2_SPLIT),
        other => Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    }
}

/// Merges implied by a SentencePiece BPE vocabulary: every split of a token into two tokens,
/// best token first. Gemma ranks by position in the file (its scores do not follow merge order);
/// within one token, longer left halves first (transformers' `generate_merges`).
fn merges_from_vocab(tokens: &[String], vocab: &Vocab) -> Merges {
    let mut merges = Merges::new();
    for token in tokens {
        let mut local: Vec<(&str, &str)> = Vec::new();
        for (split, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(split);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l, r));
            }
        }
        local.reverse();
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (l.to_string(), r.to_string())),
        );
    }
    merges
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file's metadata describes.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let v = GgufVocab::read(content)?;
        match v.model.as_str() {
            "gpt2" => Self::byte_level_from_gguf(v),
            "llama" => Self::sentencepiece_from_gguf(v),
            other => Err(TokenizerError::UnsupportedModel(other.to_string())),
        }
    }

    /// Reads only the metadata of the GGUF at `path` (no weights) and builds its tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let gguf_err = |reason: String| TokenizerError::Gguf {
            path: path.display().to_string(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|e| gguf_err(e.to_string()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| gguf_err(e.to_string()))?;
        Self::from_gguf(&content)
    }

    fn byte_level_from_gguf(v: GgufVocab) -> Result<Self, TokenizerError> {
        let pre = byte_level_pre_tokenizer(v.pre.as_deref().unwrap_or("default"))?;
        let alphabet: std::collections::HashSet<char> = byte_to_char().into_iter().collect();
        let mut vocab = Vocab::default();
        for (id, token) in v.tokens.iter().enumerate() {
            let spelled = if token.chars().all(|c| alphabet.contains(&c)) {
                token.clone()
            } else {
                let table = byte_to_char();
                token.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(spelled, id as u32);
        }
        let merges = v
            .merges
            .as_ref()
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.merges".into()))?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        bad("tokenizer.ggml.merges", format!("merge `{m}` has no space"))
                    })
            })
            .collect::<Result<Merges, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(TokenizerError::Build)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it
        // would grow the vocabulary past what the model expects.
        let special: Vec<bool> = v
            .tokens
            .iter()
            .zip(&v.types)
            .map(|(t, &ty)| ty == TOKEN_TYPE_CONTROL && t.chars().all(|c| alphabet.contains(&c)))
            .collect();
        add_gguf_added_tokens(&mut inner, &v, &special)?;
        let table = char_to_byte();
        let bytes = v
            .tokens
            .iter()
            .zip(&v.types)
            .map(|(t, &ty)| {
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    t.as_bytes().into()
                } else {
                    byte_level_bytes(t, &table)
                }
            })
            .collect();
        Ok(Self::assemble(inner, v, bytes, special, false))
    }

    fn sentencepiece_from_gguf(v: GgufVocab) -> Result<Self, TokenizerError> {
        let gemma = v
            .architecture
            .as_deref()
            .is_some_and(|a| a.starts_with("gemma"));
        // Gemma files store tokens of 2+ spaces as real spaces; the BPE model sees `▁`.
        let spelled: Vec<String> = v
            .tokens
            .iter()
            .map(|t| {
                if gemma && t.contains(' ') && t.trim().is_empty() {
                    SPM_SPACE.to_string().repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut vocab = Vocab::default();
        for (id, token) in spelled.iter().enumerate() {
            vocab.insert(token.clone(), id as u32);
        }
        let merges = match &v.merges {
            Some(m) => m
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| {
                            bad("tokenizer.ggml.merges", format!("merge `{m}` has no space"))
                        })
                })
                .collect::<Result<Merges, _>>()?,
            None => merges_from_vocab(&spelled, &vocab),
        };
        let unk = v.unk.map(|id| spelled[id as usize].clone());
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(TokenizerError::Build)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace: NormalizerWrapper = Replace::new(" ", SPM_SPACE.to_string())
            .map_err(TokenizerError::Build)?
            .into();
        // llama.cpp prepends a space unless the file says otherwise; Gemma says otherwise.
        let space_prefix = v.add_space_prefix.unwrap_or(!gemma);
        let normalizer: NormalizerWrapper = if space_prefix {
            NormSequence::new(vec![Prepend::new(SPM_SPACE.to_string()).into(), replace]).into()
        } else {
            replace
        };
        inner
            .with_normalizer(Some(normalizer))
            .map_err(TokenizerError::Build)?;
        let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
            .map_err(TokenizerError::Build)?;
        inner.with_pre_tokenizer(Some(split));
        let special: Vec<bool> = v.types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect();
        add_gguf_added_tokens(&mut inner, &v, &special)?;
        let bytes = v
            .tokens
            .iter()
            .zip(&v.types)
            .map(|(t, &ty)| spm_bytes(t, ty == TOKEN_TYPE_BYTE))
            .collect();
        Ok(Self::assemble(inner, v, bytes, special, space_prefix))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        v: GgufVocab,
        bytes: Vec<Box<[u8]>>,
        special: Vec<bool>,
        strip_leading_space: bool,
    ) -> Self {
        // llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
        let add_bos = v.add_bos.unwrap_or(v.model == "llama") && v.bos.is_some();
        let eos = collect_eos(v.eos, &v.tokens, &special);
        let fingerprint = fingerprint(&v.tokens, v.bos, &eos, v.unk, v.pad);
        Self {
            inner,
            pieces: v.tokens,
            bytes,
            special,
            bos: v.bos,
            eos,
            unk: v.unk,
            pad: v.pad,
            add_bos,
            post_processor_specials: false,
            strip_leading_space,
            fingerprint,
        }
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::File {
                path: path.display().to_string(),
                source,
            })?;
        let size = inner.get_vocab_size(true);
        let pieces: Vec<String> = (0..size as u32)
            .map(|id| inner.id_to_token(id).unwrap_or_default())
            .collect();
        let added = inner.get_added_tokens_decoder();
        let special: Vec<bool> = (0..size as u32)
            .map(|id| added.get(&id).is_some_and(|t| t.special))
            .collect();
        let byte_level = decoder_is_byte_level(inner.get_decoder());
        let table = char_to_byte();
        let bytes = pieces
            .iter()
            .enumerate()
            .map(|(id, p)| {
                if added.contains_key(&(id as u32)) {
                    p.as_bytes().into()
                } else if byte_level {
                    byte_level_bytes(p, &table)
                } else {
                    spm_bytes(p, true)
                }
            })
            .collect();
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&["<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>"]);
        let unk = find(&["<unk>", "<|unk|>"]);
        let pad = find(&["<pad>", "<|pad|>"]);
        let eos = collect_eos(None, &pieces, &special);
        let fingerprint = fingerprint(&pieces, bos, &eos, unk, pad);
        Ok(Self {
            inner,
            pieces,
            bytes,
            special,
            bos,
            eos,
            unk,
            pad,
            add_bos: false,
            post_processor_specials: true,
            strip_leading_space: false,
            fingerprint,
        })
    }

    /// Token ids of `text`; `add_special` adds what the model expects around a prompt (BOS).
    /// Special tokens written in the text (`<|im_start|>`) are always recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special && self.post_processor_specials)
            .map_err(TokenizerError::Encode)?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// The bytes `id` stands for (`None` outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).map(|b| &b[..])
    }

    /// Text of `ids`; `skip_special` drops control tokens such as `<|im_end|>`. Invalid UTF-8
    /// (a sequence cut inside a character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut buf = Vec::new();
        for &id in ids {
            let bytes = self.token_bytes(id).ok_or(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            })?;
            if skip_special && self.is_special(id) {
                continue;
            }
            buf.extend_from_slice(bytes);
        }
        if self.strip_leading_space && buf.first() == Some(&b' ') {
            buf.remove(0);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The token's string as the vocabulary spells it (`Ġworld`, `▁world`, `<0x0A>`).
    pub fn token_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Id of a token spelled exactly `piece`, as the vocabulary spells it.
    pub fn piece_id(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|p| p == piece)
            .map(|i| i as u32)
    }

    /// Number of token ids (the model's output width).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end a generation: the declared EOS and the chat turn terminators present in the
    /// vocabulary as control tokens.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// A control token (never part of the visible text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether decoding drops the space a SentencePiece normaliser prepended to the text.
    pub fn strips_leading_space(&self) -> bool {
        self.strip_leading_space
    }

    /// SHA-256 over the vocabulary and its special ids: two models can share token ids (draft
    /// and target) exactly when their fingerprints match.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

fn decoder_is_byte_level(decoder: Option<&DecoderWrapper>) -> bool {
    match decoder {
        Some(DecoderWrapper::ByteLevel(_)) => true,
        Some(DecoderWrapper::Sequence(seq)) => seq
            .get_decoders()
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
        _ => false,
    }
}

/// Control tokens become special added tokens (kept whole, skippable on decode); user-defined
/// ones become plain added tokens, which llama.cpp also always matches whole.
fn add_gguf_added_tokens(
    inner: &mut tokenizers::Tokenizer,
    v: &GgufVocab,
    special: &[bool],
) -> Result<(), TokenizerError> {
    let control: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(special)
        .filter(|(_, s)| **s)
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner
        .add_special_tokens(control)
        .map_err(TokenizerError::Build)?;
    let user: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.types)
        .filter(|(t, ty)| {
            **ty == TOKEN_TYPE_USER_DEFINED && inner.get_model().token_to_id(t).is_some()
        })
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(user).map_err(TokenizerError::Build)?;
    Ok(())
}

fn collect_eos(declared: Option<u32>, pieces: &[String], special: &[bool]) -> Vec<u32> {
    let mut eos: Vec<u32> = declared.into_iter().collect();
    for name in TURN_END_TOKENS {
        if let Some(id) = pieces.iter().position(|p| p == name) {
            let id = id as u32;
            if special.get(id as usize).copied().unwrap_or(false) && !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    eos
}

fn fingerprint(
    pieces: &[String],
    bos: Option<u32>,
    eos: &[u32],
    unk: Option<u32>,
    pad: Option<u32>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"uhlm-vocab-v1");
    h.update((pieces.len() as u64).to_le_bytes());
    for p in pieces {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let opt = |id: Option<u32>| id.map_or(u64::MAX, u64::from).to_le_bytes();
    h.update(opt(bos));
    h.update(opt(unk));
    h.update(opt(pad));
    h.update((eos.len() as u64).to_le_bytes());
    for &e in eos {
        h.update(e.to_le_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_to_char();
        let inverse = char_to_byte();
        assert_eq!(inverse.len(), 256);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        for b in 0..=255u8 {
            assert_eq!(inverse[&table[b as usize]], b);
        }
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xFF>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("<unk>"), None);
        assert_eq!(&*spm_bytes("▁hello▁you", false), b" hello you");
    }

    #[test]
    fn merges_prefer_earlier_tokens_then_longer_left_halves() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let merges = merges_from_vocab(&tokens, &vocab);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        assert!(matches!(
            byte_level_pre_tokenizer("no-such-pre"),
            Err(TokenizerError::UnsupportedPreTokenizer(_))
        ));
        assert!(byte_level_pre_tokenizer("smollm").is_ok());
        assert!(byte_level_pre_tokenizer("llama-bpe").is_ok());
    }
}
