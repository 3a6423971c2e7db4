//! The server side of one session stream: frames in, one request at a time to the worker,
//! frames out. Everything derived from client bytes is checked; a bad frame or a request the
//! protocol forbids gets an `Error` frame, and ends at most this stream.
//!
//! A `Generate` is the one request with many answers: while its tokens stream out, the task
//! keeps reading the stream, so a `Cancel` stops the worker and a `Close` or a reset ends it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use quinn::{RecvStream, SendStream};
use tokio::sync::OwnedSemaphorePermit;
use uhlm_core::protocol::{
    Close, ErrorCode, ErrorMessage, Finished, Generate, Message, Prompt, SessionPhase,
    SessionStream, Side, Start, Started, Tokens, Verify,
};

use crate::auth::KeyId;
use crate::framed::{Framed, Next};
use crate::key_quota::Held;
use crate::shared::Shared;
use crate::worker::{Failure, GenEvent, Job, SessionKey, VerdictReply};

/// Frees the worker's session when the stream task ends, however it ends.
struct Opened {
    key: SessionKey,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
    _key_slot: Held,
}

impl Drop for Opened {
    fn drop(&mut self) {
        let _ = self.shared.workers.submit(Job::Close { key: self.key });
    }
}

/// Serves one session stream until it closes.
pub(crate) async fn serve(shared: Arc<Shared>, key_id: KeyId, send: SendStream, recv: RecvStream) {
    let mut io = Framed::new(send, recv, shared.clone());
    let mut state = SessionStream::new();
    let key = shared.next_session_key();
    let mut opened: Option<Opened> = None;
    loop {
        let msg = match io.next(true).await {
            Next::Message(m) => m,
            Next::End | Next::Lost => break,
            Next::Bad(e) => {
                tracing::debug!(session = key, error = %e, "bad frame on a session stream");
                io.send(&ErrorMessage::new(e.code(), e.to_string()).into())
                    .await;
                break;
            }
            Next::Idle => {
                io.send(
                    &Close {
                        reason: "idle timeout".into(),
                    }
                    .into(),
                )
                .await;
                break;
            }
            Next::Shutdown => {
                let msg = ErrorMessage::new(ErrorCode::ShuttingDown, "the server is shutting down");
                io.send(&msg.into()).await;
                break;
            }
        };
        let seq = match &msg {
            Message::Verify(v) => Some(v.seq),
            Message::Generate(g) => Some(g.seq),
            _ => None,
        };
        if let Err(code) = state.on_message(Side::Device, &msg) {
            let text = state.refusal(code, &msg);
            let err = ErrorMessage {
                code,
                message: text,
                seq,
            };
            if !reply(&mut io, &mut state, err.into()).await {
                break;
            }
            continue;
        }
        let answer: Message = match msg {
            Message::Start(start) => {
                match handle_start(&shared, key, key_id, start, &mut opened).await {
                    Ok(started) => started.into(),
                    Err(e) => e.into(),
                }
            }
            // A device that goes away while its Verify waits (a long catch-up) lets the worker
            // drop the work: the reply channel closes with this future.
            Message::Verify(v) => tokio::select! {
                m = handle_verify(&shared, key, key_id, v) => m,
                _ = io.peer_stopped() => break,
            },
            Message::Resync(r) => {
                let session_id = state.session_id().unwrap_or_default();
                let context_len = u32::try_from(r.context.len()).unwrap_or(u32::MAX);
                let result = if !shared.limiter.allow(key_id, Instant::now()) {
                    Err(rate_limited())
                } else {
                    shared
                        .workers
                        .call(|reply| Job::Resync {
                            key,
                            context: r.context,
                            reply,
                        })
                        .await
                };
                match result {
                    Ok(()) => Started {
                        session_id,
                        context_len,
                        rendered: None,
                    }
                    .into(),
                    Err(e) => e.into(),
                }
            }
            Message::Generate(g) => {
                if generate(&shared, &mut io, &mut state, key, key_id, g).await {
                    continue;
                }
                break;
            }
            // No answer: the worker queues the tokens for scoring, and a refusal answers the
            // session's next request. Not rate-limited: each token is scored once whatever
            // the message count, and the context limit bounds them.
            Message::Extend(e) => match shared.workers.submit(Job::Extend {
                key,
                tokens: e.tokens,
            }) {
                Ok(()) => continue,
                Err(e) => e.into(),
            },
            // A `Cancel` that crossed its generation's `Finished`: nothing left to stop.
            Message::Cancel(_) => continue,
            // Close or Error from the device: the stream is over.
            _ => break,
        };
        if !reply(&mut io, &mut state, answer).await {
            break;
        }
    }
    drop(opened);
    io.finish().await;
}

