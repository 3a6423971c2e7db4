//! llama.cpp's `llama-server` as the engine, over its HTTP API.
//!
//! Token ids go in, never text. Each position a session needs decided is one request: the
//! session's context up to that position as the prompt, `n_predict` 1, its own seed. Two
//! answers give verification what it needs, exactly:
//!
//! - **Sampled** (the usual one). The engine samples with the session's own semantics,
//!   temperature first, then top-k, then top-p on the tempered probabilities (the sampler list
//!   is set explicitly: the server's defaults apply temperature last with top-k 40, top-p 0.95
//!   and min-p 0.05), and reports its draw with its probability and the probabilities of its
//!   top [`KNOWN_TOKENS`] after that chain (`post_sampling_probs`). A few kB of JSON.
//!   `uhlm_core::verify_partial` verifies the draft against that, drawing the residual by
//!   rejection from the engine's samples and asking for more ([`Engine::draws_at`]) where they
//!   run out.
//! - **Whole** (where the sampled answer does not suffice: the draft is not among the top
//!   tokens; top-k and top-p both set, which llama.cpp renormalises between; a draw that ends
//!   inside a UTF-8 character, whose probabilities llama-server withholds). `n_probs` over the
//!   whole vocabulary without the chain (`post_sampling_probs` false): the softmax of the raw
//!   logits for every id, `log p(x)`, the logits up to a constant, to which the gateway applies
//!   the session's sampling as the embedded engine does. 14 MB of JSON on Qwen2.5's 152k
//!   vocabulary, about ten times the time of a sampled answer (docs/BENCHMARKS.md, "The
//!   gateway on llama-server"). The engine's own sample is then biased to end-of-sequence,
//!   which never ends inside a character; the bias acts on the sampler only.
//!
//! The session's KV stays in the engine's prompt cache (`cache_prompt`): the engine re-scores
//! only what its slot does not hold yet. The gateway remembers which slot served a session and
//! pins a chain's requests to it, so that they run on the cached prefix instead of re-scoring
//! the whole context on other slots; a single request is left to the engine's own slot choice
//! (the longest common prefix), which finds the same slot when it is free. Measured per
//! request: `timings.prompt_n`, the tokens the engine evaluated.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use uhlm_core::sampling::{SamplingOptions, probabilities_into};
use uhlm_core::verify_partial::PartialTarget;
use uhlm_model::ModelCard;

use super::remote::{
    PROBE_TEXT, RemoteSession, agent, all_at_once, clip, get_json, post_json, read_body, score_all,
};
use super::seam::{Engine, EngineCheck, EngineError, ScoreItem, Target, Wanted};
use crate::metrics::Metrics;

/// A running `llama-server` serving the same GGUF as the gateway's model card.
pub(crate) struct LlamaServer {
    url: String,
    agent: ureq::Agent,
    vocab_size: usize,
    /// The token the engine's own (unused) sample is biased to.
    eos: u32,
    metrics: Arc<Metrics>,
}

