//! Rebuilding the Hugging Face tokenizer a GGUF's metadata describes (llama.cpp's description
//! of the vocabulary), configured the way the model's reference `tokenizer.json` is: byte-level
//! BPE for `gpt2` vocabularies, SentencePiece BPE for `llama` ones.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

use super::token_bytes::{SPM_SPACE, byte_level_bytes, byte_to_char, char_to_byte, spm_bytes};
use super::{Tokenizer, TokenizerError, collect_eos, fingerprint};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

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
/// `tokenizer.ggml.merges`: each entry the two halves of a merge, separated by a space.
fn parse_merges(merges: &[String]) -> Result<Merges, TokenizerError> {
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad("tokenizer.ggml.merges", format!("merge `{m}` has no space")))
        })
        .collect()
}

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
        let merges = parse_merges(
            v.merges
                .as_ref()
                .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.merges".into()))?,
        )?;
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
            Some(m) => parse_merges(m)?,
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

#[cfg(test)]
mod tests {
    use tokenizers::models::bpe::Vocab;

    use super::*;

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
