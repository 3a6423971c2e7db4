//! Every message survives framing, however the stream splits the bytes.

use crate::protocol_support;

use proptest::prelude::*;
use protocol_support::{message, payload, samples};
use rand::{Rng, SeedableRng};
use uhlm_core::protocol::*;

const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

/// Feeds `bytes` in the given chunk sizes and collects every message, checking the end is clean.
fn decode_chunked(bytes: &[u8], chunks: impl IntoIterator<Item = usize>) -> Vec<Message> {
    let mut dec = FrameDecoder::new(MAX);
    let mut out = Vec::new();
    let mut rest = bytes;
    for n in chunks {
        let (now, later) = rest.split_at(n.min(rest.len()));
        rest = later;
        dec.push(now);
        while let Some(m) = dec.next_frame().expect("valid frames decode") {
            out.push(m);
        }
    }
    assert!(rest.is_empty(), "chunks must cover the input");
    assert!(dec.is_empty());
    dec.finish().expect("stream ends on a frame boundary");
    out
}

fn assert_same(got: &[Message], want: &[Message]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(payload(g), payload(w), "{} changed in transit", w.kind());
    }
}

#[test]
fn every_variant_round_trips_split_at_every_byte() {
    for msg in samples() {
        let frame = encode_frame(&msg, MAX).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - FRAME_HEADER_BYTES);
        for cut in 0..=frame.len() {
            let got = decode_chunked(&frame, [cut, frame.len() - cut]);
            assert_same(&got, std::slice::from_ref(&msg));
        }
        let got = decode_chunked(&frame, std::iter::repeat_n(1, frame.len()));
        assert_same(&got, std::slice::from_ref(&msg));
    }
}

#[test]
fn a_stream_of_all_variants_round_trips_in_random_chunks() {
    let msgs = samples();
    let mut stream = Vec::new();
    for m in &msgs {
        let n = encode_frame_into(m, MAX, &mut stream).unwrap();
        assert!(n > FRAME_HEADER_BYTES);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..200 {
        let mut chunks = Vec::new();
        let mut left = stream.len();
        while left > 0 {
            let n = rng.random_range(0..=left.min(64));
            chunks.push(n);
            left -= n;
        }
        assert_same(&decode_chunked(&stream, chunks), &msgs);
    }
}

#[test]
fn messages_without_nan_compare_equal_after_decoding() {
    for msg in samples() {
        let mut decoded = FrameDecoder::new(MAX);
        decoded.push(&encode_frame(&msg, MAX).unwrap());
        let got = decoded.next_frame().unwrap().unwrap();
        if let Message::Verify(Verify { uncertainty, .. }) = &msg
            && uncertainty.is_nan()
        {
            continue;
        }
        assert_eq!(got, msg);
    }
}

#[test]
fn encoding_a_too_large_message_leaves_the_buffer_untouched() {
    let msg = Message::from(Resync {
        context: vec![u32::MAX; 1000],
    });
    let mut out = vec![1, 2, 3];
    let err = encode_frame_into(&msg, 100, &mut out).unwrap_err();
    // 1 variant byte + 2 length bytes + 1000 five-byte varints.
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: 5003,
            max: 100
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(out, [1, 2, 3]);
    // Exactly at the limit is allowed.
    assert_eq!(encode_frame(&msg, 5003).unwrap().len(), 5007);
}

#[test]
fn dense_f32_draft_for_the_largest_vocabulary_needs_the_large_limit() {
    // Codec tag 0, varint 262144, then 4 bytes per token.
    let mut q = vec![0u8, 0x80, 0x80, 0x10];
    q.resize(4 + 262_144 * 4, 0);
    let msg = Message::from(Verify {
        seq: u32::MAX,
        position: u32::MAX - 1,
        skipped: vec![u32::MAX; 64],
        draft: Some(Draft { token: 262_143, q }),
        uncertainty: 1.0,
        chain: vec![],
    });
    assert!(matches!(
        encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES),
        Err(FrameError::TooLarge { .. })
    ));
    let frame = encode_frame(&msg, LARGE_VOCAB_MAX_FRAME_BYTES).unwrap();
    let mut dec = FrameDecoder::new(LARGE_VOCAB_MAX_FRAME_BYTES);
    dec.push(&frame);
    assert_same(&[dec.next_frame().unwrap().unwrap()], &[msg]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_messages_round_trip(
        msgs in proptest::collection::vec(message(), 1..6),
        chunk in 1usize..40,
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame_into(m, MAX, &mut stream).unwrap();
        }
        let chunks = std::iter::repeat_n(chunk, stream.len().div_ceil(chunk));
        let got = decode_chunked(&stream, chunks);
        prop_assert_eq!(got.len(), msgs.len());
        for (g, w) in got.iter().zip(&msgs) {
            prop_assert_eq!(payload(g), payload(w));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        max in 0u32..256,
    ) {
        let mut dec = FrameDecoder::new(max);
        for c in &chunks {
            dec.push(c);
            loop {
                match dec.next_frame() {
                    Ok(Some(m)) => {
                        // Whatever decodes must be a message we can send again.
                        let again = encode_frame(&m, u32::MAX).unwrap();
                        prop_assert!(again.len() <= max as usize + FRAME_HEADER_BYTES);
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max: m }) => {
                        prop_assert!(len > m as usize);
                        break;
                    }
                    Err(FrameError::Malformed(_)) => {}
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
        let _ = dec.finish();
    }

    #[test]
    fn random_payloads_in_valid_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..128)) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let mut dec = FrameDecoder::new(MAX);
        dec.push(&frame);
        match dec.next_frame() {
            Ok(Some(m)) => prop_assert_eq!(payload(&m).len() <= body.len(), true),
            Ok(None) => prop_assert!(false, "a complete frame must yield a result"),
            Err(e) => prop_assert!(matches!(e, FrameError::Malformed(_)), "{e}"),
        }
        prop_assert!(dec.is_empty());
        prop_assert_eq!(dec.finish(), Ok(()));
    }
}