/// Checks that the engine at `url` serves `card`'s vocabulary: the same number of logits,
/// the same BOS and EOS, and the same token ids for a probe text. A mismatch is
/// [`EngineError::Vocabulary`]; an engine that cannot be asked is [`EngineError::Remote`].
pub fn check_llama_server(
    url: &str,
    card: &ModelCard,
    timeout: Duration,
) -> Result<EngineCheck, EngineError> {
    let url = url.trim_end_matches('/');
    let agent = agent(timeout);
    let remote = |reason: String| EngineError::Remote {
        url: url.to_string(),
        reason,
    };
    let mismatch = |reason: String| EngineError::Vocabulary {
        url: url.to_string(),
        reason,
    };
    let models: serde_json::Value =
        get_json(&agent, &format!("{url}/v1/models")).map_err(remote)?;
    let n_vocab = models["data"][0]["meta"]["n_vocab"]
        .as_u64()
        .ok_or_else(|| remote("/v1/models has no data[0].meta.n_vocab".into()))?
        as usize;
    if n_vocab != card.vocab_size {
        return Err(mismatch(format!(
            "{n_vocab} logits, the server's model {} has {}",
            card.name, card.vocab_size
        )));
    }
    let props: serde_json::Value = get_json(&agent, &format!("{url}/props")).map_err(remote)?;
    let tok = &card.tokenizer;
    // Where the model defines none, llama.cpp assumes one, which token-id prompts never use.
    let ends = [
        ("BOS", "bos_token", tok.bos_id()),
        ("EOS", "eos_token", tok.eos_ids().first().copied()),
    ];
    for (what, key, id) in ends {
        let Some(ours) = id.and_then(|i| tok.token_piece(i)) else {
            continue;
        };
        let theirs = props[key].as_str().unwrap_or_default();
        if theirs != ours {
            return Err(mismatch(format!(
                "its {what} is {theirs:?}, the server's model's is {ours:?}"
            )));
        }
    }
    let ours = tok
        .encode(PROBE_TEXT, false)
        .map_err(|e| remote(format!("cannot tokenize the probe text here: {e}")))?;
    let theirs: serde_json::Value = post_json(
        &agent,
        &format!("{url}/tokenize"),
        &json!({"content": PROBE_TEXT, "add_special": false}),
    )
    .map_err(remote)?;
    let theirs: Vec<u32> = serde_json::from_value(theirs["tokens"].clone())
        .map_err(|e| remote(format!("/tokenize answered no token ids: {e}")))?;
    if theirs != ours {
        return Err(mismatch(format!(
            "it tokenizes a probe text as {theirs:?}, the server's model as {ours:?}"
        )));
    }
    Ok(EngineCheck {
        n_vocab,
        slots: props["total_slots"].as_u64().map(|n| n as usize),
        model: props["model_path"].as_str().unwrap_or_default().to_string(),
        asks_tokens: false,
    })
}

