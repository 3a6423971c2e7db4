//! The compressed next-token distribution a device sends uplink.
//!
//! [`encode`] returns the bytes *and* `q'`, the distribution the server will decode from them,
//! computed by the very same [`decode`] routine. The device samples its draft from `q'`, so the
//! server verifies against exactly the distribution the draft came from, and verification stays
//! exact however hard the uplink is compressed. (CU-HLM's uniform-tail scheme is kept as a
//! baseline: there the device samples from its own uncompressed `q`, which is not exact.)
//!
//! Layout (see docs/PROTOCOL.md): tag byte, varint vocabulary size, then
//! - dense f32 / f16: every value little-endian;
//! - sparse: weight width (1 or 2 bytes), varint count, ascending ids delta-encoded as varints,
//!   then integer weights `w_i >= 1`; `q'_i = w_i / sum(w)`;
//! - sparse with uniform tail: the same, then an f32 tail mass spread over all other ids.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

const TAG_DENSE_F32: u8 = 0;
const TAG_DENSE_F16: u8 = 1;
const TAG_SPARSE: u8 = 2;
const TAG_SPARSE_UNIFORM_TAIL: u8 = 3;

/// The largest vocabulary a decoder accepts (gemma3's is 262,144); bounds decoder allocations.
pub const MAX_VOCAB: usize = 1 << 20;

/// Precision of the sparse weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    U8,
    U16,
}

impl Precision {
    fn levels(self) -> f64 {
        match self {
            Precision::U8 => u8::MAX as f64,
            Precision::U16 => u16::MAX as f64,
        }
    }

    fn width(self) -> u8 {
        match self {
            Precision::U8 => 1,
            Precision::U16 => 2,
        }
    }
}

/// Which compression of the distribution goes uplink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Codec {
    /// Every probability as f32: the papers' HLM baseline.
    DenseF32,
    /// Every probability as f16.
    DenseF16,
    /// The `k` most likely tokens.
    TopK { k: u32, precision: Precision },
    /// The smallest set of most likely tokens whose mass reaches `p`, at most `max_k` tokens.
    TopP {
        p: f32,
        max_k: u32,
        precision: Precision,
    },
    /// The `k` most likely tokens, extended (up to `max_k`) until their mass reaches `min_mass`.
    TopKFloor {
        k: u32,
        min_mass: f32,
        max_k: u32,
        precision: Precision,
    },
    /// CU-HLM's scheme: top-`k` plus the remaining mass spread uniformly over the other tokens.
    /// A baseline only: the paper's device samples from its own `q`, not from this.
    TopKUniformTail { k: u32 },
}

impl Default for Codec {
    fn default() -> Self {
        Codec::TopKFloor {
            k: 16,
            min_mass: 0.95,
            max_k: 128,
            precision: Precision::U16,
        }
    }
}

/// Invalid codec parameters or an undecodable payload.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum CodecError {
    #[error("the distribution is empty")]
    Empty,
    #[error("the distribution has {0} entries, more than the supported {MAX_VOCAB}")]
    VocabTooLarge(usize),
    #[error("the distribution has no positive finite mass")]
    NoMass,
    #[error("invalid codec parameters: {0}")]
    InvalidParameters(String),
    #[error("cannot parse codec {spec:?}: {reason}")]
    Parse { spec: String, reason: String },
    #[error("payload ends early while reading {0}")]
    Truncated(&'static str),
    #[error("unknown codec tag {0}")]
    UnknownTag(u8),
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("payload is for a vocabulary of {got} tokens, expected {expected}")]
    VocabMismatch { got: usize, expected: usize },
}

/// The bytes that go uplink and the distribution the server decodes from them.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// What the server will decode: sample the draft from this.
    pub q_prime: Vec<f32>,
}

