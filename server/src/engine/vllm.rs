//! vLLM as the engine, over its OpenAI-compatible `POST /v1/completions`.
//!
//! Written to vLLM's documented API and tested here against its documented shapes and a
//! stand-in server; not run against vLLM itself, whose wheels need CUDA (README, "What was
//! built and tested here", gives the command that checks it where vLLM runs).
//!
//! Token ids go in, never text. Each position a session needs decided is one request: the
//! context up to it as the prompt, `max_tokens` 1, its own seed, and the session's sampling set
//! in full (temperature, `top_k`, `top_p`, and `min_p` 0 with neutral penalties: vLLM otherwise
//! applies the model's `generation_config.json`, which for Qwen2.5 sets top-k 20, top-p 0.8
//! and a repetition penalty). vLLM must run with `--logprobs-mode processed_logprobs`, so that
//! the log-probabilities it reports are those of the distribution it samples from, after
//! temperature, top-k and top-p; the start-up check measures that it does. Two answers:
//!
//! - **Asked** (the usual one): `logprob_token_ids` [the draft] with `logprobs` 1. vLLM
//!   reports the draft's probability and its own sample `y` with `y`'s probability, which is
//!   `uhlm_core::verify_partial`'s report with the draft as the only known token: accept with
//!   `min(1, p_d / q_d)`; on a rejection, the residual by rejection from vLLM's samples (keep
//!   `y` with probability `max(0, 1 - q_y / p_y)`), asking for more samples
//!   ([`Engine::draws_at`]) until one is kept. Tens of bytes of JSON per position.
//! - **Whole** (where the asked answer is not exact: top-k and top-p both set, which vLLM
//!   renormalises between and the SDK does not; a temperature vLLM does not sample at as
//!   asked, above 2 or below 0.01; or a vLLM that ignores `logprob_token_ids`, which it took
//!   in July 2026, at every position): as many log-probabilities as the vocabulary holds at
//!   temperature 1, the softmax of the raw logits for every id, to which the gateway applies
//!   the session's sampling as the embedded engine does. Needs vLLM's `--max-logprobs -1`.
//!
//! vLLM keeps each session's KV in its automatic prefix cache: a request re-computes only what
//! it does not hold. Measured per request: prompt tokens less the cached ones vLLM reports
//! (with `--enable-prompt-tokens-details`; without it every prompt token counts).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::verify_partial::PartialTarget;
use uhlm_model::ModelCard;

use super::remote::{
    PROBE_TEXT, RemoteSession, agent, all_at_once, clip, get_json, post_json, read_body, score_all,
};
use super::seam::{Engine, EngineCheck, EngineError, ScoreItem, Target, Wanted};
use crate::metrics::Metrics;

/// vLLM's own samples asked for at once when a residual needs more (in parallel requests,
/// each with its own seed).
const DRAWS_PER_ASK: usize = 4;

/// The temperatures vLLM samples at as asked (`SamplingParams`: above 2 is refused, a
/// positive one below 0.01 raised to it); others are applied here to a whole distribution.
const VLLM_MIN_TEMPERATURE: f32 = 0.01;
const VLLM_MAX_TEMPERATURE: f32 = 2.0;

/// Tries for a whole distribution: vLLM answers a batch holding `logprob_token_ids` requests
/// with those ids only, cutting short a whole request that ran in the same batch.
const WHOLE_TRIES: usize = 3;

/// How the token ids of vLLM's answers are written (`return_tokens_as_token_ids`).
const TOKEN_ID_PREFIX: &str = "token_id:";

/// vLLM writes log-probabilities below this (minus infinity for tokens top-k or top-p
/// removed) as this.
const LOGPROB_FLOOR: f32 = -9999.0;

/// How much of the start-up check runs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Depth {
    /// Everything, at start: the model's name, the probe text's ids, BOS and EOS, the logits'
    /// width and whole-vocabulary answers, and whether the log-probabilities are processed.
    Full,
    /// As each device connects: the model's name and the probe text's ids.
    Quick,
}

/// A vLLM server serving the same model as the gateway's model card.
pub(crate) struct Vllm {
    url: String,
    /// The name requests give (`/v1/models`' first id).
    model: String,
    agent: ureq::Agent,
    vocab_size: usize,
    /// vLLM honours `logprob_token_ids` with processed log-probabilities.
    asks_tokens: bool,
    metrics: Arc<Metrics>,
}