/// Sends `msg` and records it in the state machine; `false` when the stream is over.
async fn reply(io: &mut Framed, state: &mut SessionStream, msg: Message) -> bool {
    if let Err(code) = state.on_message(Side::Server, &msg) {
        // Our own reply is inconsistent with the stream: a server bug, never the client's.
        tracing::error!(
            ?code,
            kind = msg.kind(),
            "server reply rejected by the session state machine"
        );
        let err = ErrorMessage::new(ErrorCode::Internal, "internal error");
        io.send(&err.into()).await;
        return false;
    }
    io.send(&msg).await && state.phase() != SessionPhase::Closed
}

fn rate_limited() -> Failure {
    ErrorMessage::new(
        ErrorCode::RateLimited,
        "too many requests for this API key; retry later",
    )
}

async fn handle_start(
    shared: &Arc<Shared>,
    key: SessionKey,
    key_id: KeyId,
    start: Start,
    opened: &mut Option<Opened>,
) -> Result<Started, Failure> {
    if !shared.limiter.allow(key_id, Instant::now()) {
        return Err(rate_limited());
    }
    if let Err(e) = start.sampling.validate() {
        return Err(ErrorMessage::new(
            ErrorCode::InvalidRequest,
            format!("sampling options: {e}"),
        ));
    }
    let (context, rendered) = match start.prompt {
        Prompt::Tokens(t) => (t, None),
        Prompt::Chat(messages) => {
            check_chat_size(shared, &messages)?;
            // Rendering and tokenising are CPU work: off the I/O threads.
            let shared_for_render = shared.clone();
            let ids =
                tokio::task::spawn_blocking(move || render_chat(&shared_for_render, &messages))
                    .await
                    .map_err(|_| {
                        ErrorMessage::new(ErrorCode::Internal, "rendering the chat failed")
                    })??;
            (ids.clone(), Some(ids))
        }
    };
    let context_len = u32::try_from(context.len())
        .map_err(|_| ErrorMessage::new(ErrorCode::ContextTooLong, "the prompt is too long"))?;
    let key_slot = shared.key_sessions.acquire(key_id).ok_or_else(|| {
        ErrorMessage::new(
            ErrorCode::SessionLimit,
            format!(
                "this API key already holds {} sessions, its limit",
                shared.key_sessions.max()
            ),
        )
    })?;
    let slot = shared
        .session_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ErrorMessage::new(
                ErrorCode::SessionLimit,
                format!(
                    "the server already serves {} sessions",
                    shared.config.max_sessions
                ),
            )
        })?;
    shared
        .workers
        .call(|reply| Job::Open {
            key,
            context,
            sampling: start.sampling,
            reply,
        })
        .await?;
    *opened = Some(Opened {
        key,
        shared: shared.clone(),
        _slot: slot,
        _key_slot: key_slot,
    });
    Ok(Started {
        session_id: start.session_id,
        context_len,
        rendered,
    })
}

/// Bytes of chat text per context token beyond which a conversation cannot fit: text averages
/// 3-5 bytes a token, so this only refuses what is far too long, before any work on it.
const MAX_CHAT_BYTES_PER_TOKEN: usize = 32;

/// Refuses a conversation that cannot fit the context, from its size alone (a 1 MiB chat was
/// rendered and tokenised before the length check).
fn check_chat_size(
    shared: &Shared,
    messages: &[uhlm_core::chat::ChatMessage],
) -> Result<(), Failure> {
    let bytes: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    let limit = shared.max_context_tokens as usize * MAX_CHAT_BYTES_PER_TOKEN;
    if bytes > limit {
        return Err(ErrorMessage::new(
            ErrorCode::ContextTooLong,
            format!(
                "a chat of {bytes} bytes cannot fit a context of {} tokens; refused before \
                 rendering",
                shared.max_context_tokens
            ),
        ));
    }
    Ok(())
}