impl LlamaServer {
    /// An engine at `url` that [`check_llama_server`] accepted for the server's model, whose
    /// end-of-sequence token is `eos`.
    pub fn new(
        url: &str,
        check: &EngineCheck,
        eos: u32,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            agent: agent(timeout),
            vocab_size: check.n_vocab,
            eos,
            metrics,
        }
    }

    fn remote(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Remote {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// Sends one `/completion` request (one prompt, one predicted token) and reads its answer.
    fn complete(&self, body: &serde_json::Value) -> Result<Completion, EngineError> {
        let url = format!("{}/completion", self.url);
        let resp = self
            .agent
            .post(&url)
            .send_json(body)
            .map_err(|e| self.remote(format!("POST {url}: {e}")))?;
        let (status, text) = read_body(resp).map_err(|e| self.remote(e))?;
        self.metrics.engine_requests.inc();
        self.metrics.engine_response_bytes.inc_by(text.len() as u64);
        if !status.is_success() {
            return Err(self.remote(format!("HTTP {status}: {}", clip(&text))));
        }
        let mut answers = parse_completions(&text).map_err(|e| self.remote(e))?;
        if answers.len() != 1 {
            return Err(self.remote(format!("{} answers to one prompt", answers.len())));
        }
        let answer = answers.remove(0);
        let evaluated = answer.timings.as_ref().map_or(0, |t| t.prompt_n.max(0));
        self.metrics.engine_prompt_tokens.inc_by(evaluated as u64);
        Ok(answer)
    }

    /// The request body for `prompt`: the prompt cache on, on slot `id_slot` (-1: the engine's
    /// choice), one predicted token.
    fn body(&self, prompt: &[u32], id_slot: i64) -> serde_json::Value {
        json!({
            "prompt": prompt,
            "n_predict": 1,
            "cache_prompt": true,
            "id_slot": id_slot,
            "stream": false,
            "return_tokens": true,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "dry_multiplier": 0.0,
            "xtc_probability": 0.0,
        })
    }

    /// The logits after `prompt`: the whole vocabulary's log-probabilities, the softmax of the
    /// raw logits (no sampler), the engine's own sample biased to EOS (see the module's doc).
    fn full(&self, prompt: &[u32], id_slot: i64) -> Result<(Vec<f32>, Option<i64>), EngineError> {
        let mut body = self.body(prompt, id_slot);
        body["n_probs"] = json!(self.vocab_size);
        body["post_sampling_probs"] = json!(false);
        body["samplers"] = json!(["temperature"]);
        body["temperature"] = json!(1.0);
        body["top_k"] = json!(0);
        body["top_p"] = json!(1.0);
        body["logit_bias"] = json!([[self.eos, 1000.0]]);
        let answer = self.complete(&body)?;
        let mut logits = vec![f32::NAN; self.vocab_size];
        answer_logits(&answer, &mut logits).map_err(|e| self.remote(e))?;
        Ok((logits, answer.id_slot))
    }

    /// What the engine samples after `prompt` under `sampling` from `seed`: its draw with its
    /// probability, and the probabilities of its top [`KNOWN_TOKENS`]; `None` for the
    /// probabilities where it withheld them (a draw ending inside a UTF-8 character).
    fn sample(
        &self,
        prompt: &[u32],
        sampling: &SamplingOptions,
        seed: u32,
        n_probs: usize,
        id_slot: i64,
    ) -> Result<(Drawn, Option<i64>), EngineError> {
        let mut body = self.body(prompt, id_slot);
        body["n_probs"] = json!(n_probs);
        body["post_sampling_probs"] = json!(true);
        body["seed"] = json!(seed);
        if sampling.is_greedy() {
            body["temperature"] = json!(0.0);
            body["samplers"] = json!(["temperature"]);
        } else {
            // The SDK's order: temperature first, then top-k, then top-p on the tempered
            // probabilities.
            body["samplers"] = json!(["temperature", "top_k", "top_p"]);
            body["temperature"] = json!(sampling.temperature);
            body["top_k"] = json!(sampling.top_k.unwrap_or(0));
            body["top_p"] = json!(sampling.top_p.unwrap_or(1.0));
        }
        let answer = self.complete(&body)?;
        let token = match answer.tokens.as_slice() {
            [t] => *t,
            other => {
                return Err(self.remote(format!("{} tokens sampled for one", other.len())));
            }
        };
        let drawn = match answer.completion_probabilities.first() {
            Some(probs) => {
                if probs.id != token || probs.prob.is_none() {
                    return Err(self.remote("the sampled token's probability is missing"));
                }
                Drawn {
                    token,
                    prob: probs.prob,
                    top: probs.top_probs.iter().map(|c| (c.id, c.prob)).collect(),
                }
            }
            None => Drawn {
                token,
                prob: None,
                top: Vec::new(),
            },
        };
        Ok((drawn, answer.id_slot))
    }

    /// The target at the end of `prompt` for a session sampling with `sampling`.
    fn target(
        &self,
        prompt: &[u32],
        sampling: &SamplingOptions,
        seed: u32,
        id_slot: i64,
    ) -> Result<(Target, Option<i64>), EngineError> {
        // llama.cpp's top-p after top-k renormalises over the top k; the SDK's does not.
        let same_semantics = !(sampling.top_k.is_some() && sampling.top_p.is_some());
        if same_semantics {
            let (drawn, slot) = self.sample(prompt, sampling, seed, KNOWN_TOKENS, id_slot)?;
            if let Some(prob) = drawn.prob {
                let target = if sampling.is_greedy() {
                    // Greedy: all of p is on the engine's argmax.
                    PartialTarget {
                        known: vec![(drawn.token, 1.0)],
                        draws: Vec::new(),
                        complete: true,
                    }
                } else {
                    // Fewer candidates than asked for: the engine lists every token with mass
                    // (it leaves out zeros), as after a top-k.
                    let complete = drawn.top.len() < KNOWN_TOKENS;
                    PartialTarget {
                        known: drawn.top,
                        draws: vec![(drawn.token, prob)],
                        complete,
                    }
                };
                return Ok((Target::Partial(target), slot));
            }
        }
        let (logits, slot) = self.full(prompt, id_slot)?;
        Ok((Target::Logits(logits), slot))
    }

    /// Scores one item: a request per wanted row (its own seed), at once.
    fn score_one(&self, item: &ScoreItem<'_, RemoteSession>) -> Result<Scored, EngineError> {
        let session = &*item.session;
        let mut full = session.tokens.clone();
        full.extend_from_slice(item.tokens);
        let base = session.tokens.len();
        let ends: Vec<usize> = match item.wanted {
            Wanted::Nothing | Wanted::Last => vec![full.len()],
            Wanted::Rows(rows) => rows.iter().map(|&r| base + r + 1).collect(),
        };
        if ends.iter().any(|&e| e == 0 || e > full.len()) {
            return Err(self.remote("a wanted row lies outside the new tokens"));
        }
        if matches!(item.wanted, Wanted::Nothing) {
            // Only into the prompt cache: the smallest answer.
            let mut body = self.body(&full, -1);
            body["n_probs"] = json!(0);
            let answer = self.complete(&body)?;
            return Ok((Vec::new(), answer.id_slot));
        }
        if item.seeds.len() != ends.len() {
            return Err(self.remote("a seed is missing for a wanted row"));
        }
        // Several rows run on the session's slot, each on the cached prefix; one row goes
        // wherever the engine finds its prefix.
        let id_slot = match (ends.len(), session.slot) {
            (n, Some(slot)) if n > 1 => slot,
            _ => -1,
        };
        let requests = ends.iter().zip(item.seeds).map(|(&end, &seed)| {
            let prompt = &full[..end];
            move || self.target(prompt, item.sampling, seed, id_slot)
        });
        let answers = all_at_once(requests, || self.remote("the request thread panicked"));
        let mut targets = Vec::with_capacity(answers.len());
        let mut slot = None;
        for answer in answers {
            let (target, s) = answer?;
            targets.push(target);
            slot = slot.or(s);
        }
        Ok((targets, slot))
    }
}

/// Probabilities asked for with each draw: the engine's top tokens after the session's
/// sampling. Enough to hold the draft's probability and most of the residual's mass almost
/// always (a few kB of JSON; the whole vocabulary is 14 MB on Qwen2.5).
const KNOWN_TOKENS: usize = 128;

/// What one sampling request reported.
struct Drawn {
    token: u32,
    prob: Option<f32>,
    top: Vec<(u32, f32)>,
}

/// One item's targets and the slot that served it.
type Scored = (Vec<Target>, Option<i64>);

/// One prompt's answer, reduced to what verification needs (the rest is skipped unparsed).
#[derive(Debug, Deserialize)]
pub(crate) struct Completion {
    #[serde(default)]
    id_slot: Option<i64>,
    #[serde(default)]
    tokens: Vec<u32>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(default)]
    completion_probabilities: Vec<TokenProbs>,
}

