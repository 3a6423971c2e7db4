//! The hybrid loop end to end: SDK engine ↔ real `uhlm-server` process over QUIC, real models.

use crate::e2e_common;

use std::sync::Arc;

use e2e_common::{Recorder, ServerProc, llm_greedy};
use uhlm_core::protocol::{
    DEFAULT_MAX_FRAME_BYTES, Hello, Message, PROTOCOL_VERSION, encode_frame,
};
use uhlm_sdk::{
    CancelToken, Codec, DraftModel, EngineConfig, GenerationOptions, HybridEngine, Mode,
    PolicyConfig, Prompt, SamplingOptions, SdkError, TokenSource,
};

const PROMPT: &str = "Explain in two sentences why the sky is blue.";
const MAX_TOKENS: u32 = 20;

fn greedy() -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingOptions::greedy(MAX_TOKENS),
        chat_template: true,
    }
}

/// With temperature 0 every verified token is the LLM's argmax, so a run that verifies every
/// token must reproduce the LLM alone exactly, whatever the uplink codec.
#[test]
fn verifying_every_token_reproduces_the_llm_alone() {
    let server = ServerProc::start();
    let mut reference = None;
    let cases: Vec<(Mode, Codec, PolicyConfig)> =
        ["dense-f32", "dense-f16", "topk:32", "topp:0.99"]
            .iter()
            .map(|c| (Mode::Hlm, c.parse().unwrap(), PolicyConfig::send_all()))
            .chain([(
                Mode::Uhlm,
                "topk:32".parse().unwrap(),
                PolicyConfig::fixed(0.0),
            )])
            .collect();
    for (mode, codec, policy) in cases {
        let label = format!("{mode} {codec}");
        let engine = HybridEngine::new(server.engine_config(mode, codec, policy)).unwrap();
        let prompt = Prompt::Text(PROMPT.into());
        let expected = reference.get_or_insert_with(|| {
            let ids = engine.tokenize_prompt(&prompt, true).unwrap();
            llm_greedy(&ids, MAX_TOKENS)
        });
        let rec = Arc::new(Recorder::default());
        let summary = engine
            .generate_blocking(prompt, greedy(), rec.clone(), CancelToken::new())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            &summary.token_ids, expected,
            "{label}: differs from the LLM alone"
        );
        assert_eq!(rec.token_ids(), summary.token_ids, "{label}: events differ");
        let s = &summary.stats;
        assert_eq!(s.skipped, 0, "{label}");
        assert_eq!(s.offline, 0, "{label}");
        assert_eq!(s.sent, s.decisions, "{label}: every token is verified");
        assert_eq!(s.sent, s.accepted + s.resampled, "{label}");
        assert!(
            summary
                .sources
                .iter()
                .all(|s| matches!(s, TokenSource::Accepted | TokenSource::Resampled)),
            "{label}: {:?}",
            summary.sources
        );
    }
}

/// The default policy skips confident tokens, and the counters add up, down to the bytes the
/// server says it received.
#[test]
fn default_policy_skips_tokens_and_the_stats_add_up() {
    let server = ServerProc::start();
    let config = server.engine_config(Mode::Uhlm, Codec::default(), PolicyConfig::default());
    let client_name = config.client_name.clone();
    let engine = HybridEngine::new(config).unwrap();
    let rec = Arc::new(Recorder::default());
    let options = GenerationOptions {
        sampling: SamplingOptions {
            temperature: 0.7,
            seed: Some(7),
            max_tokens: 48,
            ..SamplingOptions::default()
        },
        chat_template: true,
    };
    let summary = engine
        .generate_blocking(
            Prompt::Text("Write a short poem about the sea.".into()),
            options,
            rec.clone(),
            CancelToken::new(),
        )
        .unwrap();
    let s = &summary.stats;
    assert!(s.skipped > 0, "nothing skipped: {s:?}");
    assert!(s.sent > 0, "nothing sent: {s:?}");
    assert_eq!(s.offline, 0);
    assert_eq!(s.drafted, s.skipped + s.sent, "{s:?}");
    assert_eq!(s.sent, s.accepted + s.resampled, "{s:?}");
    assert_eq!(s.decisions, s.drafted, "{s:?}");
    let n = summary.token_ids.len() as u64;
    assert!(
        s.decisions == n || s.decisions == n + 1,
        "decisions {} for {n} tokens",
        s.decisions
    );
    let local = summary
        .sources
        .iter()
        .filter(|x| **x == TokenSource::Local)
        .count() as u64;
    assert!(local == s.skipped || local + 1 == s.skipped);
    assert_eq!(rec.token_ids(), summary.token_ids);
    assert_eq!(rec.sources(), summary.sources);
    assert_eq!(engine.stats().uplink_bytes, s.uplink_bytes);

    // The server counts every byte it reads: our session frames plus the Hello.
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        model_fingerprint: engine.model_fingerprint(),
        api_key: e2e_common::API_KEY.into(),
        client: client_name,
    });
    let hello_bytes = encode_frame(&hello, DEFAULT_MAX_FRAME_BYTES).unwrap().len() as f64;
    let expected = s.uplink_bytes as f64 + hello_bytes;
    let got = server.wait_metric("uhlm_uplink_bytes_total", |v| v == expected);
    assert_eq!(
        got, expected,
        "server-side uplink bytes differ from the SDK's count"
    );
    assert!(s.downlink_bytes > 0);
    // The Start, then one Verify per chain: a chain settles at least one sent token.
    assert!(s.round_trips >= 2 && s.round_trips <= s.sent + 1, "{s:?}");
}