fn render_chat(
    shared: &Shared,
    messages: &[uhlm_core::chat::ChatMessage],
) -> Result<Vec<u32>, Failure> {
    let bad = |m: String| ErrorMessage::new(ErrorCode::InvalidRequest, m);
    let template = shared
        .llm
        .chat_template()
        .ok_or_else(|| bad("the server's model has no chat template; send token ids".into()))?;
    let text = template
        .render(messages, true)
        .map_err(|e| bad(e.to_string()))?;
    shared
        .llm
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| bad(format!("cannot tokenize the rendered chat: {e}")))
}

async fn handle_verify(shared: &Arc<Shared>, key: SessionKey, key_id: KeyId, v: Verify) -> Message {
    let received = Instant::now();
    let seq = v.seq;
    if !shared.limiter.allow(key_id, received) {
        return ErrorMessage {
            seq: Some(seq),
            ..rate_limited()
        }
        .into();
    }
    let result = shared
        .workers
        .call(|reply| Job::Verify {
            key,
            verify: v,
            reply: VerdictReply::new(reply),
        })
        .await;
    shared
        .metrics
        .verify_latency
        .observe(received.elapsed().as_secs_f64());
    match result {
        Ok(verdict) => verdict.into(),
        Err(e) => ErrorMessage {
            seq: Some(seq),
            ..e
        }
        .into(),
    }
}

/// Runs one `Generate`: queues it on the worker and forwards its tokens as they come, while
/// still reading the device's side for `Cancel`, `Close` or a reset. `false` when the stream is
/// over. Leaving early drops the event receiver, which stops the worker's generation.
async fn generate(
    shared: &Arc<Shared>,
    io: &mut Framed,
    state: &mut SessionStream,
    key: SessionKey,
    key_id: KeyId,
    g: Generate,
) -> bool {
    let seq = g.seq;
    let with_seq = |e: Failure| -> Message {
        ErrorMessage {
            seq: Some(seq),
            ..e
        }
        .into()
    };
    if !shared.limiter.allow(key_id, Instant::now()) {
        return reply(io, state, with_seq(rate_limited())).await;
    }
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job::Generate {
        key,
        generate: g,
        events,
        cancel: cancel.clone(),
    };
    if let Err(e) = shared.workers.submit(job) {
        return reply(io, state, with_seq(e)).await;
    }
    loop {
        tokio::select! {
            biased;
            event = rx.recv() => {
                let mut tokens = Vec::new();
                let mut end = None;
                let mut next = event;
                // Tokens that are ready together travel in one frame.
                loop {
                    match next {
                        Some(GenEvent::Token(t)) => tokens.push(t),
                        other => {
                            end = Some(other);
                            break;
                        }
                    }
                    match rx.try_recv() {
                        Ok(e) => next = Some(e),
                        Err(_) => break,
                    }
                }
                if !tokens.is_empty() && !reply(io, state, Tokens { seq, tokens }.into()).await {
                    return false;
                }
                let answer = match end {
                    None => continue,
                    Some(Some(GenEvent::Finished { reason, context_len })) => Finished {
                        seq,
                        reason,
                        context_len,
                    }
                    .into(),
                    Some(Some(GenEvent::Failed(e))) => with_seq(e),
                    // Tokens were handled above; a closed channel means the worker is gone.
                    Some(Some(GenEvent::Token(_)) | None) => with_seq(ErrorMessage::new(
                        ErrorCode::ShuttingDown,
                        "the model worker stopped during the generation",
                    )),
                };
                return reply(io, state, answer).await;
            }
            next = io.next(true) => match next {
                Next::Message(msg) => {
                    if let Err(code) = state.on_message(Side::Device, &msg) {
                        let text = format!("{} is not allowed while generating", msg.kind());
                        return reply(io, state, ErrorMessage::for_seq(code, text, seq).into()).await;
                    }
                    match msg {
                        Message::Cancel(_) => cancel.store(true, Ordering::Release),
                        // Close or Error: the device is done with this stream.
                        _ => return false,
                    }
                }
                // The device is silent while it listens: not idle.
                Next::Idle => {}
                Next::End | Next::Lost => return false,
                Next::Bad(e) => {
                    tracing::debug!(session = key, error = %e, "bad frame while generating");
                    io.send(&ErrorMessage::new(e.code(), e.to_string()).into()).await;
                    return false;
                }
                Next::Shutdown => {
                    let msg = ErrorMessage::for_seq(
                        ErrorCode::ShuttingDown,
                        "the server is shutting down",
                        seq,
                    );
                    io.send(&msg.into()).await;
                    return false;
                }
            },
        }
    }
}