#[derive(Debug, Deserialize)]
struct Timings {
    #[serde(default)]
    prompt_n: i64,
}

/// The probabilities reported with a sampled token: log-probabilities without the sampler
/// chain, or probabilities after it (`post_sampling_probs`).
#[derive(Debug, Deserialize)]
struct TokenProbs {
    #[serde(default)]
    id: u32,
    #[serde(default)]
    prob: Option<f32>,
    #[serde(default)]
    top_logprobs: Vec<Candidate>,
    #[serde(default)]
    top_probs: Vec<ProbCandidate>,
}

#[derive(Debug, Deserialize)]
struct Candidate {
    id: u32,
    logprob: f32,
}

#[derive(Debug, Deserialize)]
struct ProbCandidate {
    id: u32,
    prob: f32,
}

/// Reads a `/completion` answer: an array for several prompts, an object for one.
pub(crate) fn parse_completions(text: &str) -> Result<Vec<Completion>, String> {
    let parsed = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
    } else {
        serde_json::from_str(text).map(|c| vec![c])
    };
    parsed.map_err(|e| format!("unexpected answer ({e}): {}", clip(text)))
}

/// Fills `row` with the answer's log-probability of every token id: each id exactly once.
fn answer_logits(answer: &Completion, row: &mut [f32]) -> Result<(), String> {
    let first = answer
        .completion_probabilities
        .first()
        .ok_or("the answer has no probabilities")?;
    if first.top_logprobs.len() != row.len() {
        return Err(format!(
            "{} probabilities for a vocabulary of {}",
            first.top_logprobs.len(),
            row.len()
        ));
    }
    for c in &first.top_logprobs {
        let slot = row
            .get_mut(c.id as usize)
            .ok_or_else(|| format!("token id {} is outside the vocabulary", c.id))?;
        if !slot.is_nan() || c.logprob.is_nan() || c.logprob > 0.0 {
            return Err(format!("token id {} has a repeated or invalid entry", c.id));
        }
        *slot = c.logprob;
    }
    Ok(())
}

impl Engine for LlamaServer {
    type Session = RemoteSession;

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn session(&self) -> RemoteSession {
        RemoteSession::new()
    }

