//! Decoding allocates in proportion to the bytes received, never to lengths a peer claims.
//!
//! A counting global allocator records the peak of live heap bytes while each hostile frame is
//! decoded. One test function only, so no other test thread allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use uhlm_core::protocol::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds
// `GlobalAlloc`'s contract; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), SeqCst) + layout.size();
        PEAK.fetch_max(now, SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), SeqCst);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak extra heap bytes while decoding the frame around `payload`, and the decode result.
fn peak_while_decoding(payload: &[u8]) -> (usize, Result<Option<Message>, FrameError>) {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    dec.push(&(payload.len() as u32).to_be_bytes());
    dec.push(payload);
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let result = dec.next_frame();
    (PEAK.load(SeqCst) - base, result)
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[test]
fn hostile_lengths_do_not_drive_allocation() {
    let huge = [u64::from(u32::MAX), 1 << 40, usize::MAX as u64];
    for claimed in huge {
        // Resync { context } claiming `claimed` tokens, followed by 16 real ones.
        let mut resync = vec![7];
        varint(claimed, &mut resync);
        resync.extend([1; 16]);
        // Start { prompt: Chat(..) } claiming `claimed` messages.
        let mut chat = vec![3, 1, 1];
        varint(claimed, &mut chat);
        chat.extend([0; 16]);
        // Verify with a draft whose `q` claims `claimed` bytes.
        let mut draft = vec![5, 0, 0, 0, 1, 0];
        varint(claimed, &mut draft);
        draft.extend([0; 16]);
        // Close whose reason claims `claimed` bytes.
        let mut close = vec![8];
        varint(claimed, &mut close);
        close.extend([b'a'; 16]);
        for payload in [resync, chat, draft, close] {
            let (peak, result) = peak_while_decoding(&payload);
            assert!(
                matches!(result, Err(FrameError::Malformed(_))),
                "{result:?}"
            );
            assert!(peak < 4096, "claimed {claimed}: {peak} bytes allocated");
        }
    }

    // Legitimate worst cases: allocation stays a small multiple of the frame.
    let n = 100_000;
    let mut tokens = vec![7];
    varint(n, &mut tokens);
    tokens.extend(std::iter::repeat_n(1, n as usize));
    let (peak, result) = peak_while_decoding(&tokens);
    assert!(matches!(result, Ok(Some(_))), "{result:?}");
    // 4 bytes per 1-byte varint, times 3 while the Vec doubles (old and new buffer).
    assert!(
        peak <= 12 * tokens.len(),
        "{peak} bytes for {} bytes",
        tokens.len()
    );

    // Empty chat turns are 2 bytes on the wire and 48 in memory: their count is capped.
    for (turns, ok) in [
        (MAX_CHAT_MESSAGES, true),
        (MAX_CHAT_MESSAGES + 1, false),
        (n as usize, false),
    ] {
        let mut chat = vec![3, 1, 1];
        varint(turns as u64, &mut chat);
        chat.extend(std::iter::repeat_n(0, 2 * turns));
        // SamplingOptions: temperature 0.0 (4 bytes), then top_k, top_p, max_tokens, seed, stop.
        chat.extend([0; 9]);
        let (peak, result) = peak_while_decoding(&chat);
        if ok {
            assert!(matches!(result, Ok(Some(_))), "{result:?}");
        } else {
            assert!(
                matches!(result, Err(FrameError::Malformed(_))),
                "{result:?}"
            );
        }
        assert!(
            peak <= 3 * 48 * MAX_CHAT_MESSAGES,
            "{turns} turns: {peak} bytes"
        );
    }
}