/// Checks that the vLLM at `url` serves `card`'s vocabulary and answers what verification
/// needs (see the module's doc); `depth` says how much.
pub(super) fn check_vllm(
    url: &str,
    card: &ModelCard,
    timeout: Duration,
    depth: Depth,
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
    let models = get_json(&agent, &format!("{url}/v1/models")).map_err(remote)?;
    let model = models["data"][0]["id"]
        .as_str()
        .ok_or_else(|| remote("/v1/models lists no model".into()))?
        .to_string();
    let tok = &card.tokenizer;
    let tokenize = |text: &str| -> Result<Vec<u32>, EngineError> {
        let body = json!({"model": model, "prompt": text, "add_special_tokens": false});
        let answer = post_json(&agent, &format!("{url}/tokenize"), &body).map_err(remote)?;
        serde_json::from_value(answer["tokens"].clone())
            .map_err(|e| remote(format!("/tokenize answered no token ids: {e}")))
    };
    // Values above zero: vLLM reports logits, not log-probabilities.
    let wrong_mode = |reason: String| {
        remote(format!(
            "{reason}: start vLLM with --logprobs-mode processed_logprobs"
        ))
    };
    let probe = tok
        .encode(PROBE_TEXT, false)
        .map_err(|e| remote(format!("cannot tokenize the probe text here: {e}")))?;
    let theirs = tokenize(PROBE_TEXT)?;
    if theirs != probe {
        return Err(mismatch(format!(
            "it tokenizes a probe text as {theirs:?}, the server's model as {probe:?}"
        )));
    }
    let mut check = EngineCheck {
        n_vocab: card.vocab_size,
        slots: None,
        model: model.clone(),
        asks_tokens: true,
    };
    let engine = Vllm {
        url: url.to_string(),
        model: model.clone(),
        agent: agent.clone(),
        vocab_size: card.vocab_size,
        asks_tokens: true,
        metrics: Arc::new(Metrics::new()),
    };
    // A context any model holds: the probe text's first tokens.
    let context = &probe[..probe.len().min(8)];
    if matches!(depth, Depth::Quick) {
        // vLLM's top three there (if a busy batch hides them, the start-up check stands).
        let mut body = engine.sample_body(context, &SamplingOptions::default(), 0);
        body["temperature"] = json!(1.0);
        body["logprobs"] = json!(3);
        let top = engine.request(&body)?.first_top().map_err(wrong_mode)?;
        let mut top: Vec<(u32, f32)> = top.into_iter().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let [(a, _), (b, lb), (c, lc), ..] = top[..]
            && lb - lc > 1e-3
        {
            engine.check_processed(context, [a, b, c])?;
        }
        return Ok(check);
    }
    // BOS and EOS, where the model defines them: their text is one special token to vLLM's
    // tokenizer, which must be ours.
    let ends = [
        ("BOS", tok.bos_id()),
        ("EOS", tok.eos_ids().first().copied()),
    ];
    for (what, id) in ends {
        let Some((id, piece)) = id.and_then(|i| Some((i, tok.token_piece(i)?))) else {
            continue;
        };
        let theirs = tokenize(piece)?;
        if theirs != [id] {
            return Err(mismatch(format!(
                "its tokenizer reads the {what} {piece:?} as {theirs:?}, the server's model \
                 has it as [{id}]"
            )));
        }
    }
    // The whole vocabulary at temperature 1: every id exactly once, as wide as our logits.
    let whole = engine
        .request(&engine.whole_body(context))
        .map_err(|e| match e {
            EngineError::Remote { reason, .. } if reason.contains("logprobs") => remote(format!(
                "it refused the whole vocabulary's log-probabilities ({reason}); start vLLM with \
                 --max-logprobs -1"
            )),
            e => e,
        })?;
    let listed = whole.first_top().map_err(wrong_mode)?;
    if listed.len() != card.vocab_size {
        return Err(mismatch(format!(
            "{} log-probabilities, the server's model {} has {} logits",
            listed.len(),
            card.name,
            card.vocab_size
        )));
    }
    let logits = whole.logits(card.vocab_size).map_err(remote)?;
    // Two tokens apart by a clear margin: at temperature 1/2 their processed log-probabilities
    // lie twice as far apart as at 1; raw ones the same. And the least likely token, which
    // vLLM reports only if it honours `logprob_token_ids` (it is neither its top token nor,
    // in practice, its sample).
    let mut order: Vec<u32> = (0..card.vocab_size as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let first = order[0];
    let Some(&second) = order
        .iter()
        .find(|&&t| logits[first as usize] - logits[t as usize] > 0.05)
    else {
        return Err(remote(
            "its distribution after the probe text's start is flat".into(),
        ));
    };
    let gap_at_one = logits[first as usize] - logits[second as usize];
    let last = order[order.len() - 1];
    let half = SamplingOptions {
        temperature: 0.5,
        ..SamplingOptions::default()
    };
    let ids = [first, second, last];
    let mut body = engine.sample_body(context, &half, 0);
    body["logprobs"] = json!(ids.len());
    body["logprob_token_ids"] = json!(ids);
    let reported = engine.request(&body)?.first_top().map_err(wrong_mode)?;
    let (Some(a), Some(b), Some(_)) = (
        reported.get(&first),
        reported.get(&second),
        reported.get(&last),
    ) else {
        tracing::warn!(
            url,
            "this vLLM ignores logprob_token_ids: every position is verified against the \
             whole vocabulary (megabytes of JSON each); a vLLM from July 2026 on answers \
             in bytes"
        );
        check.asks_tokens = false;
        return Ok(check);
    };
    let ratio = (a - b) / gap_at_one;
    if (ratio - 2.0).abs() > 0.2 {
        return Err(remote(format!(
            "its log-probabilities at temperature 1/2 are {ratio:.3} times as far apart as \
             at 1, not 2: they are not those it samples from; start vLLM with \
             --logprobs-mode processed_logprobs"
        )));
    }
    // Top-k, too, is in what it reports (where the second and third tokens do not tie).
    let (a, b, c) = (order[0], order[1], order[2]);
    if logits[b as usize] - logits[c as usize] > 1e-3 {
        engine.check_processed(context, [a, b, c])?;
    }
    Ok(check)
}

impl Vllm {
    /// An engine at `url` that [`check_vllm`] accepted for the server's model.
    pub fn new(url: &str, check: &EngineCheck, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            model: check.model.clone(),
            agent: agent(timeout),
            vocab_size: check.n_vocab,
            asks_tokens: check.asks_tokens,
            metrics,
        }
    }

    fn remote(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Remote {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// With top-k 2 after `context`, where `ids` are the three most likely tokens in order
    /// (the third clearly below the second), the log-probabilities vLLM reports must be those it samples from: the top two
    /// share all the mass, the third has none (vLLM's floor). Raw log-probabilities, or
    /// processed logits, fail. A vLLM that ignores `logprob_token_ids` passes (it is then
    /// asked for whole distributions at temperature 1 only).
    fn check_processed(&self, context: &[u32], ids: [u32; 3]) -> Result<(), EngineError> {
        let mut body = self.sample_body(context, &SamplingOptions::default(), 0);
        body["temperature"] = json!(1.0);
        body["top_k"] = json!(2);
        body["logprobs"] = json!(ids.len());
        body["logprob_token_ids"] = json!(ids);
        let reported = self.request(&body)?.first_top().map_err(|e| {
            self.remote(format!(
                "{e}: start vLLM with --logprobs-mode processed_logprobs"
            ))
        })?;
        let [Some(a), Some(b), Some(c)] = ids.map(|t| reported.get(&t).copied()) else {
            return Ok(());
        };
        let kept = probability(a).unwrap_or(0.0) + probability(b).unwrap_or(0.0);
        if c > LOGPROB_FLOOR || (kept - 1.0).abs() > 1e-3 {
            return Err(self.remote(format!(
                "with top-k 2 it reports log-probabilities {a}, {b}, {c} for its three most \
                 likely tokens, not those it samples from; start vLLM with --logprobs-mode \
                 processed_logprobs"
            )));
        }
        Ok(())
    }

    /// One prompt, one predicted token, no penalty or filter beyond the ones set after.
    fn base_body(&self, prompt: &[u32]) -> serde_json::Value {
        json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "n": 1,
            "stream": false,
            "echo": false,
            "add_special_tokens": false,
            "skip_special_tokens": false,
            "return_tokens_as_token_ids": true,
            "return_token_ids": true,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        })
    }

    /// vLLM's sample after `prompt` under `sampling` from `seed`, with its probability.
    fn sample_body(
        &self,
        prompt: &[u32],
        sampling: &SamplingOptions,
        seed: u32,
    ) -> serde_json::Value {
        let mut body = self.base_body(prompt);
        body["seed"] = json!(seed);
        body["logprobs"] = json!(0);
        if sampling.is_greedy() {
            body["temperature"] = json!(0.0);
        } else {
            body["temperature"] = json!(sampling.temperature);
        }
        body["top_k"] = json!(sampling.top_k.unwrap_or(0));
        body["top_p"] = json!(sampling.top_p.unwrap_or(1.0));
        body
    }

    /// Every token's log-probability after `prompt` at temperature 1. As many as the
    /// vocabulary holds, not -1: vLLM's completion API answers -1 with no candidate at all.
    fn whole_body(&self, prompt: &[u32]) -> serde_json::Value {
        let mut body = self.sample_body(prompt, &SamplingOptions::default(), 0);
        body["temperature"] = json!(1.0);
        body["top_k"] = json!(0);
        body["top_p"] = json!(1.0);
        body["logprobs"] = json!(self.vocab_size);
        body
    }

    /// Sends one request and reads its single choice.
    fn request(&self, body: &serde_json::Value) -> Result<Choice, EngineError> {
        let url = format!("{}/v1/completions", self.url);
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
        let (choice, evaluated) = parse_completion(&text).map_err(|e| self.remote(e))?;
        if let Some(n) = evaluated {
            self.metrics.engine_prompt_tokens.inc_by(n);
        }
        Ok(choice)
    }

    /// The target after `prompt` for a session sampling with `sampling`, whose device drafted
    /// `draft` there.
    fn target(
        &self,
        prompt: &[u32],
        sampling: &SamplingOptions,
        seed: u32,
        draft: Option<u32>,
    ) -> Result<Target, EngineError> {
        let greedy = sampling.is_greedy();
        let top_k = sampling.top_k.filter(|&k| (k as usize) < self.vocab_size);
        let top_p = sampling.top_p.filter(|&p| p < 1.0);
        // vLLM renormalises between top-k and top-p (the SDK does not), refuses temperatures
        // above 2 and raises those below 0.01 to 0.01.
        let same_semantics = !(top_k.is_some() && top_p.is_some())
            && (VLLM_MIN_TEMPERATURE..=VLLM_MAX_TEMPERATURE).contains(&sampling.temperature);
        let asked_is_exact = same_semantics && self.asks_tokens;
        if !greedy && !asked_is_exact {
            return Ok(Target::Logits(self.whole(prompt)?));
        }
        let mut body = self.sample_body(prompt, sampling, seed);
        let asked = draft.filter(|_| !greedy);
        if let Some(d) = asked {
            body["logprobs"] = json!(1);
            body["logprob_token_ids"] = json!([d]);
        }
        let choice = self.request(&body)?;
        let (token, prob) = choice.sampled().map_err(|e| self.remote(e))?;
        if greedy {
            // All of the target is on vLLM's argmax.
            return Ok(Target::Partial(PartialTarget {
                known: vec![(token, 1.0)],
                draws: Vec::new(),
                complete: true,
            }));
        }
        let mut known = Vec::new();
        if let Some(d) = asked {
            let top = choice.first_top().map_err(|e| self.remote(e))?;
            let p = top
                .get(&d)
                .ok_or_else(|| self.remote("the answer lacks the draft's log-probability"))?;
            known.push((d, probability(*p).map_err(|e| self.remote(e))?));
        }
        Ok(Target::Partial(PartialTarget {
            known,
            draws: vec![(token, prob)],
            complete: false,
        }))
    }

    /// The logits after `prompt`, up to a constant: every token's log-probability at
    /// temperature 1.
    fn whole(&self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .request(&self.whole_body(prompt))?
                .logits(self.vocab_size)
            {
                Ok(logits) => return Ok(logits),
                Err(e) if tries == WHOLE_TRIES => return Err(self.remote(e)),
                Err(e) => tracing::debug!(error = %e, "a whole distribution came back short"),
            }
        }
    }

    fn score_one(&self, item: &ScoreItem<'_, RemoteSession>) -> Result<Vec<Target>, EngineError> {
        let session = &*item.session;
        let mut full = session.tokens.clone();
        full.extend_from_slice(item.tokens);
        let base = session.tokens.len();
        let ends: Vec<usize> = match item.wanted {
            // vLLM computes what its prefix cache lacks with the next request.
            Wanted::Nothing => return Ok(Vec::new()),
            Wanted::Last => vec![full.len()],
            Wanted::Rows(rows) => rows.iter().map(|&r| base + r + 1).collect(),
        };
        if ends.iter().any(|&e| e == 0 || e > full.len()) {
            return Err(self.remote("a wanted row lies outside the new tokens"));
        }
        if item.seeds.len() != ends.len() {
            return Err(self.remote("a seed is missing for a wanted row"));
        }
        let requests = ends
            .iter()
            .zip(item.seeds)
            .enumerate()
            .map(|(i, (&end, &seed))| {
                let prompt = &full[..end];
                let draft = item.drafts.get(i).copied().flatten();
                move || self.target(prompt, item.sampling, seed, draft)
            });
        all_at_once(requests, || self.remote("the request thread panicked"))
            .into_iter()
            .collect()
    }
}

