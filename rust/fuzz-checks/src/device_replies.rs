//! A device's session stream fed by an untrusted server: the device's own requests as the SDK
//! sends them, answered by arbitrary server frames. Nothing may panic, and every answer the
//! machine accepts keeps the device consistent: committed token ids are inside its vocabulary
//! and the server's context grows exactly as the protocol says.

use uhlm_core::protocol::{
    Draft, FrameDecoder, Generate, Link, Message, Prompt, Resync, SessionPhase, SessionStream,
    Side, Start, Verify,
};
use uhlm_core::sampling::SamplingOptions;

const VOCAB: usize = 64;

#[derive(Debug, arbitrary::Arbitrary)]
pub enum Step {
    /// The device asks for a verdict after this many local tokens, with a chain of drafts
    /// after that many more local tokens each.
    Verify { skipped: u8, chain: Vec<u8> },
    /// The device asks the server to generate.
    Generate { max_tokens: u8 },
    /// The device replaces the server's context.
    Resync { len: u8 },
    /// The server's bytes, split where they fall.
    Server(Vec<u8>),
}

/// The prompt's length, then the device's steps.
pub type Input = (u8, Vec<Step>);

/// Drives one session (panics on a violated property).
pub fn check(input: Input) {
    let (prompt_len, steps) = input;
    let mut state = SessionStream::new().with_vocab(VOCAB);
    let start = Message::Start(Start {
        session_id: 1,
        prompt: Prompt::Tokens(vec![1; usize::from(prompt_len)]),
        sampling: SamplingOptions::greedy(16),
    });
    if state.on_message(Side::Device, &start).is_err() {
        return;
    }
    let mut decoder = FrameDecoder::new(64 * 1024);
    let mut seq = 0u32;
    for step in steps {
        let request = match step {
            Step::Verify { skipped, chain } => {
                state.next_position(usize::from(skipped)).map(|position| {
                    let draft = |token| Draft { token, q: vec![] };
                    Message::Verify(Verify {
                        seq,
                        position,
                        skipped: vec![2; usize::from(skipped)],
                        draft: (!chain.is_empty()).then(|| draft(4)),
                        uncertainty: 1.0,
                        chain: chain
                            .iter()
                            .map(|&n| Link {
                                skipped: vec![5; usize::from(n)],
                                draft: draft(6),
                                uncertainty: 1.0,
                            })
                            .collect(),
                    })
                })
            }
            Step::Generate { max_tokens } => Some(Message::Generate(Generate {
                seq,
                max_tokens: u32::from(max_tokens),
            })),
            Step::Resync { len } => Some(Message::Resync(Resync {
                context: vec![3; usize::from(len)],
            })),
            Step::Server(bytes) => {
                decoder.push(&bytes);
                while let Ok(Some(reply)) = decoder.next_frame() {
                    answer(&mut state, &reply);
                }
                None
            }
        };
        if let Some(request) = request {
            // The SDK only sends what its machine allows; so does this driver.
            if state.on_message(Side::Device, &request).is_ok() {
                seq = seq.wrapping_add(1);
            }
        }
    }
}

/// Feeds one server message and checks what an accepted one did to the device's view.
fn answer(state: &mut SessionStream, reply: &Message) {
    let (before, phase) = (state.context_len(), state.phase());
    if state.on_message(Side::Server, reply).is_err() {
        assert_eq!(state.phase(), phase, "a refused message changes nothing");
        assert_eq!(state.context_len(), before);
        return;
    }
    match reply {
        Message::Verdict(v) => {
            assert!((v.token as usize) < VOCAB);
            let grown = state
                .context_len()
                .expect("a verdict leaves a known context");
            // At least the first position was decided.
            assert!(before.is_none_or(|b| grown > b));
        }
        Message::Tokens(t) => {
            assert!(t.tokens.iter().all(|&x| (x as usize) < VOCAB));
            assert_eq!(
                state.context_len(),
                before.map(|b| b + t.tokens.len() as u32)
            );
        }
        Message::Started(s) => assert_eq!(state.context_len(), Some(s.context_len)),
        _ => {}
    }
    assert!(state.phase() != SessionPhase::AwaitStart || state.context_len().is_none());
}