impl Codec {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), CodecError> {
        let bad = |m: String| Err(CodecError::InvalidParameters(m));
        match *self {
            Codec::DenseF32 | Codec::DenseF16 => Ok(()),
            Codec::TopK { k, .. } | Codec::TopKUniformTail { k } if k == 0 => {
                bad("k must be at least 1".into())
            }
            Codec::TopK { .. } | Codec::TopKUniformTail { .. } => Ok(()),
            Codec::TopP { p, max_k, .. } => {
                if !(p > 0.0 && p <= 1.0) {
                    bad(format!("p must be in (0, 1], got {p}"))
                } else if max_k == 0 {
                    bad("max_k must be at least 1".into())
                } else {
                    Ok(())
                }
            }
            Codec::TopKFloor {
                k, min_mass, max_k, ..
            } => {
                if k == 0 || max_k < k {
                    bad(format!("need 1 <= k <= max_k, got k={k}, max_k={max_k}"))
                } else if !(min_mass > 0.0 && min_mass <= 1.0) {
                    bad(format!("min_mass must be in (0, 1], got {min_mass}"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Whether the decoded distribution is what the device samples from (every codec but the
    /// CU-HLM baseline).
    pub fn is_exact(&self) -> bool {
        !matches!(self, Codec::TopKUniformTail { .. })
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prec = |p: &Precision| match p {
            Precision::U8 => "",
            Precision::U16 => ":u16",
        };
        match self {
            Codec::DenseF32 => write!(f, "dense-f32"),
            Codec::DenseF16 => write!(f, "dense-f16"),
            Codec::TopK { k, precision } => write!(f, "topk:{k}{}", prec(precision)),
            Codec::TopP {
                p,
                max_k,
                precision,
            } => write!(f, "topp:{p}:{max_k}{}", prec(precision)),
            Codec::TopKFloor {
                k,
                min_mass,
                max_k,
                precision,
            } => write!(f, "topk-floor:{k}:{min_mass}:{max_k}{}", prec(precision)),
            Codec::TopKUniformTail { k } => write!(f, "cuhlm:{k}"),
        }
    }
}

/// Parses the CLI spelling: `dense-f32`, `dense-f16`, `topk:K[:u16]`, `topp:P[:MAX_K][:u16]`,
/// `topk-floor:K:MIN_MASS[:MAX_K][:u16]`, `cuhlm:K`. Sparse weights default to u8.
impl FromStr for Codec {
    type Err = CodecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| CodecError::Parse {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<&str> = spec.trim().split(':').collect();
        let precision = match parts.last() {
            Some(&"u16") => {
                parts.pop();
                Precision::U16
            }
            Some(&"u8") => {
                parts.pop();
                Precision::U8
            }
            _ => Precision::U8,
        };
        let num = |i: usize, what: &str| -> Result<f64, CodecError> {
            parts
                .get(i)
                .ok_or_else(|| err(&format!("missing {what}")))?
                .parse::<f64>()
                .map_err(|_| err(&format!("{what} is not a number")))
        };
        let int = |i: usize, what: &str| -> Result<u32, CodecError> {
            let v = num(i, what)?;
            if v.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&v) {
                return Err(err(&format!("{what} must be a whole number")));
            }
            Ok(v as u32)
        };
        let codec = match parts[0] {
            "dense-f32" | "dense" => Codec::DenseF32,
            "dense-f16" => Codec::DenseF16,
            "topk" => Codec::TopK {
                k: int(1, "k")?,
                precision,
            },
            "topp" => Codec::TopP {
                p: num(1, "p")? as f32,
                max_k: if parts.len() > 2 {
                    int(2, "max_k")?
                } else {
                    1024
                },
                precision,
            },
            "topk-floor" => {
                let k = int(1, "k")?;
                Codec::TopKFloor {
                    k,
                    min_mass: num(2, "min_mass")? as f32,
                    max_k: if parts.len() > 3 {
                        int(3, "max_k")?
                    } else {
                        k.saturating_mul(8)
                    },
                    precision,
                }
            }
            "cuhlm" => Codec::TopKUniformTail { k: int(1, "k")? },
            _ => return Err(err("unknown codec name")),
        };
        codec.validate().map_err(|e| err(&e.to_string()))?;
        Ok(codec)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked reader over a payload.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self, what: &'static str) -> Result<u8, CodecError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or(CodecError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated(what))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(CodecError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Malformed(format!("{what}: varint too long")))
    }
}

/// Validates `q` and returns its total positive finite mass.
fn mass(q: &[f32]) -> Result<f64, CodecError> {
    if q.is_empty() {
        return Err(CodecError::Empty);
    }
    if q.len() > MAX_VOCAB {
        return Err(CodecError::VocabTooLarge(q.len()));
    }
    let m = crate::fast_exp::sum_by(q, usable);
    if m > 0.0 {
        Ok(m)
    } else {
        Err(CodecError::NoMass)
    }
}

fn usable(v: f32) -> f32 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// Ids of the `n` most probable tokens (descending probability, ties by id) into `ids`.
fn top_ids(q: &[f32], n: usize, ids: &mut Vec<u32>) {
    ids.clear();
    let cmp = |a: &u32, b: &u32| {
        usable(q[*b as usize])
            .total_cmp(&usable(q[*a as usize]))
            .then(a.cmp(b))
    };
    let n = n.min(q.len());
    if n == 0 {
        return;
    }
    // One pass that keeps only candidates above a rising cutoff, instead of ranking the whole
    // vocabulary: whenever the buffer holds 4n ids, it is cut back to its best n and the cutoff
    // becomes the n-th value. Ids come in increasing order and ties go to the lower id, so a
    // later id equal to the cutoff can never enter: the result is the exact top n.
    let mut cutoff = f32::NEG_INFINITY;
    for (id, &v) in q.iter().enumerate() {
        if usable(v) > cutoff {
            ids.push(id as u32);
            if ids.len() >= 4 * n.max(16) {
                ids.select_nth_unstable_by(n - 1, cmp);
                ids.truncate(n);
                cutoff = usable(q[ids[n - 1] as usize]);
            }
        }
    }
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, cmp);
        ids.truncate(n);
    }
    ids.sort_unstable_by(cmp);
}

/// Chooses the kept ids for a sparse codec: most probable first, only positive ones.
fn kept_ids(codec: &Codec, q: &[f32], total: f64) -> Vec<u32> {
    let mut ids = Vec::new();
    let prefix_reaching = |ids: &[u32], target: f64| {
        let mut acc = 0.0;
        for (i, &id) in ids.iter().enumerate() {
            acc += usable(q[id as usize]) as f64;
            if acc >= target * total {
                return Some(i + 1);
            }
        }
        None
    };
    match *codec {
        Codec::TopK { k, .. } | Codec::TopKUniformTail { k } => top_ids(q, k as usize, &mut ids),
        Codec::TopP { p, max_k, .. } => {
            // Grow the candidate set geometrically instead of sorting the whole vocabulary.
            let mut n = 64usize.min(max_k as usize);
            loop {
                top_ids(q, n, &mut ids);
                if let Some(len) = prefix_reaching(&ids, p as f64) {
                    ids.truncate(len);
                    break;
                }
                if n >= max_k as usize || n >= q.len() {
                    break;
                }
                n = (n * 4).min(max_k as usize);
            }
        }
        Codec::TopKFloor {
            k, min_mass, max_k, ..
        } => {
            top_ids(q, max_k as usize, &mut ids);
            let len = prefix_reaching(&ids, min_mass as f64)
                .unwrap_or(ids.len())
                .max(k as usize);
            ids.truncate(len);
        }
        Codec::DenseF32 | Codec::DenseF16 => unreachable!("dense codecs keep every id"),
    }
    ids.retain(|&id| usable(q[id as usize]) > 0.0);
    ids.sort_unstable();
    ids
}

/// Compresses `q` with `codec`. `q` need not be exactly normalised, but must have positive mass.
pub fn encode(codec: &Codec, q: &[f32]) -> Result<Encoded, CodecError> {
    codec.validate()?;
    let total = mass(q)?;
    let mut bytes = Vec::new();
    match codec {
        Codec::DenseF32 => {
            bytes.push(TAG_DENSE_F32);
            put_varint(&mut bytes, q.len() as u64);
            bytes.reserve(q.len() * 4);
            for &v in q {
                bytes.extend_from_slice(&((usable(v) as f64 / total) as f32).to_le_bytes());
            }
        }
        Codec::DenseF16 => {
            bytes.push(TAG_DENSE_F16);
            put_varint(&mut bytes, q.len() as u64);
            bytes.reserve(q.len() * 2);
            for &v in q {
                let h = half::f16::from_f64(usable(v) as f64 / total);
                bytes.extend_from_slice(&h.to_le_bytes());
            }
        }
        sparse => {
            let ids = kept_ids(sparse, q, total);
            let precision = match sparse {
                Codec::TopK { precision, .. }
                | Codec::TopP { precision, .. }
                | Codec::TopKFloor { precision, .. } => *precision,
                _ => Precision::U8,
            };
            let uniform_tail = matches!(sparse, Codec::TopKUniformTail { .. });
            bytes.push(if uniform_tail {
                TAG_SPARSE_UNIFORM_TAIL
            } else {
                TAG_SPARSE
            });
            put_varint(&mut bytes, q.len() as u64);
            bytes.push(precision.width());
            put_varint(&mut bytes, ids.len() as u64);
            let mut prev = 0u32;
            for (i, &id) in ids.iter().enumerate() {
                put_varint(&mut bytes, (if i == 0 { id } else { id - prev }) as u64);
                prev = id;
            }
            // Weights relative to the largest kept probability: the top tokens keep the most
            // precision, and no kept token rounds to zero.
            let top = ids
                .iter()
                .map(|&id| usable(q[id as usize]))
                .fold(0.0f32, f32::max) as f64;
            for &id in &ids {
                let w = (usable(q[id as usize]) as f64 / top * precision.levels())
                    .round()
                    .clamp(1.0, precision.levels()) as u16;
                match precision {
                    Precision::U8 => bytes.push(w as u8),
                    Precision::U16 => bytes.extend_from_slice(&w.to_le_bytes()),
                }
            }
            if uniform_tail {
                let kept: f64 = ids.iter().map(|&id| usable(q[id as usize]) as f64).sum();
                let tail = if ids.len() < q.len() {
                    (1.0 - kept / total).max(0.0) as f32
                } else {
                    0.0
                };
                bytes.extend_from_slice(&tail.to_le_bytes());
            }
        }
    }
    let q_prime = decode(&bytes, Some(q.len()))?;
    Ok(Encoded { bytes, q_prime })
}

/// Decodes an uplink payload into the dense distribution `q'`.
///
/// `expected_vocab` (the server's vocabulary size) is checked when given. Arbitrary bytes give
/// an error, never a panic, and allocation is bounded by [`MAX_VOCAB`].
pub fn decode(bytes: &[u8], expected_vocab: Option<usize>) -> Result<Vec<f32>, CodecError> {
    let mut r = Reader { bytes, pos: 0 };
    let tag = r.byte("codec tag")?;
    let vocab = r.varint("vocabulary size")?;
    if vocab == 0 {
        return Err(CodecError::Empty);
    }
    if vocab > MAX_VOCAB as u64 {
        return Err(CodecError::VocabTooLarge(vocab as usize));
    }
    let vocab = vocab as usize;
    if let Some(expected) = expected_vocab
        && expected != vocab
    {
        return Err(CodecError::VocabMismatch {
            got: vocab,
            expected,
        });
    }
    let mut out = vec![0.0f32; vocab];
    match tag {
        TAG_DENSE_F32 | TAG_DENSE_F16 => {
            let width = if tag == TAG_DENSE_F32 { 4 } else { 2 };
            let raw = r.take(vocab * width, "dense values")?;
            let mut values = Vec::with_capacity(vocab);
            for c in raw.chunks_exact(width) {
                let v = if width == 4 {
                    f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64
                } else {
                    half::f16::from_le_bytes([c[0], c[1]]).to_f64()
                };
                if !v.is_finite() || v < 0.0 {
                    return Err(CodecError::Malformed(format!("invalid probability {v}")));
                }
                values.push(v);
            }
            normalise_into(
                &mut out,
                values.iter().enumerate().map(|(i, &v)| (i, v)),
                1.0,
            )?;
        }
        TAG_SPARSE | TAG_SPARSE_UNIFORM_TAIL => {
            let width = r.byte("weight width")?;
            if width != 1 && width != 2 {
                return Err(CodecError::Malformed(format!("weight width {width}")));
            }
            let n = r.varint("entry count")?;
            if n == 0 || n > vocab as u64 {
                return Err(CodecError::Malformed(format!(
                    "{n} entries for a vocabulary of {vocab}"
                )));
            }
            let n = n as usize;
            let mut ids = Vec::with_capacity(n.min(bytes.len()));
            let mut prev = 0u64;
            for i in 0..n {
                let delta = r.varint("token id")?;
                if i > 0 && delta == 0 {
                    return Err(CodecError::Malformed("token ids not ascending".into()));
                }
                let id = if i == 0 {
                    delta
                } else {
                    prev.saturating_add(delta)
                };
                if id >= vocab as u64 {
                    return Err(CodecError::Malformed(format!(
                        "token id {id} outside vocabulary of {vocab}"
                    )));
                }
                ids.push(id as usize);
                prev = id;
            }
            let raw = r.take(n * width as usize, "weights")?;
            let weights = raw.chunks_exact(width as usize).map(|c| {
                if width == 1 {
                    c[0] as f64
                } else {
                    u16::from_le_bytes([c[0], c[1]]) as f64
                }
            });
            if raw
                .chunks_exact(width as usize)
                .any(|c| c.iter().all(|&b| b == 0))
            {
                return Err(CodecError::Malformed("zero weight".into()));
            }
            let tail = if tag == TAG_SPARSE_UNIFORM_TAIL {
                let t = r.take(4, "tail mass")?;
                let t = f32::from_le_bytes([t[0], t[1], t[2], t[3]]) as f64;
                if !(0.0..1.0).contains(&t) {
                    return Err(CodecError::Malformed(format!("tail mass {t}")));
                }
                if n == vocab { 0.0 } else { t }
            } else {
                0.0
            };
            normalise_into(&mut out, ids.iter().copied().zip(weights), 1.0 - tail)?;
            if tail > 0.0 {
                let each = (tail / (vocab - n) as f64) as f32;
                let mut kept = ids.iter().peekable();
                for (i, o) in out.iter_mut().enumerate() {
                    if kept.peek() == Some(&&i) {
                        kept.next();
                    } else {
                        *o = each;
                    }
                }
            }
        }
        other => return Err(CodecError::UnknownTag(other)),
    }
    if r.pos != bytes.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - r.pos
        )));
    }
    Ok(out)
}

