//! Arbitrary bytes through `FrameDecoder` and the stream state machines: nothing may panic, and
//! every message that decodes must re-encode to a frame that decodes to the same message.

use uhlm_core::protocol::frame::decode_payload;
use uhlm_core::protocol::{
    ControlStream, FRAME_HEADER_BYTES, FrameDecoder, FrameError, Message, SessionStream, Side,
    encode_frame,
};

/// Small enough that the fuzzer reaches the limit, large enough for real messages.
const MAX_FRAME_BYTES: u32 = 64 * 1024;

/// Feeds one byte stream through the decoder (panics on a violated property).
pub fn check(data: &[u8]) {
    // The first byte picks the chunk size, so split points are explored too.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut control = ControlStream::new();
    let mut session = SessionStream::new();
    for piece in stream.chunks(usize::from(chunk).max(1)) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(msg)) => check_message(&msg, &mut control, &mut session),
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max as usize);
                    assert!(decoder.next_frame().is_err() && decoder.finish().is_err());
                    return;
                }
                Err(FrameError::Malformed(_)) => {}
                Err(e) => panic!("next_frame cannot fail with {e}"),
            }
        }
    }
    match decoder.finish() {
        Ok(()) => assert!(decoder.is_empty()),
        Err(FrameError::Truncated { have, need }) => assert!(have < need),
        Err(e) => panic!("finish cannot fail with {e}"),
    }
}

fn check_message(msg: &Message, control: &mut ControlStream, session: &mut SessionStream) {
    let frame = encode_frame(msg, u32::MAX).expect("a decoded message encodes");
    assert!(frame.len() <= FRAME_HEADER_BYTES + MAX_FRAME_BYTES as usize);
    let again = decode_payload(&frame[FRAME_HEADER_BYTES..]).expect("a re-encoded message decodes");
    assert_eq!(
        encode_frame(&again, u32::MAX).expect("encodes"),
        frame,
        "decoding lost information"
    );
    let side = match msg {
        Message::Hello(_)
        | Message::Start(_)
        | Message::Verify(_)
        | Message::Resync(_)
        | Message::Generate(_)
        | Message::Cancel(_)
        | Message::Extend(_) => Side::Device,
        Message::Welcome(_)
        | Message::Started(_)
        | Message::Verdict(_)
        | Message::Tokens(_)
        | Message::Finished(_) => Side::Server,
        Message::Error(e) => {
            if e.message.len() % 2 == 0 {
                Side::Server
            } else {
                Side::Device
            }
        }
        Message::Close(_) => Side::Server,
    };
    let _ = control.on_message(side, msg);
    let _ = session.on_message(side, msg);
}
