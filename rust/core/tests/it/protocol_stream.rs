//! The legal order of messages on the control and session streams, driven without sockets.

use uhlm_core::chat::ChatMessage;
use uhlm_core::protocol::*;
use uhlm_core::sampling::SamplingOptions;

use Side::{Device, Server};

fn hello() -> Message {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        model_fingerprint: [0; 32],
        api_key: "k".into(),
        client: "test".into(),
    }
    .into()
}

fn welcome() -> Message {
    Welcome {
        protocol_version: PROTOCOL_VERSION,
        server: "test".into(),
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        max_context_tokens: 4096,
        max_generate_tokens: 1024,
        max_chain_links: 16,
    }
    .into()
}

fn error(code: ErrorCode, seq: Option<u32>) -> Message {
    ErrorMessage {
        code,
        message: String::new(),
        seq,
    }
    .into()
}

fn close() -> Message {
    Close {
        reason: "done".into(),
    }
    .into()
}

fn start_tokens(n: u32) -> Message {
    Start {
        session_id: 9,
        prompt: Prompt::Tokens((0..n).collect()),
        sampling: SamplingOptions::default(),
    }
    .into()
}

fn started(context_len: u32, rendered: Option<Vec<u32>>) -> Message {
    Started {
        session_id: 9,
        context_len,
        rendered,
    }
    .into()
}

fn verify(seq: u32, position: u32, skipped: usize) -> Message {
    Verify {
        seq,
        position,
        skipped: vec![1; skipped],
        draft: None,
        uncertainty: 0.5,
        chain: vec![],
    }
    .into()
}

fn verdict(seq: u32) -> Message {
    Verdict {
        seq,
        token: 3,
        accepted: false,
        beta: 0.0,
        tv_distance: 0.0,
        accepted_links: vec![],
        window: None,
    }
    .into()
}

fn resync(n: u32) -> Message {
    Resync {
        context: (0..n).collect(),
    }
    .into()
}

/// A session that started with a 10-token prompt.
fn ready_session() -> SessionStream {
    let mut s = SessionStream::new();
    s.on_message(Device, &start_tokens(10)).unwrap();
    s.on_message(Server, &started(10, None)).unwrap();
    s
}