/// A log-probability as vLLM writes it, as a probability.
fn probability(logprob: f32) -> Result<f32, String> {
    if logprob.is_nan() || logprob > 1e-3 {
        return Err(format!("{logprob} is not a log-probability"));
    }
    Ok(if logprob <= LOGPROB_FLOOR {
        0.0
    } else {
        logprob.exp().min(1.0)
    })
}

/// A token id as vLLM writes it with `return_tokens_as_token_ids`.
fn token_id(text: &str) -> Result<u32, String> {
    text.strip_prefix(TOKEN_ID_PREFIX)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| format!("{text:?} is not a token id"))
}

/// A `/v1/completions` answer, reduced to what verification needs (the rest is skipped
/// unparsed).
#[derive(Debug, Deserialize)]
struct CompletionResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    logprobs: Option<LogProbs>,
}

/// The OpenAI completion API's log-probabilities: per generated token, its text (here
/// `token_id:N`), its log-probability and a map of candidates to theirs.
#[derive(Debug, Deserialize)]
struct LogProbs {
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_logprobs: Vec<Option<f32>>,
    #[serde(default)]
    top_logprobs: Vec<Option<HashMap<String, f32>>>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// Reads an answer to one prompt with `n` 1: its choice, and the prompt tokens vLLM computed
/// (all but the cached ones) where it reports usage.
fn parse_completion(text: &str) -> Result<(Choice, Option<u64>), String> {
    let mut answer: CompletionResponse = serde_json::from_str(text)
        .map_err(|e| format!("unexpected answer ({e}): {}", clip(text)))?;
    if answer.choices.len() != 1 {
        return Err(format!("{} choices for one prompt", answer.choices.len()));
    }
    // vLLM reports cached tokens only where there were some (and only with
    // `--enable-prompt-tokens-details`): none said, none cached.
    let evaluated = answer.usage.map(|u| {
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        u.prompt_tokens.saturating_sub(cached)
    });
    Ok((answer.choices.remove(0), evaluated))
}

impl Choice {
    fn logprobs(&self) -> Result<&LogProbs, String> {
        self.logprobs
            .as_ref()
            .ok_or_else(|| "the answer has no log-probabilities".to_string())
    }

