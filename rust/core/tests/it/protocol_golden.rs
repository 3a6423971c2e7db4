//! Golden frames, byte for byte. `docs/PROTOCOL.md` prints the same bytes so that a client in
//! another language can check its encoder and decoder against them; change both together, and
//! only with a new protocol version.

use uhlm_core::protocol::*;

fn golden_hello() -> Message {
    Hello {
        protocol_version: 4,
        model_fingerprint: std::array::from_fn(|i| i as u8),
        api_key: "key".into(),
        client: "uhlm/0.1".into(),
    }
    .into()
}

const GOLDEN_HELLO: &[u8] = &[
    0x00, 0x00, 0x00, 0x2f, // payload length 47, big-endian
    0x00, // variant 0: Hello
    0x04, // protocol_version 4
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // model_fingerprint: 32 raw bytes
    0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, //
    0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, //
    0x03, b'k', b'e', b'y', // api_key
    0x08, b'u', b'h', b'l', b'm', b'/', b'0', b'.', b'1', // client
];

fn golden_verify() -> Message {
    Verify {
        seq: 7,
        position: 300,
        skipped: vec![17, 200],
        draft: Some(Draft {
            token: 42,
            // Sparse codec: vocab 49152, u8 weights, ids 42 and 100 with weights 3 and 1.
            q: vec![0x02, 0x80, 0x80, 0x03, 0x01, 0x02, 0x2a, 0x3a, 0x03, 0x01],
        }),
        uncertainty: 0.25,
        chain: vec![Link {
            skipped: vec![5],
            draft: Draft {
                token: 100,
                q: vec![0x02, 0x80, 0x80, 0x03, 0x01, 0x02, 0x2a, 0x3a, 0x03, 0x01],
            },
            uncertainty: 0.5,
        }],
    }
    .into()
}

const GOLDEN_VERIFY: &[u8] = &[
    0x00, 0x00, 0x00, 0x2c, // payload length 44
    0x05, // variant 5: Verify
    0x07, // seq 7
    0xac, 0x02, // position 300 = 0b10_0101100 → 0xac 0x02
    0x02, 0x11, 0xc8, 0x01, // skipped: length 2, then 17 and 200
    0x01, // draft: Some
    0x2a, // draft.token 42
    0x0a, 0x02, 0x80, 0x80, 0x03, 0x01, 0x02, 0x2a, 0x3a, 0x03,
    0x01, // draft.q: length 10, bytes
    0x00, 0x00, 0x80, 0x3e, // uncertainty 0.25f32 little-endian (0x3e800000)
    0x01, // chain: length 1
    0x01, 0x05, // chain[0].skipped: length 1, then 5
    0x64, // chain[0].draft.token 100
    0x0a, 0x02, 0x80, 0x80, 0x03, 0x01, 0x02, 0x2a, 0x3a, 0x03,
    0x01, // chain[0].draft.q: length 10, bytes
    0x00, 0x00, 0x00, 0x3f, // chain[0].uncertainty 0.5f32 (0x3f000000)
];

fn golden_verdict() -> Message {
    Verdict {
        seq: 7,
        token: 99,
        accepted: false,
        beta: 0.5,
        tv_distance: 0.25,
        accepted_links: vec![Acceptance {
            beta: 0.0,
            tv_distance: 0.125,
        }],
        window: Some(4),
    }
    .into()
}

const GOLDEN_VERDICT: &[u8] = &[
    0x00, 0x00, 0x00, 0x17, // payload length 23
    0x06, // variant 6: Verdict
    0x07, // seq 7
    0x63, // token 99
    0x00, // accepted: false
    0x00, 0x00, 0x00, 0x3f, // beta 0.5
    0x00, 0x00, 0x80, 0x3e, // tv_distance 0.25
    0x01, // accepted_links: length 1
    0x00, 0x00, 0x00, 0x00, // accepted_links[0].beta 0.0
    0x00, 0x00, 0x00, 0x3e, // accepted_links[0].tv_distance 0.125 (0x3e000000)
    0x01, 0x04, // window: Some(4)
];

fn golden_error() -> Message {
    ErrorMessage::new(ErrorCode::UnsupportedVersion, "v1").into()
}

