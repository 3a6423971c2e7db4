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