/// Writes `scale * v_i / sum(v)` for each `(index, v_i)`, computed in f64 and rounded once.
fn normalise_into(
    out: &mut [f32],
    values: impl Iterator<Item = (usize, f64)> + Clone,
    scale: f64,
) -> Result<(), CodecError> {
    let total: f64 = values.clone().map(|(_, v)| v).sum();
    if total.is_nan() || total <= 0.0 || total.is_infinite() {
        return Err(CodecError::NoMass);
    }
    for (i, v) in values {
        out[i] = (scale * v / total) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass selection gives exactly what ranking the whole vocabulary gives, ties,
    /// zeros and non-finite values included.
    #[test]
    fn top_ids_equals_a_full_ranking() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for vocab in [1usize, 7, 100, 5000, 40_000] {
            let q: Vec<f32> = (0..vocab)
                .map(|_| match next() % 10 {
                    0 => 0.0,
                    1 => 0.25, // many ties
                    2 => f32::NAN,
                    _ => (next() % 1000) as f32 / 997.0,
                })
                .collect();
            let mut want: Vec<u32> = (0..vocab as u32).collect();
            want.sort_by(|a, b| {
                usable(q[*b as usize])
                    .total_cmp(&usable(q[*a as usize]))
                    .then(a.cmp(b))
            });
            let mut got = Vec::new();
            for n in [1usize, 3, 16, 128, 999, vocab + 5] {
                top_ids(&q, n, &mut got);
                assert_eq!(got, want[..n.min(vocab)], "vocab {vocab}, n {n}");
            }
        }
    }

    #[test]
    fn parses_and_displays_the_cli_spellings() {
        for spec in [
            "dense-f32",
            "dense-f16",
            "topk:32",
            "topk:32:u16",
            "topp:0.99:1024",
            "topk-floor:16:0.95:128:u16",
            "cuhlm:32",
        ] {
            let codec: Codec = spec.parse().unwrap();
            assert_eq!(codec.to_string(), spec);
        }
        assert_eq!(
            "topp:0.9".parse::<Codec>().unwrap(),
            Codec::TopP {
                p: 0.9,
                max_k: 1024,
                precision: Precision::U8
            }
        );
        for bad in [
            "topk",
            "topk:0",
            "topk:x",
            "topp:1.5",
            "zip",
            "topk-floor:8:0.9:4",
        ] {
            assert!(bad.parse::<Codec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_and_renormalises() {
        let q = [0.05, 0.4, 0.1, 0.3, 0.15];
        let e = encode(
            &Codec::TopK {
                k: 2,
                precision: Precision::U16,
            },
            &q,
        )
        .unwrap();
        assert_eq!(e.q_prime[0], 0.0);
        assert_eq!(e.q_prime[2], 0.0);
        assert!((e.q_prime[1] - 0.4 / 0.7).abs() < 1e-4);
        assert!((e.q_prime[3] - 0.3 / 0.7).abs() < 1e-4);
    }

    #[test]
    fn top_p_and_floor_reach_their_mass() {
        let q = [0.5, 0.2, 0.15, 0.1, 0.05];
        let p = encode(&"topp:0.8".parse().unwrap(), &q).unwrap();
        assert_eq!(p.q_prime.iter().filter(|&&x| x > 0.0).count(), 3);
        let f = encode(&"topk-floor:1:0.6".parse().unwrap(), &q).unwrap();
        assert_eq!(f.q_prime.iter().filter(|&&x| x > 0.0).count(), 2);
    }

    #[test]
    fn uniform_tail_spreads_the_rest() {
        let q = [0.6, 0.3, 0.05, 0.05];
        let e = encode(&Codec::TopKUniformTail { k: 2 }, &q).unwrap();
        assert!((e.q_prime[2] - 0.05).abs() < 1e-6 && (e.q_prime[3] - 0.05).abs() < 1e-6);
        assert!((e.q_prime.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(!Codec::TopKUniformTail { k: 2 }.is_exact());
    }

    #[test]
    fn rejects_bad_payloads() {
        assert_eq!(decode(&[], None), Err(CodecError::Truncated("codec tag")));
        assert_eq!(decode(&[9, 4], None), Err(CodecError::UnknownTag(9)));
        assert!(matches!(
            decode(&[0, 2, 0, 0], None),
            Err(CodecError::Truncated(_))
        ));
        let ok = encode(&Codec::DenseF32, &[0.5, 0.5]).unwrap().bytes;
        assert!(matches!(
            decode(&ok, Some(3)),
            Err(CodecError::VocabMismatch {
                got: 2,
                expected: 3
            })
        ));
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing, None),
            Err(CodecError::Malformed(_))
        ));
        // A huge declared vocabulary is refused before allocating.
        assert!(matches!(
            decode(&[0, 0xff, 0xff, 0xff, 0x7f], None),
            Err(CodecError::VocabTooLarge(_))
        ));
        assert_eq!(
            encode(&Codec::DenseF32, &[0.0, f32::NAN]),
            Err(CodecError::NoMass)
        );
    }
}
