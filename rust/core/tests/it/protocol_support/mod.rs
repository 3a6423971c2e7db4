//! Shared fixtures of the protocol tests: one sample of every message and proptest strategies.

#![allow(dead_code)] // each test binary uses a different part

use proptest::collection::vec;
use proptest::prelude::*;
use uhlm_core::chat::ChatMessage;
use uhlm_core::protocol::*;
use uhlm_core::sampling::SamplingOptions;

/// One instance of every message variant (and both prompt kinds), with non-trivial fields.
pub fn samples() -> Vec<Message> {
    vec![
        Hello {
            protocol_version: PROTOCOL_VERSION,
            model_fingerprint: [0xab; 32],
            api_key: "secret-key".into(),
            client: "uhlm-test/0.1.0".into(),
        }
        .into(),
        Welcome {
            protocol_version: PROTOCOL_VERSION,
            server: "uhlm-server/0.1.0".into(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_context_tokens: 8192,
            max_generate_tokens: 4096,
            max_chain_links: 16,
        }
        .into(),
        ErrorMessage::for_seq(ErrorCode::NeedResync, "context evicted", 41).into(),
        ErrorMessage::new(ErrorCode::Unknown(4000), "from the future").into(),
        Start {
            session_id: u64::MAX,
            prompt: Prompt::Tokens(vec![1, 2, 3, 49151, u32::MAX]),
            sampling: SamplingOptions {
                temperature: 0.7,
                top_k: Some(40),
                top_p: Some(0.95),
                max_tokens: 256,
                seed: Some(1234),
                stop: vec!["</s>".into(), "\n\n".into()],
            },
        }
        .into(),
        Start {
            session_id: 7,
            prompt: Prompt::Chat(vec![
                ChatMessage::system("Be brief."),
                ChatMessage::user("Héllo, wörld ✓"),
            ]),
            sampling: SamplingOptions::greedy(16),
        }
        .into(),
        Started {
            session_id: 7,
            context_len: 3,
            rendered: Some(vec![1, 500, 70000]),
        }
        .into(),
        Started {
            session_id: 8,
            context_len: 5,
            rendered: None,
        }
        .into(),
        Verify {
            seq: 3,
            position: 1000,
            skipped: vec![5, 6, 7],
            draft: Some(Draft {
                token: 6,
                q: (0..=255).collect(),
            }),
            uncertainty: 0.125,
            chain: vec![
                Link {
                    skipped: vec![],
                    draft: Draft {
                        token: 8,
                        q: vec![1, 2],
                    },
                    uncertainty: 0.5,
                },
                Link {
                    skipped: vec![9, 10],
                    draft: Draft {
                        token: 11,
                        q: vec![3],
                    },
                    uncertainty: 1.0,
                },
            ],
        }
        .into(),
        Verify {
            seq: u32::MAX,
            position: 0,
            skipped: vec![],
            draft: None,
            uncertainty: f32::NAN,
            chain: vec![],
        }
        .into(),
        Verdict {
            seq: 3,
            token: 6,
            accepted: true,
            beta: 0.0,
            tv_distance: 0.3,
            accepted_links: vec![Acceptance {
                beta: 0.1,
                tv_distance: 0.2,
            }],
            window: Some(3),
        }
        .into(),
        Resync {
            context: (0..2000).collect(),
        }
        .into(),
        Close {
            reason: "done".into(),
        }
        .into(),
        Generate {
            seq: 12,
            max_tokens: 300,
        }
        .into(),
        Tokens {
            seq: 12,
            tokens: vec![0, 49151, u32::MAX],
        }
        .into(),
        Finished {
            seq: 12,
            reason: FinishReason::Eos,
            context_len: 1003,
        }
        .into(),
        Finished {
            seq: u32::MAX,
            reason: FinishReason::Cancelled,
            context_len: u32::MAX,
        }
        .into(),
        Cancel { seq: 12 }.into(),
    ]
}

/// Postcard bytes of a message: the equality used for round trips, since `f32` NaN fields make
/// `PartialEq` useless and a lossless decode must re-encode to the same bytes.
pub fn payload(msg: &Message) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("messages always encode")
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,12}", Just(String::new())]
}

fn tokens() -> impl Strategy<Value = Vec<u32>> {
    vec(any::<u32>(), 0..24)
}