    /// The one token vLLM sampled, and its probability.
    fn sampled(&self) -> Result<(u32, f32), String> {
        let lp = self.logprobs()?;
        let (token, logprob) = match (lp.tokens.as_slice(), lp.token_logprobs.as_slice()) {
            ([t], [Some(l)]) => (token_id(t)?, *l),
            (t, l) => {
                return Err(format!(
                    "{} tokens and {} log-probabilities for one sampled token",
                    t.len(),
                    l.len()
                ));
            }
        };
        if let Some(ids) = &self.token_ids
            && ids.as_slice() != [token]
        {
            return Err(format!("token_ids {ids:?} disagree with the token {token}"));
        }
        Ok((token, probability(logprob)?))
    }

    /// The candidates reported with the first token, by id.
    fn first_top(&self) -> Result<HashMap<u32, f32>, String> {
        let top = self
            .logprobs()?
            .top_logprobs
            .first()
            .and_then(Option::as_ref)
            .ok_or("the answer has no candidates")?;
        top.iter()
            .map(|(t, &l)| {
                if l.is_nan() || l > 1e-3 {
                    return Err(format!("{l} is not a log-probability"));
                }
                Ok((token_id(t)?, l))
            })
            .collect()
    }

    /// Every token id's log-probability, from a whole-vocabulary answer: each id in
    /// `0..vocab` exactly once.
    fn logits(&self, vocab: usize) -> Result<Vec<f32>, String> {
        let top = self.first_top()?;
        if top.len() != vocab {
            return Err(format!(
                "{} log-probabilities for a vocabulary of {vocab}",
                top.len()
            ));
        }
        let mut row = vec![f32::NAN; vocab];
        for (id, l) in top {
            *row.get_mut(id as usize)
                .ok_or_else(|| format!("token id {id} is outside the vocabulary"))? = l;
        }
        Ok(row)
    }
}

impl Engine for Vllm {
    type Session = RemoteSession;

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn session(&self) -> RemoteSession {
        RemoteSession::new()
    }

