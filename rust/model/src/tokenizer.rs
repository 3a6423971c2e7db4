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
//!
//! This file holds the API and the `tokenizer.json` loader; `from_gguf` rebuilds a tokenizer
//! from GGUF metadata, `token_bytes` maps vocabulary pieces to the bytes they stand for.

mod from_gguf;
mod token_bytes;

use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;

use token_bytes::{byte_level_bytes, char_to_byte, spm_bytes};

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

impl Tokenizer {
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
