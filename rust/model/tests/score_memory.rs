//! A prefill that only needs the next token's logits allocates no `positions x vocabulary`
//! buffer: `score_last` over 1,000 tokens of SmolLM2 (vocabulary 49,152) must peak, KV cache
//! and attention included, under the 196 MB that all rows' logits alone would take. Measured with a counting allocator, so what is
//! asserted is bytes, never time. (The server's Verify used to materialise every row: 1.13 GiB
//! for one 2,000-token prompt.)

#[path = "runtime_support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::{SMOLLM2, cached_model};
use uhlm_model::{LoadOptions, Model};

/// The system allocator, keeping the bytes in use and their peak since the last reset.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds
// `GlobalAlloc`'s contract; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's `layout` obligations (non-zero size) are passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, that is from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was in use before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

#[test]
fn a_long_prefill_for_the_next_token_allocates_no_logits_for_every_position() {
    let Some(path) = cached_model(SMOLLM2) else {
        return;
    };
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    let model = Model::load(&path, &options).unwrap();
    let vocab = model.info().vocab_size;
    let sentence = model
        .tokenizer()
        .encode("The keeper climbed the stairs and lit the lamp. ", false)
        .unwrap();
    let tokens: Vec<u32> = sentence.iter().copied().cycle().take(1000).collect();
    let all_rows = tokens.len() * vocab * 4;
    let mut session = model.session();
    let (logits, peak) = peak_of(|| session.score_last(&tokens).unwrap());
    assert_eq!(logits.len(), vocab);
    assert!(
        peak < all_rows,
        "score_last peaked at {peak} bytes; every position's logits alone are {all_rows}"
    );
}