    /// Every item's requests at once, so that vLLM batches them.
    fn score(
        &self,
        items: &mut [ScoreItem<'_, RemoteSession>],
    ) -> Result<Vec<Vec<Target>>, EngineError> {
        let results = score_all(
            items,
            |item| self.score_one(item),
            || self.remote("the request thread panicked"),
        )?;
        for item in items.iter_mut() {
            item.session.tokens.extend_from_slice(item.tokens);
        }
        Ok(results)
    }

    fn logits_at(&self, session: &RemoteSession, len: usize) -> Result<Vec<f32>, EngineError> {
        let prompt = session
            .prefix(len)
            .ok_or_else(|| self.remote("no context to score"))?;
        self.whole(prompt)
    }

    /// [`DRAWS_PER_ASK`] more samples, in parallel requests with seeds drawn from `seed`.
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
        let mut seeds = ChaCha8Rng::seed_from_u64(u64::from(seed));
        let requests = (0..DRAWS_PER_ASK).map(|_| {
            let body = self.sample_body(prompt, sampling, seeds.next_u32());
            move || self.request(&body)?.sampled().map_err(|e| self.remote(e))
        });
        all_at_once(requests, || self.remote("the request thread panicked"))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(asks_tokens: bool) -> Vllm {
        let check = EngineCheck {
            n_vocab: 4,
            slots: None,
            model: "qwen".into(),
            asks_tokens,
        };
        Vllm::new(
            "http://127.0.0.1:9/",
            &check,
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn requests_carry_token_ids_and_the_sessions_whole_sampling() {
        let vllm = engine(true);
        let sampling = SamplingOptions {
            temperature: 0.7,
            top_k: Some(40),
            ..SamplingOptions::default()
        };
        let body = vllm.sample_body(&[5, 6, 7], &sampling, 42);
        assert_eq!(body["model"], "qwen");
        assert_eq!(body["prompt"], json!([5, 6, 7]));
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["seed"], 42);
        assert_eq!(body["temperature"].as_f64().unwrap() as f32, 0.7);
        assert_eq!(body["top_k"], 40);
        assert_eq!(body["top_p"], 1.0);
        // The model's generation_config would otherwise apply.
        assert_eq!(body["min_p"], 0.0);
        assert_eq!(body["repetition_penalty"], 1.0);
        assert_eq!(body["add_special_tokens"], false);
        assert_eq!(body["return_tokens_as_token_ids"], true);
        assert_eq!(body["logprobs"], 0);
        let greedy = vllm.sample_body(&[5], &SamplingOptions::greedy(3), 1);
        assert_eq!(greedy["temperature"], 0.0);
        let whole = vllm.whole_body(&[5]);
        // As many as the vocabulary holds: vLLM answers -1 with no candidate.
        assert_eq!(whole["logprobs"], 4);
        assert_eq!(whole["temperature"], 1.0);
        assert_eq!(whole["top_k"], 0);
    }

    /// An answer in the shape of vLLM's `CompletionResponse` (its pydantic model in
    /// `vllm/entrypoints/openai/completion/protocol.py`), with `return_tokens_as_token_ids`.
    fn answer(tokens: &str, logprobs: &str, top: &str, token_ids: &str) -> String {
        format!(
            r#"{{"id":"cmpl-1","object":"text_completion","created":1,"model":"qwen",
            "choices":[{{"index":0,"text":"x","logprobs":{{"text_offset":[0],
            "token_logprobs":{logprobs},"tokens":{tokens},"top_logprobs":{top}}},
            "finish_reason":"length","stop_reason":null,"token_ids":{token_ids},
            "prompt_logprobs":null,"prompt_token_ids":null}}],
            "usage":{{"prompt_tokens":10,"total_tokens":11,"completion_tokens":1,
            "prompt_tokens_details":{{"cached_tokens":8}}}}}}"#
        )
    }

