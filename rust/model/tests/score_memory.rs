//! What a forward pass allocates, measured with a counting allocator, so what is asserted is
//! bytes, never time:
//! - a prefill that only needs the next token's logits allocates no `positions x vocabulary`
//!   buffer: `score_last` over 1,000 tokens of SmolLM2 (vocabulary 49,152) must peak, KV cache
//!   and attention included, under the 196 MB that all rows' logits alone would take (the
//!   server's Verify used to materialise every row: 1.13 GiB for one 2,000-token prompt);
//! - a batched pass stays within the bound the model states ([`Model::pass_cost`]), which the
//!   server counts against its memory budget, and the bound is not loose.

#[path = "runtime_support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::{GEMMA3, SMOLLM2, cached_model};
use uhlm_model::{BatchItem, LoadOptions, Model, Outputs, Session};

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

/// The counters are process-wide: one test runs at a time (another's frees would hide this
/// one's allocations).
static MEASURING: Mutex<()> = Mutex::new(());

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
    let _measuring = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
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

/// Batched passes of several shapes (one long prefill; sessions deciding every row of a
/// chain; many one-token steps) peak within `pass_cost` for their rows, and above a third of
/// it. The caches are grown beforehand, so the pass allocates activations and logits only.
#[test]
fn a_batched_pass_allocates_within_the_cost_its_model_states() {
    let _measuring = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    for name in [SMOLLM2, GEMMA3] {
        let Some(path) = cached_model(name) else {
            continue;
        };
        let options = LoadOptions {
            threads: Some(1),
            ..LoadOptions::default()
        };
        let model = Model::load(&path, &options).unwrap();
        let cost = model.pass_cost();
        let sentence = model
            .tokenizer()
            .encode("The keeper climbed the stairs and lit the lamp. ", false)
            .unwrap();
        let text: Vec<u32> = sentence.iter().copied().cycle().take(400).collect();
        // (sessions, tokens cached before the pass, new tokens each, logits for every row)
        for (sessions, cached, new, every_row) in
            [(1, 0, 256, false), (3, 64, 48, true), (8, 32, 1, false)]
        {
            let mut batch: Vec<Session> = (0..sessions)
                .map(|_| {
                    let mut s = model.session();
                    s.score_last(&text[..cached + new]).unwrap();
                    s.truncate(cached);
                    s
                })
                .collect();
            let kv_before: usize = batch.iter().map(Session::kv_cache_bytes).sum();
            let rows: Vec<usize> = (0..new).collect();
            let (outputs, per_session) = if every_row {
                (Outputs::Rows(&rows), new)
            } else {
                (Outputs::Last, 1)
            };
            let tokens = &text[cached..cached + new];
            let mut items: Vec<BatchItem<'_>> = batch
                .iter_mut()
                .map(|session| BatchItem {
                    session,
                    tokens,
                    outputs,
                })
                .collect();
            let peak = peak_of(|| Session::score_batch(&mut items).unwrap()).1 as u64;
            drop(items);
            let kv_after: usize = batch.iter().map(Session::kv_cache_bytes).sum();
            assert_eq!(kv_after, kv_before, "{name}: the pass grew a cache");
            let bound = cost.bytes(sessions * new, sessions * per_session);
            let shape = format!("{name}: {sessions} x ({cached} cached + {new} new)");
            assert!(
                peak <= bound,
                "{shape}: peaked at {peak} bytes over its bound {bound}"
            );
            assert!(
                bound <= 3 * peak,
                "{shape}: the bound {bound} is loose (peak {peak})"
            );
        }
    }
}
