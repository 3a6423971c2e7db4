//! Hostile and broken byte streams: truncation, oversized prefixes, garbage.

use crate::protocol_support;

use protocol_support::{payload, samples};
use uhlm_core::protocol::*;

fn close_frame() -> Vec<u8> {
    encode_frame(
        &Close {
            reason: "bye".into(),
        }
        .into(),
        1024,
    )
    .unwrap()
}

#[test]
fn oversized_prefix_is_rejected_before_the_body_arrives() {
    let mut dec = FrameDecoder::new(1000);
    dec.push(&[0, 0, 0x03]);
    assert_eq!(dec.next_frame(), Ok(None));
    dec.push(&[0xe9]); // 1001
    let err = dec.next_frame().unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: 1001,
            max: 1000
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    // Framing is lost for good: later bytes are dropped, not buffered, and the error sticks.
    dec.push(&vec![0; 4096]);
    assert_eq!(dec.buffered(), 0);
    assert_eq!(dec.next_frame(), Err(err.clone()));
    assert_eq!(dec.finish(), Err(err));
}

#[test]
fn largest_prefix_is_rejected_without_allocating_for_it() {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    dec.push(&[0xff; 4]);
    assert!(matches!(
        dec.next_frame(),
        Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize
    ));
}

#[test]
fn frame_exactly_at_the_limit_is_accepted() {
    let frame = close_frame();
    let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
    let mut dec = FrameDecoder::new(len);
    dec.push(&frame);
    assert!(matches!(dec.next_frame(), Ok(Some(Message::Close(_)))));
    let mut dec = FrameDecoder::new(len - 1);
    dec.push(&frame);
    assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
}

#[test]
fn truncated_frames_are_reported_at_end_of_stream() {
    for msg in samples() {
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
        for cut in 1..frame.len() {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
            dec.push(&frame[..cut]);
            assert_eq!(dec.next_frame(), Ok(None), "{} cut at {cut}", msg.kind());
            assert!(!dec.is_empty());
            let need = if cut < 4 { 4 } else { frame.len() };
            assert_eq!(dec.finish(), Err(FrameError::Truncated { have: cut, need }));
            assert_eq!(dec.finish().unwrap_err().code(), ErrorCode::MalformedFrame);
        }
    }
    let dec = FrameDecoder::new(16);
    assert!(dec.is_empty());
    assert_eq!(dec.finish(), Ok(()));
}

#[test]
fn trailing_garbage_inside_the_declared_length_is_malformed() {
    let frame = close_frame();
    let mut padded = frame.clone();
    padded.push(0);
    let len = (padded.len() - FRAME_HEADER_BYTES) as u32;
    padded[..4].copy_from_slice(&len.to_be_bytes());
    let mut dec = FrameDecoder::new(1024);
    dec.push(&padded);
    let err = dec.next_frame().unwrap_err();
    assert!(
        matches!(&err, FrameError::Malformed(m) if m.contains("1 trailing byte")),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::MalformedFrame);
    // The bad frame is consumed and the stream stays framed.
    dec.push(&frame);
    assert!(matches!(dec.next_frame(), Ok(Some(Message::Close(_)))));
    assert_eq!(dec.finish(), Ok(()));
}

#[test]
fn short_payloads_and_bad_values_are_malformed() {
    let cases: &[(&str, &[u8])] = &[
        ("empty payload", &[]),
        ("unknown variant", &[13]),
        ("Generate cut short", &[9, 1]),
        ("unknown finish reason", &[11, 0, 4, 0]),
        ("huge variant", &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ("varint too long", &[0, 0xff, 0xff, 0xff]),
        ("fingerprint cut short", &[0, 1, 7, 7]),
        ("bad option tag", &[8, 0, 2]),
        ("Close with invalid utf-8", &[8, 2, 0xc3, 0x28]),
        ("bad bool", &[6, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]),
        (
            "Resync claiming 2^32 tokens",
            &[7, 0x80, 0x80, 0x80, 0x80, 0x10],
        ),
        ("string longer than the frame", &[8, 0xff, 0xff, 0x03, b'a']),
    ];
    for (what, body) in cases {
        let mut dec = FrameDecoder::new(64);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        dec.push(&frame);
        assert!(
            matches!(dec.next_frame(), Err(FrameError::Malformed(_))),
            "{what}"
        );
        assert!(dec.is_empty(), "{what}");
    }
}

#[test]
fn overlong_varints_decode_but_reencode_canonically() {
    // Close { reason: "" } with its length written as a two-byte varint.
    let frame = [0, 0, 0, 3, 8, 0x80, 0x00];
    let mut dec = FrameDecoder::new(16);
    dec.push(&frame);
    let msg = dec.next_frame().unwrap().unwrap();
    assert_eq!(
        msg,
        Message::from(Close {
            reason: String::new()
        })
    );
    assert_eq!(payload(&msg), [8, 0]);
}

#[test]
fn decoder_reuses_its_buffer_between_frames() {
    let frame = close_frame();
    let mut dec = FrameDecoder::new(1024);
    for _ in 0..1000 {
        dec.push(&frame);
        dec.push(&frame[..3]);
        assert!(dec.next_frame().unwrap().is_some());
        assert_eq!(dec.next_frame(), Ok(None));
        dec.push(&frame[3..]);
        assert!(dec.next_frame().unwrap().is_some());
        assert!(dec.is_empty());
    }
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn limit_can_change_between_frames() {
    let frame = close_frame();
    let mut dec = FrameDecoder::new(1);
    dec.set_max_frame_bytes(1024);
    assert_eq!(dec.max_frame_bytes(), 1024);
    dec.push(&frame);
    assert!(dec.next_frame().unwrap().is_some());
}

#[test]
fn hello_version_check() {
    let Message::Hello(mut hello) = samples().remove(0) else {
        panic!("first sample is a Hello");
    };
    assert_eq!(hello.check_version(), Ok(()));
    hello.protocol_version = PROTOCOL_VERSION + 1;
    let reply = hello.check_version().unwrap_err();
    assert_eq!(reply.code, ErrorCode::UnsupportedVersion);
    assert_eq!(reply.code.recovery(), Recovery::Fatal);
    let speaks = format!("speaks protocol version {PROTOCOL_VERSION}");
    assert!(reply.message.contains(&speaks), "{reply}");
}

#[test]
fn frame_errors_map_to_codes() {
    assert_eq!(
        FrameError::Malformed("x".into()).code(),
        ErrorCode::MalformedFrame
    );
    assert_eq!(FrameError::Encode("x".into()).code(), ErrorCode::Internal);
    assert_eq!(
        decode_payload_err(&[8, 1]).code(),
        ErrorCode::MalformedFrame
    );
}

fn decode_payload_err(body: &[u8]) -> FrameError {
    uhlm_core::protocol::frame::decode_payload(body).unwrap_err()
}