    #[test]
    fn answers_are_read_as_vllm_documents_them() {
        let text = answer(
            r#"["token_id:3"]"#,
            "[-0.5]",
            r#"[{"token_id:3":-0.5,"token_id:1":-2.0,"token_id:2":-9999.0}]"#,
            "[3]",
        );
        let (choice, evaluated) = parse_completion(&text).unwrap();
        assert_eq!(evaluated, Some(2));
        let (token, p) = choice.sampled().unwrap();
        assert_eq!(token, 3);
        assert!((p - (-0.5f32).exp()).abs() < 1e-7);
        let top = choice.first_top().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[&1], -2.0);
        // vLLM's floor stands for minus infinity: a token top-k or top-p removed.
        assert_eq!(probability(top[&2]).unwrap(), 0.0);
        // A whole-vocabulary answer: every id once.
        let whole = answer(
            r#"["token_id:0"]"#,
            "[-1.0]",
            r#"[{"token_id:0":-1.0,"token_id:1":-2.0,"token_id:2":-3.0,"token_id:3":-0.7}]"#,
            "[0]",
        );
        let (choice, _) = parse_completion(&whole).unwrap();
        assert_eq!(choice.logits(4).unwrap(), [-1.0, -2.0, -3.0, -0.7]);
        assert!(choice.logits(5).is_err());
        // Without prompt-token details (vLLM leaves them out where none was cached), every
        // prompt token was computed.
        let bare = r#"{"choices":[{"index":0,"text":"","logprobs":null}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        assert_eq!(parse_completion(bare).unwrap().1, Some(3));
    }