#[test]
fn control_stream_handshake_and_close() {
    let mut c = ControlStream::new();
    assert_eq!(
        c.on_message(Server, &welcome()),
        Err(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        c.on_message(Device, &start_tokens(1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    c.on_message(Device, &hello()).unwrap();
    assert_eq!(c.phase(), ControlPhase::AwaitWelcome);
    assert_eq!(
        c.on_message(Device, &hello()),
        Err(ErrorCode::UnexpectedMessage)
    );
    c.on_message(Server, &welcome()).unwrap();
    assert_eq!(c.phase(), ControlPhase::Established);
    assert_eq!(
        c.on_message(Device, &verify(0, 0, 0)),
        Err(ErrorCode::UnexpectedMessage)
    );
    c.on_message(Device, &close()).unwrap();
    assert_eq!(c.phase(), ControlPhase::Closed);
    assert_eq!(
        c.on_message(Server, &close()),
        Err(ErrorCode::UnexpectedMessage)
    );
}

#[test]
fn control_stream_rejected_hello_closes() {
    let mut c = ControlStream::default();
    c.on_message(Device, &hello()).unwrap();
    c.on_message(Server, &error(ErrorCode::Unauthorized, None))
        .unwrap();
    assert_eq!(c.phase(), ControlPhase::Closed);
    assert_eq!(
        c.on_message(Server, &welcome()),
        Err(ErrorCode::UnexpectedMessage)
    );
}

#[test]
fn session_tracks_context_through_verdicts() {
    let mut s = ready_session();
    assert_eq!(s.session_id(), Some(9));
    assert_eq!(s.context_len(), Some(10));
    assert_eq!(s.next_position(2), Some(12));
    s.on_message(Device, &verify(1, 12, 2)).unwrap();
    assert_eq!(s.phase(), SessionPhase::Verifying { seq: 1 });
    // One request at a time.
    assert_eq!(
        s.on_message(Device, &verify(2, 13, 0)),
        Err(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        s.on_message(Server, &verdict(2)),
        Err(ErrorCode::UnexpectedMessage)
    );
    s.on_message(Server, &verdict(1)).unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
    assert_eq!(s.context_len(), Some(13));
    s.on_message(Device, &verify(2, 13, 0)).unwrap();
    s.on_message(Server, &verdict(2)).unwrap();
    assert_eq!(s.context_len(), Some(14));
    s.on_message(Server, &close()).unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
    assert_eq!(
        s.on_message(Device, &verify(3, 14, 0)),
        Err(ErrorCode::UnexpectedMessage)
    );
}

#[test]
fn wrong_position_is_a_mismatch_and_leads_to_resync() {
    let mut s = ready_session();
    assert_eq!(
        s.on_message(Device, &verify(1, 11, 2)),
        Err(ErrorCode::PositionMismatch)
    );
    assert_eq!(
        s.phase(),
        SessionPhase::Ready,
        "a rejected message changes nothing"
    );
    // More skipped tokens than the position allows.
    assert_eq!(
        s.on_message(Device, &verify(1, 1, 2)),
        Err(ErrorCode::PositionMismatch)
    );
    s.on_message(Server, &error(ErrorCode::PositionMismatch, Some(1)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::NeedResync);
    assert_eq!(s.context_len(), None);
    assert_eq!(
        s.on_message(Device, &verify(1, 12, 2)),
        Err(ErrorCode::UnexpectedMessage)
    );
    s.on_message(Device, &resync(20)).unwrap();
    assert_eq!(s.phase(), SessionPhase::Resyncing);
    assert_eq!(
        s.on_message(Server, &started(19, None)),
        Err(ErrorCode::InvalidRequest),
        "Started must report the resynced length"
    );
    s.on_message(Server, &started(20, None)).unwrap();
    assert_eq!(s.context_len(), Some(20));
    s.on_message(Device, &verify(2, 20, 0)).unwrap();
}

#[test]
fn need_resync_reply_to_verify() {
    let mut s = ready_session();
    s.on_message(Device, &verify(5, 10, 0)).unwrap();
    assert_eq!(
        s.on_message(Server, &error(ErrorCode::NeedResync, Some(4))),
        Err(ErrorCode::UnexpectedMessage),
        "an error answering another seq"
    );
    s.on_message(Server, &error(ErrorCode::NeedResync, Some(5)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::NeedResync);
    s.on_message(Device, &resync(10)).unwrap();
    s.on_message(Server, &started(10, None)).unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
}

#[test]
fn rate_limited_request_leaves_the_context_unchanged() {
    let mut s = ready_session();
    s.on_message(Device, &verify(1, 13, 3)).unwrap();
    s.on_message(Server, &error(ErrorCode::RateLimited, Some(1)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
    assert_eq!(s.context_len(), Some(10));
    s.on_message(Device, &verify(2, 13, 3)).unwrap();

    let mut s = SessionStream::new();
    s.on_message(Device, &start_tokens(4)).unwrap();
    s.on_message(Server, &error(ErrorCode::SessionLimit, None))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::AwaitStart);
    assert_eq!(s.session_id(), None);
    s.on_message(Device, &start_tokens(4)).unwrap();
}

#[test]
fn terminal_errors_and_unknown_codes_end_the_session() {
    for code in [
        ErrorCode::ContextTooLong,
        ErrorCode::InvalidRequest,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::Unknown(777),
    ] {
        let mut s = ready_session();
        s.on_message(Device, &verify(1, 10, 0)).unwrap();
        s.on_message(Server, &error(code, Some(1))).unwrap();
        assert_eq!(s.phase(), SessionPhase::Closed, "{code}");
    }
    // A device-side error also ends it, whatever the code.
    let mut s = ready_session();
    s.on_message(Device, &error(ErrorCode::NeedResync, None))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
    // NeedResync before any context exists cannot be honoured.
    let mut s = SessionStream::new();
    s.on_message(Device, &start_tokens(1)).unwrap();
    s.on_message(Server, &error(ErrorCode::NeedResync, None))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
}

#[test]
fn chat_prompt_must_be_answered_with_the_rendering() {
    let chat = Message::from(Start {
        session_id: 9,
        prompt: Prompt::Chat(vec![ChatMessage::user("hi")]),
        sampling: SamplingOptions::greedy(4),
    });
    let mut s = SessionStream::new();
    s.on_message(Device, &chat).unwrap();
    assert_eq!(
        s.on_message(Server, &started(3, None)),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        s.on_message(Server, &started(2, Some(vec![1, 2, 3]))),
        Err(ErrorCode::InvalidRequest)
    );
    let other_session = Message::from(Started {
        session_id: 10,
        context_len: 3,
        rendered: Some(vec![1, 2, 3]),
    });
    assert_eq!(
        s.on_message(Server, &other_session),
        Err(ErrorCode::InvalidRequest)
    );
    s.on_message(Server, &started(3, Some(vec![1, 2, 3])))
        .unwrap();
    assert_eq!(s.context_len(), Some(3));
    // A Tokens prompt must not be echoed back.
    let mut s = SessionStream::new();
    s.on_message(Device, &start_tokens(3)).unwrap();
    assert_eq!(
        s.on_message(Server, &started(3, Some(vec![0, 1, 2]))),
        Err(ErrorCode::InvalidRequest)
    );
}

#[test]
fn messages_from_the_wrong_side_or_stream_are_unexpected() {
    let mut s = SessionStream::new();
    for (side, msg) in [
        (Device, hello()),
        (Server, welcome()),
        (Server, start_tokens(1)),
        (Device, verify(0, 0, 0)),
        (Device, resync(1)),
        (Device, started(1, None)),
        (Server, verdict(0)),
    ] {
        assert_eq!(
            s.on_message(side, &msg),
            Err(ErrorCode::UnexpectedMessage),
            "{side:?} {}",
            msg.kind()
        );
    }
    let mut s = ready_session();
    assert_eq!(
        s.on_message(Device, &start_tokens(1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        s.on_message(Server, &verify(0, 10, 0)),
        Err(ErrorCode::UnexpectedMessage)
    );
    // The device may resync proactively from Ready.
    s.on_message(Device, &resync(3)).unwrap();
    s.on_message(Server, &started(3, None)).unwrap();
}

#[test]
fn next_position_never_overflows() {
    let s = SessionStream::new();
    assert_eq!(s.next_position(0), None, "no context before Started");
    let s = ready_session();
    assert_eq!(s.next_position(usize::MAX), None);
    assert_eq!(s.next_position(u32::MAX as usize), None);
    assert_eq!(s.next_position(u32::MAX as usize - 10), Some(u32::MAX));
}

fn generate(seq: u32, max_tokens: u32) -> Message {
    Generate { seq, max_tokens }.into()
}

fn tokens(seq: u32, n: u32) -> Message {
    Tokens {
        seq,
        tokens: (100..100 + n).collect(),
    }
    .into()
}

fn finished(seq: u32, reason: FinishReason, context_len: u32) -> Message {
    Finished {
        seq,
        reason,
        context_len,
    }
    .into()
}

fn cancel(seq: u32) -> Message {
    Cancel { seq }.into()
}

#[test]
fn generate_streams_tokens_and_finishes_with_the_context_length() {
    let mut s = ready_session();
    assert_eq!(
        s.on_message(Device, &generate(4, 0)),
        Err(ErrorCode::InvalidRequest),
        "a Generate for no token"
    );
    assert_eq!(s.phase(), SessionPhase::Ready);
    s.on_message(Device, &generate(4, 5)).unwrap();
    assert_eq!(
        s.phase(),
        SessionPhase::Generating {
            seq: 4,
            cancel_sent: false
        }
    );
    // One request at a time, and only answers to this one.
    for (side, msg) in [
        (Device, generate(5, 1)),
        (Device, verify(5, 10, 0)),
        (Device, resync(10)),
        (Server, tokens(3, 1)),
        (Server, verdict(4)),
        (Server, finished(3, FinishReason::Eos, 10)),
    ] {
        assert_eq!(
            s.on_message(side, &msg),
            Err(ErrorCode::UnexpectedMessage),
            "{side:?} {}",
            msg.kind()
        );
    }
    s.on_message(Server, &tokens(4, 1)).unwrap();
    s.on_message(Server, &tokens(4, 3)).unwrap();
    assert_eq!(s.context_len(), Some(14));
    assert_eq!(
        s.on_message(Server, &tokens(4, 2)),
        Err(ErrorCode::InvalidRequest),
        "more tokens than asked for"
    );
    assert_eq!(
        s.on_message(Server, &tokens(4, 0)),
        Err(ErrorCode::InvalidRequest),
        "an empty Tokens"
    );
    assert_eq!(
        s.on_message(Server, &finished(4, FinishReason::MaxTokens, 14)),
        Err(ErrorCode::InvalidRequest),
        "MaxTokens before max_tokens tokens"
    );
    assert_eq!(
        s.on_message(Server, &finished(4, FinishReason::Cancelled, 14)),
        Err(ErrorCode::InvalidRequest),
        "Cancelled without a Cancel"
    );
    s.on_message(Server, &tokens(4, 1)).unwrap();
    assert_eq!(
        s.on_message(Server, &finished(4, FinishReason::MaxTokens, 16)),
        Err(ErrorCode::InvalidRequest),
        "a context length that is not ours"
    );
    s.on_message(Server, &finished(4, FinishReason::MaxTokens, 15))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
    assert_eq!(s.context_len(), Some(15));
    // The session goes on: hybrid requests see the generated tokens in the context.
    s.on_message(Device, &verify(5, 15, 0)).unwrap();
    s.on_message(Server, &verdict(5)).unwrap();
    s.on_message(Device, &generate(6, 8)).unwrap();
    s.on_message(Server, &tokens(6, 2)).unwrap();
    s.on_message(Server, &finished(6, FinishReason::Eos, 18))
        .unwrap();
    s.on_message(Device, &generate(7, 8)).unwrap();
    s.on_message(Server, &finished(7, FinishReason::ContextFull, 18))
        .unwrap();
    assert_eq!(s.context_len(), Some(18));
}

#[test]
fn cancel_is_answered_by_finished_even_when_they_cross() {
    // The device cancels; the server sends what it had, then Finished { Cancelled }.
    let mut s = ready_session();
    assert_eq!(
        s.on_message(Device, &cancel(1)),
        Err(ErrorCode::UnexpectedMessage),
        "nothing to cancel"
    );
    s.on_message(Device, &generate(1, 50)).unwrap();
    assert_eq!(
        s.on_message(Device, &cancel(2)),
        Err(ErrorCode::UnexpectedMessage),
        "another request's seq"
    );
    s.on_message(Server, &tokens(1, 2)).unwrap();
    s.on_message(Device, &cancel(1)).unwrap();
    assert_eq!(
        s.phase(),
        SessionPhase::Generating {
            seq: 1,
            cancel_sent: true
        }
    );
    assert_eq!(
        s.on_message(Device, &cancel(1)),
        Err(ErrorCode::UnexpectedMessage),
        "cancelled twice"
    );
    s.on_message(Server, &tokens(1, 1)).unwrap();
    s.on_message(Server, &finished(1, FinishReason::Cancelled, 13))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
    assert_eq!(
        s.on_message(Device, &cancel(1)),
        Err(ErrorCode::UnexpectedMessage),
        "the Cancel was already answered"
    );

    // Device view of a crossing: Cancel sent, then Finished { MaxTokens } arrives.
    let mut device = ready_session();
    device.on_message(Device, &generate(2, 1)).unwrap();
    device.on_message(Device, &cancel(2)).unwrap();
    device.on_message(Server, &tokens(2, 1)).unwrap();
    device
        .on_message(Server, &finished(2, FinishReason::MaxTokens, 11))
        .unwrap();
    assert_eq!(device.phase(), SessionPhase::Ready);

    // Server view of the same crossing: Finished sent, then the Cancel arrives and is a no-op.
    let mut server = ready_session();
    server.on_message(Device, &generate(2, 1)).unwrap();
    server.on_message(Server, &tokens(2, 1)).unwrap();
    server
        .on_message(Server, &finished(2, FinishReason::MaxTokens, 11))
        .unwrap();
    server.on_message(Device, &cancel(2)).unwrap();
    assert_eq!(server.phase(), SessionPhase::Ready);
    assert_eq!(server.context_len(), Some(11));
    assert_eq!(
        server.on_message(Device, &cancel(2)),
        Err(ErrorCode::UnexpectedMessage),
        "only one late Cancel"
    );
    // A late Cancel after the next request is a bug.
    let mut server = ready_session();
    server.on_message(Device, &generate(3, 1)).unwrap();
    server.on_message(Server, &tokens(3, 1)).unwrap();
    server
        .on_message(Server, &finished(3, FinishReason::MaxTokens, 11))
        .unwrap();
    server.on_message(Device, &verify(4, 11, 0)).unwrap();
    assert_eq!(
        server.on_message(Device, &cancel(3)),
        Err(ErrorCode::UnexpectedMessage)
    );
}

#[test]
fn errors_during_a_generation() {
    // Refused before any token (rate limit): nothing applied, the session is ready again.
    let mut s = ready_session();
    s.on_message(Device, &generate(1, 4)).unwrap();
    assert_eq!(
        s.on_message(Server, &error(ErrorCode::RateLimited, Some(2))),
        Err(ErrorCode::UnexpectedMessage),
        "an error answering another seq"
    );
    s.on_message(Server, &error(ErrorCode::RateLimited, Some(1)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready);
    assert_eq!(s.context_len(), Some(10));
    // Evicted context: resync, then generate again.
    s.on_message(Device, &generate(2, 4)).unwrap();
    s.on_message(Server, &error(ErrorCode::NeedResync, Some(2)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::NeedResync);
    s.on_message(Device, &resync(10)).unwrap();
    s.on_message(Server, &started(10, None)).unwrap();
    // A model failure mid-stream ends the session; so does the device closing it.
    s.on_message(Device, &generate(3, 4)).unwrap();
    s.on_message(Server, &tokens(3, 2)).unwrap();
    s.on_message(Server, &error(ErrorCode::Internal, Some(3)))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
    let mut s = ready_session();
    s.on_message(Device, &generate(1, 4)).unwrap();
    s.on_message(Device, &close()).unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
    // Generate and Cancel come from the device only; Tokens and Finished from the server only.
    let mut s = ready_session();
    assert_eq!(
        s.on_message(Server, &generate(1, 4)),
        Err(ErrorCode::UnexpectedMessage)
    );
    s.on_message(Device, &generate(1, 4)).unwrap();
    assert_eq!(
        s.on_message(Device, &tokens(1, 1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        s.on_message(Server, &cancel(1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        s.on_message(Device, &finished(1, FinishReason::Eos, 10)),
        Err(ErrorCode::UnexpectedMessage)
    );
    // Before Started there is no session to generate on.
    let mut s = SessionStream::new();
    s.on_message(Device, &start_tokens(3)).unwrap();
    assert_eq!(
        s.on_message(Device, &generate(1, 4)),
        Err(ErrorCode::UnexpectedMessage)
    );
}

#[test]
fn generate_limits_are_checked_with_typed_errors() {
    let g = Generate {
        seq: 9,
        max_tokens: 100,
    };
    g.check(10, 4096, 100).unwrap();
    // Partly possible: allowed, the generation ends with ContextFull.
    g.check(4095, 4096, 100).unwrap();
    let e = g.check(4096, 4096, 100).unwrap_err();
    assert_eq!((e.code, e.seq), (ErrorCode::ContextTooLong, Some(9)));
    let e = g.check(10, 4096, 99).unwrap_err();
    assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, Some(9)));
    let e = Generate {
        seq: 1,
        max_tokens: 0,
    }
    .check(10, 4096, 100)
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
}

/// A draft of `token` whose encoded distribution gives it all the mass (vocabulary 100).
fn sure_draft(token: u32) -> Draft {
    let mut p = vec![0.0; 100];
    p[token as usize] = 1.0;
    let enc = uhlm_core::codec::encode(&uhlm_core::codec::Codec::DenseF32, &p).unwrap();
    Draft {
        token,
        q: enc.bytes,
    }
}

/// `Verify` at `position` after `skipped` local tokens, with a chain of links each after
/// `gaps[i]` more local tokens.
fn chain_verify(seq: u32, position: u32, skipped: usize, gaps: &[usize]) -> Verify {
    Verify {
        seq,
        position,
        skipped: vec![1; skipped],
        draft: Some(sure_draft(2)),
        uncertainty: 0.5,
        chain: gaps
            .iter()
            .map(|&g| Link {
                skipped: vec![4; g],
                draft: sure_draft(3),
                uncertainty: 0.5,
            })
            .collect(),
    }
}

fn chain_verdict(seq: u32, link: usize, accepted: bool) -> Message {
    Verdict {
        seq,
        token: 3,
        accepted,
        beta: 0.0,
        tv_distance: 0.0,
        accepted_links: vec![
            Acceptance {
                beta: 0.0,
                tv_distance: 0.0
            };
            link
        ],
        window: None,
    }
    .into()
}

#[test]
fn a_chain_verdict_sets_the_context_after_the_link_it_decides() {
    // Positions 12, then 12 + 1 + 0 = 13, then 13 + 1 + 3 = 17.
    let v = chain_verify(1, 12, 2, &[0, 3]);
    assert_eq!(v.positions().unwrap(), [12, 13, 17]);
    assert_eq!(v.inputs(), [1, 1, 2, 3, 4, 4, 4]);
    for (link, accepted, context) in [(0, false, 13), (1, false, 14), (2, true, 18)] {
        let mut s = ready_session();
        s.on_message(Device, &v.clone().into()).unwrap();
        s.on_message(Server, &chain_verdict(1, link, accepted))
            .unwrap();
        assert_eq!(s.context_len(), Some(context), "link {link}");
        assert_eq!(s.phase(), SessionPhase::Ready);
    }
}

#[test]
fn chain_verdicts_that_do_not_fit_the_request_are_refused() {
    let v = chain_verify(1, 12, 2, &[0, 3]);
    let mut s = ready_session();
    s.on_message(Device, &v.into()).unwrap();
    // No link 3; an accepted link 1 must go on to link 2.
    for bad in [chain_verdict(1, 3, false), chain_verdict(1, 1, true)] {
        assert_eq!(s.on_message(Server, &bad), Err(ErrorCode::InvalidRequest));
        assert!(matches!(s.phase(), SessionPhase::Verifying { seq: 1 }));
    }
    // Without a draft there is nothing to chain after.
    let mut s = ready_session();
    let mut v = chain_verify(1, 10, 0, &[0]);
    v.draft = None;
    assert_eq!(
        s.on_message(Device, &v.into()),
        Err(ErrorCode::InvalidRequest)
    );
}

#[test]
fn chain_requests_are_checked_before_any_model_work() {
    let v = chain_verify(5, 12, 2, &[0, 3]);
    let q = v.check(10, 100, 4096, 2).unwrap();
    assert_eq!(q.len(), 3, "one decoded distribution per position");
    assert!(
        q.iter()
            .all(|q| q.as_ref().is_some_and(|q| q[2] + q[3] == 1.0))
    );
    let code = |r: Result<Vec<Option<Vec<f32>>>, ErrorMessage>| r.unwrap_err().code;
    // Too many links for the server.
    assert_eq!(code(v.check(10, 100, 4096, 1)), ErrorCode::InvalidRequest);
    // The last link reaches the context limit (position 17).
    assert_eq!(code(v.check(10, 100, 17, 2)), ErrorCode::ContextTooLong);
    v.check(10, 100, 18, 2).unwrap();
    // A chained token outside the vocabulary.
    let mut bad = v.clone();
    bad.chain[1].skipped[0] = 100;
    assert_eq!(code(bad.check(10, 100, 4096, 2)), ErrorCode::InvalidRequest);
    // A chained draft its distribution cannot have produced.
    let mut bad = v.clone();
    bad.chain[0].draft.token = 5;
    assert_eq!(code(bad.check(10, 100, 4096, 2)), ErrorCode::InvalidRequest);
    // Positions that overflow.
    let mut far = chain_verify(5, u32::MAX - 1, 0, &[1]);
    assert_eq!(far.positions(), None);
    far.chain.clear();
    assert_eq!(far.positions().unwrap(), [u32::MAX - 1]);
}

fn extend(n: usize) -> Message {
    Extend { tokens: vec![1; n] }.into()
}

#[test]
fn extend_grows_the_context_between_requests_and_has_no_answer() {
    let mut s = ready_session();
    let len = s.context_len().unwrap();
    s.on_message(Device, &extend(3)).unwrap();
    assert_eq!(s.phase(), SessionPhase::Ready, "no answer awaited");
    assert_eq!(s.context_len(), Some(len + 3));
    // The next Verify's position counts the extended tokens.
    assert_eq!(
        s.on_message(Device, &verify(1, len + 1, 1)),
        Err(ErrorCode::PositionMismatch)
    );
    s.on_message(Device, &verify(1, len + 4, 1)).unwrap();
    // Only between requests, never empty, never from the server.
    assert_eq!(
        s.on_message(Device, &extend(1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    s.on_message(Server, &verdict(1)).unwrap();
    assert_eq!(
        s.on_message(Device, &extend(0)),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        s.refusal(ErrorCode::InvalidRequest, &extend(0)),
        "an Extend must carry tokens"
    );
    assert_eq!(
        s.on_message(Server, &extend(1)),
        Err(ErrorCode::UnexpectedMessage)
    );
    // A refused Extend fails the next request; an Error without a seq then ends the session
    // even while that request waits.
    s.on_message(Device, &extend(2)).unwrap();
    let len = s.context_len().unwrap();
    s.on_message(Device, &verify(2, len, 0)).unwrap();
    s.on_message(Server, &error(ErrorCode::InvalidRequest, None))
        .unwrap();
    assert_eq!(s.phase(), SessionPhase::Closed);
}