/// Local tokens given to the server ahead of the next `Verify` (`Extend`) change when the
/// server scores them, not what is generated: the same tokens from the same sources, with the
/// server told every local token before the last request, either way.
#[test]
fn tokens_sent_ahead_change_nothing_but_when_the_server_scores_them() {
    let server = ServerProc::start();
    let mut runs = Vec::new();
    for extend_after in [0, 1, 3] {
        let config = EngineConfig {
            extend_after,
            // One request at a time: every local token is final as soon as it is drafted.
            max_lookahead: 0,
            ..server.engine_config(Mode::Uhlm, Codec::default(), PolicyConfig::fixed(0.5))
        };
        let engine = HybridEngine::new(config).unwrap();
        let extended = server.metric("uhlm_extended_tokens_total");
        let summary = engine
            .generate_blocking(
                Prompt::Text("Write a short poem about the sea.".into()),
                greedy(),
                Arc::new(Recorder::default()),
                CancelToken::new(),
            )
            .unwrap();
        let s = &summary.stats;
        assert!(s.skipped > 0 && s.sent > 0, "{s:?}");
        assert_eq!(s.offline, 0);
        // Each run of local tokens went ahead `extend_after` tokens at a time.
        let local_runs: Vec<usize> = summary
            .sources
            .split(|x| *x != TokenSource::Local)
            .map(<[TokenSource]>::len)
            .collect();
        let expected: usize = local_runs
            .iter()
            .map(|n| n.checked_div(extend_after).unwrap_or(0))
            .sum();
        assert_eq!(s.extends as usize, expected, "{local_runs:?} {s:?}");
        assert!(extend_after == 0 || expected > 0, "{local_runs:?}");
        let sent_ahead = server.wait_metric("uhlm_extended_tokens_total", |v| {
            v - extended == (expected * extend_after) as f64
        });
        assert_eq!(sent_ahead - extended, (expected * extend_after) as f64);
        runs.push((summary.token_ids, summary.sources));
    }
    assert!(runs.windows(2).all(|w| w[0] == w[1]), "the output changed");
}

/// A draft model scripted to put its mass on 1000, 2001, 3002, 1000, ... after any context.
struct Scripted {
    tokens: Vec<u32>,
    vocab: usize,
    steps: usize,
}

impl Scripted {
    const SCRIPT: [u32; 3] = [1000, 2001, 3002];

    fn row(&self) -> Vec<f32> {
        let mut logits = vec![0.0; self.vocab];
        logits[Self::SCRIPT[self.steps % 3] as usize] = 30.0;
        logits
    }
}

impl DraftModel for Scripted {
    fn context_length(&self) -> usize {
        8192
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }
    fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SdkError> {
        self.tokens.extend_from_slice(tokens);
        self.steps = 0;
        Ok(self.row())
    }
    fn step(&mut self, token: u32) -> Result<Vec<f32>, SdkError> {
        self.tokens.push(token);
        self.steps += 1;
        Ok(self.row())
    }
}

/// An app's own draft model (another runtime, a load generator's replay): the engine drafts
/// with it, checks that it scores the loaded model's vocabulary, and verification keeps the
/// output the LLM's whatever it drafts.
#[test]
fn an_engine_drafts_with_the_model_it_is_given() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = |config: EngineConfig, extra: usize| {
        HybridEngine::with_draft_model(config, rt.handle().clone(), move |model| {
            Ok(Box::new(Scripted {
                tokens: Vec::new(),
                vocab: model.info().vocab_size + extra,
                steps: 0,
            }))
        })
        .unwrap()
    };
    let prompt = || Prompt::Text(PROMPT.into());
    let options = GenerationOptions {
        sampling: SamplingOptions::greedy(6),
        chat_template: false,
    };
    let on_device = EngineConfig {
        slm_path: e2e_common::draft_path(),
        mode: Mode::Slm,
        threads: Some(1),
        ..EngineConfig::default()
    };
    let summary = engine(on_device.clone(), 0)
        .generate_blocking(
            prompt(),
            options.clone(),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.token_ids, [1000, 2001, 3002, 1000, 2001, 3002]);
    // A row of another vocabulary is refused, not sampled from.
    match engine(on_device, 1).generate_blocking(
        prompt(),
        options.clone(),
        Arc::new(Recorder::default()),
        CancelToken::new(),
    ) {
        Err(SdkError::Model(m)) => assert!(m.contains("logits for a vocabulary of"), "{m}"),
        other => panic!("expected a model error, got {other:?}"),
    }
    // Every token verified: the scripted drafts are rejected or accepted by the LLM's rule.
    let server = ServerProc::start();
    let hybrid = engine(
        server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all()),
        0,
    );
    let summary = hybrid
        .generate_blocking(
            prompt(),
            options,
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    let ids = hybrid.tokenize_prompt(&prompt(), false).unwrap();
    assert_eq!(summary.token_ids, llm_greedy(&ids, 6));
    assert_eq!(summary.stats.offline, 0);
}