    #[test]
    fn garbage_answers_are_errors() {
        let sampled_errors = [
            // Text where a token id belongs (return_tokens_as_token_ids ignored).
            answer(r#"["Hello"]"#, "[-0.5]", r#"[{"Hello":-0.5}]"#, "[3]"),
            // token_ids disagree with the token.
            answer(
                r#"["token_id:3"]"#,
                "[-0.5]",
                r#"[{"token_id:3":-0.5}]"#,
                "[4]",
            ),
            // Two tokens for one.
            answer(
                r#"["token_id:3","token_id:4"]"#,
                "[-0.5,-0.1]",
                "[null,null]",
                "[3,4]",
            ),
            // A log-probability above zero.
            answer(
                r#"["token_id:3"]"#,
                "[0.5]",
                r#"[{"token_id:3":0.5}]"#,
                "[3]",
            ),
        ];
        for text in &sampled_errors {
            let (choice, _) = parse_completion(text).unwrap();
            assert!(choice.sampled().is_err(), "{text}");
        }
        let bad_top = answer(
            r#"["token_id:3"]"#,
            "[-0.5]",
            r#"[{"token_id:x":-0.5}]"#,
            "[3]",
        );
        assert!(parse_completion(&bad_top).unwrap().0.first_top().is_err());
        let no_logprobs = r#"{"choices":[{"index":0,"text":"x"}]}"#;
        assert!(parse_completion(no_logprobs).unwrap().0.sampled().is_err());
        // vLLM's error body, and two choices for one prompt.
        let error =
            r#"{"error":{"message":"bad","type":"BadRequestError","param":"logprobs","code":400}}"#;
        assert!(parse_completion(error).is_err());
        let two = r#"{"choices":[{"index":0,"text":""},{"index":1,"text":""}]}"#;
        assert!(parse_completion(two).is_err());
        assert!(parse_completion("<html>502</html>").is_err());
    }

    #[test]
    fn a_refused_draft_probability_or_an_engine_that_is_down_is_a_remote_error() {
        // Nothing listens on port 9.
        let vllm = engine(true);
        let sampling = SamplingOptions {
            temperature: 1.0,
            ..SamplingOptions::default()
        };
        let e = vllm.target(&[1, 2], &sampling, 0, Some(3)).unwrap_err();
        assert!(matches!(e, EngineError::Remote { .. }), "{e}");
    }
}