const GOLDEN_ERROR: &[u8] = &[
    0x00, 0x00, 0x00, 0x06, // payload length 6
    0x02, // variant 2: Error
    0x00, // code 0: UnsupportedVersion
    0x02, b'v', b'1', // message
    0x00, // seq: None
];

fn golden_generate() -> Message {
    Generate {
        seq: 3,
        max_tokens: 300,
    }
    .into()
}

const GOLDEN_GENERATE: &[u8] = &[
    0x00, 0x00, 0x00, 0x04, // payload length 4
    0x09, // variant 9: Generate
    0x03, // seq 3
    0xac, 0x02, // max_tokens 300
];

fn golden_tokens() -> Message {
    Tokens {
        seq: 3,
        tokens: vec![17, 200, 49152],
    }
    .into()
}

const GOLDEN_TOKENS: &[u8] = &[
    0x00, 0x00, 0x00, 0x09, // payload length 9
    0x0a, // variant 10: Tokens
    0x03, // seq 3
    0x03, 0x11, 0xc8, 0x01, 0x80, 0x80, 0x03, // tokens: length 3, then 17, 200, 49152
];

fn golden_finished() -> Message {
    Finished {
        seq: 3,
        reason: FinishReason::Eos,
        context_len: 304,
    }
    .into()
}

const GOLDEN_FINISHED: &[u8] = &[
    0x00, 0x00, 0x00, 0x05, // payload length 5
    0x0b, // variant 11: Finished
    0x03, // seq 3
    0x01, // reason 1: Eos
    0xb0, 0x02, // context_len 304
];

fn golden_cancel() -> Message {
    Cancel { seq: 3 }.into()
}

const GOLDEN_CANCEL: &[u8] = &[
    0x00, 0x00, 0x00, 0x02, // payload length 2
    0x0c, // variant 12: Cancel
    0x03, // seq 3
];

fn golden_extend() -> Message {
    Extend {
        tokens: vec![42, 300],
    }
    .into()
}

const GOLDEN_EXTEND: &[u8] = &[
    0x00, 0x00, 0x00, 0x05, // payload length 5
    0x0d, // variant 13: Extend
    0x02, // 2 tokens
    0x2a, // 42
    0xac, 0x02, // 300
];

#[test]
fn golden_frames_encode_exactly() {
    for (msg, bytes) in [
        (golden_hello(), GOLDEN_HELLO),
        (golden_verify(), GOLDEN_VERIFY),
        (golden_verdict(), GOLDEN_VERDICT),
        (golden_error(), GOLDEN_ERROR),
        (golden_generate(), GOLDEN_GENERATE),
        (golden_tokens(), GOLDEN_TOKENS),
        (golden_finished(), GOLDEN_FINISHED),
        (golden_cancel(), GOLDEN_CANCEL),
        (golden_extend(), GOLDEN_EXTEND),
    ] {
        assert_eq!(encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap(), bytes);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        dec.push(bytes);
        assert_eq!(dec.next_frame().unwrap(), Some(msg));
        assert!(dec.is_empty());
    }
}

#[test]
fn golden_constants() {
    assert_eq!(PROTOCOL_VERSION, 5);
    assert_eq!(ALPN, b"uhlm/5");
    assert_eq!(
        LEGACY_ALPNS,
        &[
            b"uhlm/1".as_slice(),
            b"uhlm/2".as_slice(),
            b"uhlm/3".as_slice(),
            b"uhlm/4".as_slice()
        ]
    );
    assert_eq!(DEFAULT_MAX_FRAME_BYTES, 1024 * 1024);
    assert_eq!(LARGE_VOCAB_MAX_FRAME_BYTES, 2 * 1024 * 1024);
}

#[test]
fn golden_draft_is_what_the_codec_decodes() {
    let Message::Verify(Verify {
        draft: Some(draft), ..
    }) = golden_verify()
    else {
        panic!("the golden Verify carries a draft");
    };
    let q = uhlm_core::codec::decode(&draft.q, Some(49_152)).expect("valid sparse payload");
    assert_eq!(q.len(), 49_152);
    assert_eq!((q[42], q[100]), (0.75, 0.25));
    assert_eq!(q.iter().filter(|&&p| p != 0.0).count(), 2);
}