fn sampling() -> impl Strategy<Value = SamplingOptions> {
    (
        any::<f32>(),
        any::<Option<u32>>(),
        any::<Option<f32>>(),
        any::<u32>(),
        any::<Option<u64>>(),
        vec(text(), 0..3),
    )
        .prop_map(
            |(temperature, top_k, top_p, max_tokens, seed, stop)| SamplingOptions {
                temperature,
                top_k,
                top_p,
                max_tokens,
                seed,
                stop,
            },
        )
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

/// Any message, with every field drawn from its whole domain (NaN floats included).
pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<[u8; 32]>(), text(), text()).prop_map(|(v, f, k, c)| {
            Message::from(Hello {
                protocol_version: v,
                model_fingerprint: f,
                api_key: k,
                client: c,
            })
        }),
        (
            any::<u16>(),
            text(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(v, s, f, c, g, l)| {
                Message::from(Welcome {
                    protocol_version: v,
                    server: s,
                    max_frame_bytes: f,
                    max_context_tokens: c,
                    max_generate_tokens: g,
                    max_chain_links: l,
                })
            }),
        (error_code(), text(), any::<Option<u32>>()).prop_map(|(code, message, seq)| {
            Message::from(ErrorMessage { code, message, seq })
        }),
        (
            any::<u64>(),
            prop_oneof![
                tokens().prop_map(Prompt::Tokens),
                vec((text(), text()), 0..4).prop_map(|m| Prompt::Chat(
                    m.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect()
                )),
            ],
            sampling()
        )
            .prop_map(|(session_id, prompt, sampling)| Message::from(Start {
                session_id,
                prompt,
                sampling
            })),
        (any::<u64>(), any::<u32>(), proptest::option::of(tokens())).prop_map(
            |(session_id, context_len, rendered)| Message::from(Started {
                session_id,
                context_len,
                rendered
            })
        ),
        (
            any::<u32>(),
            any::<u32>(),
            tokens(),
            proptest::option::of((any::<u32>(), vec(any::<u8>(), 0..64))),
            any::<f32>(),
            vec(
                (
                    tokens(),
                    any::<u32>(),
                    vec(any::<u8>(), 0..16),
                    any::<f32>()
                ),
                0..4
            )
        )
            .prop_map(|(seq, position, skipped, draft, uncertainty, chain)| {
                Message::from(Verify {
                    seq,
                    position,
                    skipped,
                    draft: draft.map(|(token, q)| Draft { token, q }),
                    uncertainty,
                    chain: chain
                        .into_iter()
                        .map(|(skipped, token, q, uncertainty)| Link {
                            skipped,
                            draft: Draft { token, q },
                            uncertainty,
                        })
                        .collect(),
                })
            }),
        (
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            any::<f32>(),
            any::<f32>(),
            vec((any::<f32>(), any::<f32>()), 0..4),
            proptest::option::of(any::<u16>()),
        )
            .prop_map(|(seq, token, accepted, beta, tv_distance, links, window)| {
                Message::from(Verdict {
                    seq,
                    token,
                    accepted,
                    beta,
                    tv_distance,
                    accepted_links: links
                        .into_iter()
                        .map(|(beta, tv_distance)| Acceptance { beta, tv_distance })
                        .collect(),
                    window,
                })
            }),
        tokens().prop_map(|context| Message::from(Resync { context })),
        text().prop_map(|reason| Message::from(Close { reason })),
        (any::<u32>(), any::<u32>())
            .prop_map(|(seq, max_tokens)| Message::from(Generate { seq, max_tokens })),
        (any::<u32>(), tokens()).prop_map(|(seq, tokens)| Message::from(Tokens { seq, tokens })),
        (any::<u32>(), finish_reason(), any::<u32>()).prop_map(|(seq, reason, context_len)| {
            Message::from(Finished {
                seq,
                reason,
                context_len,
            })
        }),
        any::<u32>().prop_map(|seq| Message::from(Cancel { seq })),
    ]
}

fn finish_reason() -> impl Strategy<Value = FinishReason> {
    prop_oneof![
        Just(FinishReason::MaxTokens),
        Just(FinishReason::Eos),
        Just(FinishReason::ContextFull),
        Just(FinishReason::Cancelled),
    ]
}
