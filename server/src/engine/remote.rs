//! What the engines behind HTTP share: the client, reading answers with a size limit, asking
//! several things at once, and a session that is only the list of its tokens (its KV lives in
//! the engine's prompt cache).

use std::time::Duration;

use super::seam::{EngineError, EngineSession, ScoreItem};

/// Largest answer accepted: one prompt's full-vocabulary answer is about 10 MB of JSON on a
/// 150k vocabulary, and a chain carries up to `max_chain_links + 1` of them.
const MAX_RESPONSE_BYTES: u64 = 2 << 30;

/// Text whose tokenization an engine must agree on (words, digits, code, non-Latin script,
/// spaces and newlines: the pre-tokenizer's cases).
pub(super) const PROBE_TEXT: &str =
    "Hello world! def f(x):\n    return x * 42  # ok\n\tÜber 東京 ß 🙂 0.5e-3";

/// A client that reports HTTP errors as answers (their bodies say why) and gives up after
/// `timeout`.
pub(super) fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

pub(super) fn get_json(agent: &ureq::Agent, url: &str) -> Result<serde_json::Value, String> {
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    read_json(resp, url)
}

pub(super) fn post_json(
    agent: &ureq::Agent,
    url: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let resp = agent
        .post(url)
        .send_json(body)
        .map_err(|e| format!("POST {url}: {e}"))?;
    read_json(resp, url)
}

/// An answer's status and body (up to [`MAX_RESPONSE_BYTES`]).
pub(super) fn read_body(
    mut resp: ureq::http::Response<ureq::Body>,
) -> Result<(ureq::http::StatusCode, String), String> {
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok((status, text))
}

fn read_json(
    resp: ureq::http::Response<ureq::Body>,
    url: &str,
) -> Result<serde_json::Value, String> {
    let (status, text) = read_body(resp).map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}: {}", clip(&text)));
    }
    serde_json::from_str(&text).map_err(|e| format!("{url}: not JSON ({e}): {}", clip(&text)))
}

/// The start of an answer, for an error message.
pub(super) fn clip(text: &str) -> &str {
    let end = text.char_indices().nth(300).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// Runs every request on a thread of its own and waits for all: the engine batches what
/// arrives together.
pub(super) fn all_at_once<T: Send>(
    requests: impl Iterator<Item = impl FnOnce() -> Result<T, EngineError> + Send>,
    panicked: impl Fn() -> EngineError,
) -> Vec<Result<T, EngineError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = requests.map(|r| s.spawn(r)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(panicked())))
            .collect()
    })
}

/// Scores every item with `score_one` at once; all or nothing: on an error no item's answer
/// is kept, so that no session advances.
pub(super) fn score_all<T: Send>(
    items: &[ScoreItem<'_, RemoteSession>],
    score_one: impl Fn(&ScoreItem<'_, RemoteSession>) -> Result<T, EngineError> + Sync,
    panicked: impl Fn() -> EngineError,
) -> Result<Vec<T>, EngineError> {
    let score_one = &score_one;
    all_at_once(items.iter().map(|item| move || score_one(item)), panicked)
        .into_iter()
        .collect()
}

/// A session's context as the engine was last given it; its KV is in the engine's cache.
pub(crate) struct RemoteSession {
    pub(super) tokens: Vec<u32>,
    /// The engine's slot that last held this context (llama-server's; vLLM finds a cached
    /// prefix by itself).
    pub(super) slot: Option<i64>,
}

impl RemoteSession {
    pub(super) fn new() -> Self {
        Self {
            tokens: Vec::new(),
            slot: None,
        }
    }

    /// The first `len` tokens, which a request may be made after; `None` for none.
    pub(super) fn prefix(&self, len: usize) -> Option<&[u32]> {
        self.tokens.get(..len).filter(|p| !p.is_empty())
    }
}

impl EngineSession for RemoteSession {
    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    fn reset(&mut self) {
        self.tokens.clear();
    }

    fn kv_cache_bytes(&self) -> usize {
        self.tokens.capacity() * std::mem::size_of::<u32>()
    }
}