    /// Every item's requests at once, so that the engine batches them across its slots.
    fn score(
        &self,
        items: &mut [ScoreItem<'_, RemoteSession>],
    ) -> Result<Vec<Vec<Target>>, EngineError> {
        let results = score_all(
            items,
            |item| self.score_one(item),
            || self.remote("the request thread panicked"),
        )?;
        Ok(items
            .iter_mut()
            .zip(results)
            .map(|(item, (targets, slot))| {
                item.session.tokens.extend_from_slice(item.tokens);
                if slot.is_some() {
                    item.session.slot = slot;
                }
                targets
            })
            .collect())
    }

    fn logits_at(&self, session: &RemoteSession, len: usize) -> Result<Vec<f32>, EngineError> {
        let prompt = session
            .prefix(len)
            .ok_or_else(|| self.remote("no context to score"))?;
        Ok(self.full(prompt, session.slot.unwrap_or(-1))?.0)
    }

    /// One more draw. Where the engine withholds its probability (a draw ending inside a
    /// UTF-8 character), it is read from the whole distribution under the same sampling:
    /// leaving such draws out would make their tokens impossible.
    fn draws_at(
        &self,
        session: &RemoteSession,
        len: usize,
        sampling: &SamplingOptions,
        seed: u32,
    ) -> Result<Vec<(u32, f32)>, EngineError> {
        let prompt = session
            .prefix(len)
            .ok_or_else(|| self.remote("no context to draw after"))?;
        let slot = session.slot.unwrap_or(-1);
        let (drawn, _) = self.sample(prompt, sampling, seed, 1, slot)?;
        let prob = match drawn.prob {
            Some(p) => p,
            None => {
                let (logits, _) = self.full(prompt, slot)?;
                let (mut probs, mut scratch) = (Vec::new(), Vec::new());
                if !probabilities_into(&logits, sampling, &mut probs, &mut scratch) {
                    return Err(self.remote("the engine's logits are not finite"));
                }
                probs[drawn.token as usize]
            }
        };
        Ok(vec![(drawn.token, prob)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_logits_of_every_token_id() {
        let one = r#"{"content":"x","id_slot":2,"timings":{"prompt_n":5},
            "completion_probabilities":[{"id":1,"token":"b","bytes":[98],"logprob":-0.1,
            "top_logprobs":[{"id":1,"token":"b","bytes":[98],"logprob":-0.1},
                            {"id":0,"token":"a","bytes":[97],"logprob":-2.4},
                            {"id":2,"token":"c","bytes":[99],"logprob":-3.4028235e38}]}]}"#;
        let answers = parse_completions(one).unwrap();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].id_slot, Some(2));
        let mut row = vec![f32::NAN; 3];
        answer_logits(&answers[0], &mut row).unwrap();
        assert_eq!(row, [-2.4, -0.1, f32::MIN]);
        let many = format!("[{one},{one}]");
        assert_eq!(parse_completions(&many).unwrap().len(), 2);
    }

    #[test]
    fn garbage_answers_are_errors() {
        let mut row = vec![f32::NAN; 3];
        for bad in [
            // Too few ids.
            r#"{"completion_probabilities":[{"top_logprobs":[{"id":0,"logprob":-1}]}]}"#,
            // A repeated id.
            r#"{"completion_probabilities":[{"top_logprobs":[{"id":0,"logprob":-1},
                {"id":0,"logprob":-1},{"id":1,"logprob":-1}]}]}"#,
            // Outside the vocabulary.
            r#"{"completion_probabilities":[{"top_logprobs":[{"id":0,"logprob":-1},
                {"id":1,"logprob":-1},{"id":7,"logprob":-1}]}]}"#,
            // A probability above one.
            r#"{"completion_probabilities":[{"top_logprobs":[{"id":0,"logprob":1},
                {"id":1,"logprob":-1},{"id":2,"logprob":-1}]}]}"#,
            // No probabilities at all.
            r#"{"content":"x"}"#,
        ] {
            row.fill(f32::NAN);
            let answers = parse_completions(bad).unwrap();
            assert!(answer_logits(&answers[0], &mut row).is_err(), "{bad}");
        }
        assert!(parse_completions("<html>502</html>").is_err());
        assert!(parse_completions(r#"{"completion_probabilities":"no"}"#).is_err());
    }
}
