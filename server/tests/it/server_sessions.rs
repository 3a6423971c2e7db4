//! Sessions against a real server: many at once, eviction and resync, chat prompts, and the
//! session, rate and idle limits.

use crate::common;

use std::time::Duration;

use common::{API_KEY, Client, Mirror, greedy_verifies, llm, prompt_tokens, start};
use uhlm_core::chat::ChatMessage;
use uhlm_core::protocol::{
    Close, Draft, ErrorCode, Link, Message, PROTOCOL_VERSION, Prompt, Resync, Start, Verify,
};
use uhlm_core::sampling::{SamplingOptions, argmax};
use uhlm_server::{PassTarget, Server, ServerConfig, kv_bytes_per_token};

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first man on the moon was",
    "A haiku about autumn leaves:",
    "def fibonacci(n):",
    "The largest planet in our solar system is",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The chemical symbol for gold is",
    "To make a cup of tea, first",
    "The speed of light in vacuum is about",
    "Shakespeare wrote the play",
    "In mathematics, a prime number is",
    "The Great Wall of China was built",
    "My favourite programming language is",
    "The opposite of hot is",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_sessions_get_greedy_verdicts() {
    let model = llm();
    let server = Server::start_with_model(
        ServerConfig::local(common::llm_path(), [API_KEY]),
        model.clone(),
    )
    .await
    .unwrap();
    let (addr, fp) = (server.local_addr(), server.model_fingerprint());
    // 4 connections with 4 sessions each.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(std::sync::Arc::new(
            Client::ready(addr, server.cert_der(), fp).await,
        ));
    }
    let mut tasks = Vec::new();
    for (i, text) in PROMPTS.iter().enumerate() {
        let (client, model) = (clients[i % 4].clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = client.0.session().await;
            let prompt = prompt_tokens(&model, text);
            s.send(start(i as u64, &prompt)).await;
            match s.recv().await {
                Some(Message::Started(st)) => assert_eq!(st.context_len as usize, prompt.len()),
                other => panic!("session {i}: expected Started, got {other:?}"),
            }
            let mut mirror = Mirror::new(&model, &prompt);
            greedy_verifies(&mut s, &mut mirror, 6, 3)
                .await
                .map_err(|e| format!("session {i}: {e}"))?;
            s.send(Close {
                reason: "done".into(),
            })
            .await;
            s.send.finish().ok();
            Ok::<_, String>(mirror.context)
        }));
    }
    let mut contexts = Vec::new();
    for t in tasks {
        contexts.push(t.await.unwrap().unwrap());
    }
    // Each session produced its own continuation of its own prompt.
    for (i, c) in contexts.iter().enumerate() {
        assert!(c.len() > prompt_tokens(&model, PROMPTS[i]).len() + 6);
    }
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("uhlm_tokens_verified_total 96"),
        "{metrics}"
    );
    // Half the drafts were the argmax (accepted), half were not (resampled).
    assert!(
        metrics.contains("uhlm_tokens_accepted_total 48"),
        "{metrics}"
    );
    assert!(
        metrics.contains("uhlm_tokens_resampled_total 48"),
        "{metrics}"
    );
    // Prompts are scored as soon as their sessions open (the device prefills at the same
    // time), one per turn of the worker; a session whose Verify came before its turn had its
    // prompt scored with it. Either way the verdicts above are the model's own.
    let at_most: usize = PROMPTS
        .iter()
        .map(|t| prompt_tokens(&model, t).len().saturating_sub(1))
        .sum();
    let prefilled = common::metric(&server, "uhlm_prefilled_tokens_total") as usize;
    assert!(
        prefilled > 0 && prefilled <= at_most,
        "{prefilled} of {at_most}"
    );
    server.shutdown().await;
}

/// Budget bytes that leave a pass of `tokens` returning `outputs` rows of logits its room (a
/// pass is planned within half the budget) and no more: what the embedded engine counts for a
/// pass (the model's `PassCost` and each decided row's decoded draft distribution), twice.
fn pass_room(model: &uhlm_model::Model, tokens: usize, outputs: usize) -> u64 {
    let drafts = outputs * model.info().vocab_size * std::mem::size_of::<f32>();
    2 * (model.pass_cost().bytes(tokens, outputs) + drafts as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_session_resyncs_and_continues_correctly() {
    let model = llm();
    let a_prompt = prompt_tokens(
        &model,
        "The history of the printing press begins in the fifteenth century when",
    );
    let b_prompt = prompt_tokens(
        &model,
        "In a distant galaxy, a small robot named Pip discovered that",
    );
    let per_token = kv_bytes_per_token(model.info());
    // Room for either session alone, not for both.
    let budget_tokens = a_prompt.len().max(b_prompt.len()) + 6;
    assert!(a_prompt.len() + b_prompt.len() > budget_tokens);
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.kv_memory_budget_bytes =
        per_token * budget_tokens as u64 + pass_room(&model, budget_tokens, 4);
    config.batch_wait = Duration::ZERO;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;

    let mut a = client.session().await;
    a.send(start(1, &a_prompt)).await;
    assert!(matches!(a.recv().await, Some(Message::Started(_))));
    let mut ma = Mirror::new(&model, &a_prompt);
    greedy_verifies(&mut a, &mut ma, 1, 0).await.unwrap();

    let mut b = client.session().await;
    b.send(start(2, &b_prompt)).await;
    assert!(matches!(b.recv().await, Some(Message::Started(_))));
    let mut mb = Mirror::new(&model, &b_prompt);
    greedy_verifies(&mut b, &mut mb, 1, 0).await.unwrap();

    // B's cache pushed A's out: A's next Verify is told to resync.
    a.send(Verify {
        seq: 7,
        position: ma.context.len() as u32,
        skipped: vec![],
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    })
    .await;
    match a.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!((e.code, e.seq), (ErrorCode::NeedResync, Some(7)), "{e}")
        }
        other => panic!("expected NeedResync, got {other:?}"),
    }
    a.send(Resync {
        context: ma.context.clone(),
    })
    .await;
    match a.recv().await {
        Some(Message::Started(s)) => assert_eq!(s.context_len as usize, ma.context.len()),
        other => panic!("expected Started after Resync, got {other:?}"),
    }
    ma.resync();
    greedy_verifies(&mut a, &mut ma, 3, 2).await.unwrap();
    assert!(
        server.metrics_text().contains("uhlm_evictions_total"),
        "no eviction counted"
    );
    assert!(
        !server.metrics_text().contains("uhlm_evictions_total 0"),
        "no eviction counted"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompts_are_rendered_by_the_server() {
    let model = llm();
    let server = Server::start_with_model(
        ServerConfig::local(common::llm_path(), [API_KEY]),
        model.clone(),
    )
    .await
    .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let messages = vec![ChatMessage::user("What is the capital of Italy?")];
    let mut s = client.session().await;
    s.send(Start {
        session_id: 9,
        prompt: Prompt::Chat(messages.clone()),
        sampling: SamplingOptions::greedy(8),
    })
    .await;
    let rendered = match s.recv().await {
        Some(Message::Started(st)) => st.rendered.expect("rendered ids for a chat prompt"),
        other => panic!("expected Started, got {other:?}"),
    };
    let text = model
        .chat_template()
        .unwrap()
        .render(&messages, true)
        .unwrap();
    assert_eq!(rendered, model.tokenizer().encode(&text, false).unwrap());
    let mut mirror = Mirror::new(&model, &rendered);
    greedy_verifies(&mut s, &mut mirror, 2, 0).await.unwrap();

    // A conversation far too long for the context is refused from its size, before the
    // server spends any work rendering and tokenising it.
    let mut long = client.session().await;
    long.send(Start {
        session_id: 10,
        prompt: Prompt::Chat(vec![ChatMessage::user("word ".repeat(60_000))]),
        sampling: SamplingOptions::greedy(8),
    })
    .await;
    match long.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::ContextTooLong, "{e}");
            assert!(e.message.contains("before rendering"), "{e}");
        }
        other => panic!("expected ContextTooLong, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_rate_and_idle_limits() {
    let model = llm();
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.max_sessions = 2;
    config.rate_limit = 3.0;
    // Long enough that s2, silent while s1 bursts, outlives the burst on a loaded machine
    // (12 s was not, with the other tests of this file and a build on the same two cores).
    config.idle_timeout = Duration::from_secs(25);
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;

    let mut s1 = client.session().await;
    s1.send(start(1, &[1, 2, 3])).await;
    assert!(matches!(s1.recv().await, Some(Message::Started(_))));
    let mut s2 = client.session().await;
    s2.send(start(2, &[1, 2, 3])).await;
    assert!(matches!(s2.recv().await, Some(Message::Started(_))));
    // The third session is over the limit; the error is retryable on the same stream.
    let mut s3 = client.session().await;
    s3.send(start(3, &[1, 2, 3])).await;
    match s3.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::SessionLimit),
        other => panic!("expected SessionLimit, got {other:?}"),
    }
    // Requests beyond the key's budget of 3/s are refused, and retrying later works.
    let mut position = 3;
    let mut limited = None;
    for seq in 0..20 {
        s1.send(Verify {
            seq,
            position,
            skipped: vec![],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        })
        .await;
        match s1.recv().await {
            Some(Message::Verdict(v)) => {
                assert_eq!(v.seq, seq);
                position += 1;
            }
            Some(Message::Error(e)) => {
                assert_eq!((e.code, e.seq), (ErrorCode::RateLimited, Some(seq)), "{e}");
                limited = Some(seq);
                break;
            }
            other => panic!("expected a Verdict or RateLimited, got {other:?}"),
        }
    }
    let seq = limited.expect("20 requests in a burst were never rate limited");
    // The same request, retried as the budget refills (at 3/s), is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        s1.send(Verify {
            seq,
            position,
            skipped: vec![],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        })
        .await;
        match s1.recv().await {
            Some(Message::Verdict(v)) if v.seq == seq => break,
            Some(Message::Error(e)) if e.code == ErrorCode::RateLimited => {
                assert!(std::time::Instant::now() < deadline, "never allowed again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected a Verdict or RateLimited, got {other:?}"),
        }
    }

    // Closing s2 frees a slot for s3's retry.
    s2.send(Close {
        reason: "done".into(),
    })
    .await;
    assert!(s2.recv().await.is_none());
    // Retried (within the key's request budget) until the slot is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        s3.send(start(3, &[1, 2, 3])).await;
        match s3.recv().await {
            Some(Message::Started(_)) => break,
            Some(Message::Error(e))
                if matches!(e.code, ErrorCode::SessionLimit | ErrorCode::RateLimited) =>
            {
                assert!(std::time::Instant::now() < deadline, "slot not freed");
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            other => panic!("expected Started, got {other:?}"),
        }
    }

    // Left alone, a session is closed after the idle timeout.
    let closed = tokio::time::timeout(Duration::from_secs(60), s3.recv())
        .await
        .unwrap();
    assert!(
        matches!(closed, Some(Message::Close(ref c)) if c.reason.contains("idle")),
        "{closed:?}"
    );
    server.shutdown().await;
}

/// The memory budget counts what caches hold allocated, and a resync frees a long context's
/// buffers. (It used to count tokens in use while a reset kept the buffers: sessions resynced
/// to short contexts held far more than the budget and nothing was evicted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_counts_allocated_caches_and_a_resync_frees_them() {
    let model = llm();
    let sentence = prompt_tokens(&model, "The quick brown fox jumps over the lazy dog.");
    let long: Vec<u32> = sentence.iter().copied().cycle().take(600).collect();
    let short = long[..5].to_vec();
    let held = |tokens: &[u32]| {
        let mut s = model.session();
        s.score_last(tokens).unwrap();
        s.kv_cache_bytes() as u64
    };
    // Room for two long contexts scored in one pass. The server scores them in chunks, its
    // buffers growing as they go (never below what one pass allocates): two of them and the
    // short one do not fit.
    let one = held(&long);
    let budget = 2 * one;
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.kv_memory_budget_bytes = budget;
    config.batch_wait = Duration::ZERO;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let next = |position: usize| Verify {
        seq: 0,
        position: position as u32,
        skipped: vec![],
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    };
    let verdict = |m: Option<Message>| assert!(matches!(m, Some(Message::Verdict(_))), "{m:?}");
    let metric = |name: &str| common::metric(&server, name);

    // A long context, then a resync to a short one: the long one's buffers go.
    let mut a = client.session().await;
    a.send(start(1, &long)).await;
    assert!(matches!(a.recv().await, Some(Message::Started(_))));
    a.send(next(long.len())).await;
    verdict(a.recv().await);
    a.send(Resync {
        context: short.clone(),
    })
    .await;
    assert!(matches!(a.recv().await, Some(Message::Started(_))));
    a.send(Verify {
        seq: 1,
        ..next(short.len())
    })
    .await;
    verdict(a.recv().await);
    let kv = metric("uhlm_kv_cache_bytes");
    assert!(
        kv < one as f64,
        "the resync kept the long context's buffers: {kv}"
    );
    assert_eq!(metric("uhlm_evictions_total"), 0.0);
    // Two more long contexts do not fit beside each other and the short one: the least
    // recently used go, and what is allocated stays within the budget.
    let mut open = Vec::new();
    for id in [2, 3] {
        let mut s = client.session().await;
        s.send(start(id, &long)).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        s.send(next(long.len())).await;
        verdict(s.recv().await);
        let kv = metric("uhlm_kv_cache_bytes");
        assert!(kv > 0.0 && kv <= budget as f64, "{kv} > {budget}");
        // Kept open: a closed session would free its cache without any eviction.
        open.push(s);
    }
    assert!(metric("uhlm_evictions_total") >= 1.0);
    server.shutdown().await;
}

/// A request trickled a byte at a time does not keep its session open: the whole message must
/// arrive within the idle timeout. (Each byte used to restart the timer, so one peer could hold
/// every session slot with a byte every few seconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_meets_the_idle_deadline() {
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.idle_timeout = Duration::from_secs(2);
    let server = Server::start_with_model(config, llm()).await.unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let mut s = client.session().await;
    s.send(start(1, &[1, 2, 3])).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    let frame = uhlm_core::protocol::encode_frame(
        &Message::Verify(Verify {
            seq: 0,
            position: 3,
            skipped: vec![7; 16],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        }),
        u32::MAX,
    )
    .unwrap();
    // One byte every 500 ms: the frame would take over 10 s.
    assert!(frame.len() > 20, "{}", frame.len());
    for byte in &frame[..frame.len() - 1] {
        s.send_raw(std::slice::from_ref(byte)).await;
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), s.recv()).await {
            assert!(
                matches!(m, Some(Message::Close(ref c)) if c.reason.contains("idle")),
                "{m:?}"
            );
            server.shutdown().await;
            return;
        }
    }
    panic!("the session stayed open while a request trickled in for over 10 s");
}

/// Two tenants share a server: by default neither may hold more than half of its sessions or
/// connections, so one key holding its slots (the attack: idle sessions kept alive) leaves the
/// other tenant served. A unit given back (a session closed) can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_key_cannot_take_every_slot() {
    const OTHER_KEY: &str = "the-other-tenant";
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY, OTHER_KEY]);
    config.max_sessions = 4;
    config.max_connections = 4;
    let server = Server::start_with_model(config, llm()).await.unwrap();
    let (addr, cert, fingerprint) = (
        server.local_addr(),
        server.cert_der().to_vec(),
        server.model_fingerprint(),
    );

    // The first tenant: two connections, then a third is refused at its Hello.
    let (first, _c1) = Client::ready_on(&server).await;
    let (_second, _c2) = Client::ready_on(&server).await;
    let third = Client::connect(addr, &cert).await;
    match third.hello(API_KEY, fingerprint, PROTOCOL_VERSION).await.1 {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::SessionLimit, "{e}");
            assert!(e.message.contains("2 connections"), "{e}");
        }
        other => panic!("expected SessionLimit, got {other:?}"),
    }
    // Two sessions, then a third is refused.
    let mut s1 = first.session().await;
    s1.send(start(1, &[1, 2, 3])).await;
    assert!(matches!(s1.recv().await, Some(Message::Started(_))));
    let mut s2 = first.session().await;
    s2.send(start(2, &[1, 2, 3])).await;
    assert!(matches!(s2.recv().await, Some(Message::Started(_))));
    let mut s3 = first.session().await;
    s3.send(start(3, &[1, 2, 3])).await;
    match s3.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::SessionLimit, "{e}");
            assert!(e.message.contains("2 sessions"), "{e}");
        }
        other => panic!("expected SessionLimit, got {other:?}"),
    }

    // The other tenant still connects and opens its sessions.
    let other = Client::connect(addr, &cert).await;
    // The control stream stays open: the connection lives as long as it does.
    let (_other_control, answer) = other.hello(OTHER_KEY, fingerprint, PROTOCOL_VERSION).await;
    assert!(matches!(answer, Some(Message::Welcome(_))), "{answer:?}");
    for id in 1..=2 {
        let mut s = other.session().await;
        s.send(start(id, &[1, 2, 3])).await;
        let reply = s.recv().await;
        assert!(matches!(reply, Some(Message::Started(_))), "{reply:?}");
    }

    // A closed session gives its slot back to its key.
    s1.send(Close {
        reason: "done".into(),
    })
    .await;
    while s1.recv().await.is_some() {}
    let mut retry = first.session().await;
    let mut started = false;
    for _ in 0..50 {
        retry.send(start(4, &[1, 2, 3])).await;
        match retry.recv().await {
            Some(Message::Started(_)) => {
                started = true;
                break;
            }
            Some(Message::Error(e)) if e.code == ErrorCode::SessionLimit => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("expected Started or SessionLimit, got {other:?}"),
        }
    }
    assert!(started, "the closed session's slot never came back");
    server.shutdown().await;
}

/// A device keeps one connection for hours and opens a session per generation: the tasks of
/// finished sessions must not pile up on it (issue 11: 60k streams used to keep +59 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_sessions_are_reaped_while_their_connection_lives() {
    const SESSIONS: u64 = 24;
    let server =
        Server::start_with_model(ServerConfig::local(common::llm_path(), [API_KEY]), llm())
            .await
            .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    for id in 1..=SESSIONS {
        let mut s = client.session().await;
        s.send(start(id, &[1, 2, 3])).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        s.send(Close {
            reason: "done".into(),
        })
        .await;
        while s.recv().await.is_some() {}
    }
    // Every session has ended (the server closed each stream); its task may take a moment to
    // be joined, but it must be, with the connection still open.
    let mut tasks = f64::NAN;
    for _ in 0..100 {
        tasks = common::metric(&server, "uhlm_session_tasks");
        if common::metric(&server, "uhlm_sessions") == 0.0 && tasks == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tasks, 0.0, "finished session tasks were not reaped");
    // The connection is alive and still serves sessions.
    let mut s = client.session().await;
    s.send(start(SESSIONS + 1, &[1, 2, 3])).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    assert_eq!(common::metric(&server, "uhlm_session_tasks"), 1.0);
    server.shutdown().await;
}

/// One forward pass serves sessions in different states at once and each gets its own answer:
/// two at different positions (each catching up on a different number of skipped tokens), one
/// resynced to another context since it opened, and one whose cache was evicted (it is told to
/// resync, the others are served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forward_pass_answers_sessions_in_different_states() {
    let model = llm();
    let text = prompt_tokens(
        &model,
        "The quick brown fox jumps over the lazy dog and runs away.",
    );
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    // Every cache outside the pass in progress is evicted (least recently used first): the
    // budget leaves the pass its room and less than one cache's smallest allocation (256
    // tokens) ...
    config.kv_memory_budget_bytes = pass_room(&model, text.len(), 4);
    // ... and requests sent together meet in one pass.
    config.batch_wait = Duration::from_secs(1);
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let verify = |context: usize, skipped: &[u32]| Verify {
        seq: 0,
        position: (context + skipped.len()) as u32,
        skipped: skipped.to_vec(),
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    };
    let started = |m: Option<Message>| assert!(matches!(m, Some(Message::Started(_))), "{m:?}");
    // E holds a cache, then loses it when the others open (one-token prompts allocate nothing).
    let mut e = client.session().await;
    e.send(start(4, &text[..3])).await;
    started(e.recv().await);
    e.send(verify(3, &[])).await;
    assert!(matches!(e.recv().await, Some(Message::Verdict(_))));
    let mut open = Vec::new();
    for (id, first) in [(1, text[0]), (2, text[1]), (3, text[2])] {
        let mut s = client.session().await;
        s.send(start(id, &[first])).await;
        started(s.recv().await);
        open.push(s);
    }
    // C is resynced to another one-token context.
    open[2]
        .send(Resync {
            context: vec![text[5]],
        })
        .await;
    started(open[2].recv().await);
    assert_eq!(common::metric(&server, "uhlm_evictions_total"), 1.0);
    let passes = common::metric(&server, "uhlm_forward_passes_total");

    let contexts = [
        [&[text[0]][..], &text[1..7]].concat(),
        [&[text[1]][..], &text[2..4]].concat(),
        [&[text[5]][..], &text[6..10]].concat(),
    ];
    for (s, context) in open.iter_mut().zip(&contexts) {
        s.send(verify(1, &context[1..])).await;
    }
    e.send(verify(4, &[])).await;
    for (s, context) in open.iter_mut().zip(&contexts) {
        let mut alone = model.session();
        let greedy = argmax(&alone.score_last(context).unwrap()).unwrap();
        match s.recv().await {
            Some(Message::Verdict(v)) => assert_eq!(v.token, greedy, "context {context:?}"),
            other => panic!("expected a Verdict, got {other:?}"),
        }
    }
    match e.recv().await {
        Some(Message::Error(err)) => assert_eq!(err.code, ErrorCode::NeedResync, "{err}"),
        other => panic!("expected NeedResync, got {other:?}"),
    }
    // All three in one pass.
    assert_eq!(
        common::metric(&server, "uhlm_forward_passes_total"),
        passes + 1.0
    );
    server.shutdown().await;
}

/// Every verdict asks its device to draft no further ahead than its share of a pass: the
/// tokens a pass holds over the sessions with work in it. Alone, a session may fill a pass;
/// four meeting in one pass get a quarter each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_carries_the_sessions_share_of_a_pass() {
    let model = llm();
    let text = prompt_tokens(&model, "The quick brown fox jumps over the lazy dog.");
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.max_batch_tokens = 64;
    // Requests sent together meet in one pass.
    config.batch_wait = Duration::from_secs(1);
    config.max_batch = 4;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let verify = Verify {
        seq: 0,
        position: 1,
        skipped: Vec::new(),
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    };
    let mut sessions = Vec::new();
    for id in 0..4 {
        let mut s = client.session().await;
        // One-token prompts: nothing to catch up on, only the verified position to score.
        s.send(start(id, &text[id as usize..id as usize + 1])).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        sessions.push(s);
    }
    let window = |m: Option<Message>| match m {
        Some(Message::Verdict(v)) => v.window,
        other => panic!("expected a Verdict, got {other:?}"),
    };
    sessions[0].send(verify.clone()).await;
    assert_eq!(window(sessions[0].recv().await), Some(64));
    let passes = common::metric(&server, "uhlm_forward_passes_total");
    // Session 0's context is two tokens long now (its prompt and the verdict's token).
    for (i, s) in sessions.iter_mut().enumerate() {
        s.send(Verify {
            position: if i == 0 { 2 } else { 1 },
            ..verify.clone()
        })
        .await;
    }
    for s in &mut sessions {
        assert_eq!(window(s.recv().await), Some(16));
    }
    assert_eq!(
        common::metric(&server, "uhlm_forward_passes_total"),
        passes + 1.0,
        "the four met in one pass"
    );
    // Operators see the windows asked for.
    assert_eq!(common::metric(&server, "uhlm_drafting_window_count"), 5.0);
    assert_eq!(common::metric(&server, "uhlm_drafting_window_sum"), 128.0);
    server.shutdown().await;
}

/// A session closed while its row waits in the planned pass (its device stopped the stream
/// during its `Verify`) leaves every other row its own logits. The batched pass used to hand
/// the rows after a vanished session their neighbours' logits: verdicts drawn from another
/// session's distribution, which the fault campaign saw as "the model returned too few rows"
/// and as distributions of different lengths where a neighbour's row count differed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_in_the_planned_pass_leaves_the_others_their_own_logits() {
    let model = llm();
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    // Requests sent within two seconds of the first meet in one pass.
    config.batch_wait = Duration::from_secs(2);
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], PROMPTS[4], PROMPTS[9]]
        .iter()
        .map(|t| prompt_tokens(&model, t))
        .collect();
    let greedy: Vec<u32> = prompts
        .iter()
        .map(|p| argmax(&model.session().score_last(p).unwrap()).unwrap())
        .collect();
    assert!(
        greedy[1] != greedy[2],
        "the check needs sessions that answer differently"
    );
    let mut streams = Vec::new();
    for (id, prompt) in prompts.iter().enumerate() {
        let mut s = client.session().await;
        s.send(start(id as u64, prompt)).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        streams.push(s);
    }
    // The prompts are scored as the sessions open: wait until the worker is idle.
    let scored: usize = prompts.iter().map(|p| p.len() - 1).sum();
    while (common::metric(&server, "uhlm_prefilled_tokens_total") as usize) < scored {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let verify = |prompt: &[u32]| Verify {
        seq: 0,
        position: prompt.len() as u32,
        skipped: Vec::new(),
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    };
    let passes = common::metric(&server, "uhlm_forward_passes_total");
    // The first session's Verify is planned, then the device stops listening: its session
    // closes while the pass is still gathering requests. The others join the same pass.
    streams[0].send(verify(&prompts[0])).await;
    streams[0].recv.stop(0u32.into()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (s, prompt) in streams[1..].iter_mut().zip(&prompts[1..]) {
        s.send(verify(prompt)).await;
    }
    for (i, s) in streams.iter_mut().enumerate().skip(1) {
        match s.recv().await {
            Some(Message::Verdict(v)) => assert_eq!(v.token, greedy[i], "session {i}"),
            other => panic!("session {i}: expected a Verdict, got {other:?}"),
        }
    }
    // One pass, and the closed session's row was in it undecided.
    assert_eq!(
        common::metric(&server, "uhlm_forward_passes_total"),
        passes + 1.0
    );
    assert_eq!(common::metric(&server, "uhlm_tokens_verified_total"), 2.0);
    server.shutdown().await;
}

/// Prompts still being prefilled are protected from eviction, but not past the KV budget: of
/// two long prompts that do not fit together, the one further along keeps its cache and the
/// other is told to resync (issue 11's campaign: four 4,096-token prompts took 712 MiB of a
/// 512 MiB budget). Both devices get the model's answer in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefilling_prompts_stay_within_the_kv_budget() {
    let model = llm();
    let sentence = prompt_tokens(&model, "The quick brown fox jumps over the lazy dog.");
    let long: Vec<u32> = sentence.iter().copied().cycle().take(600).collect();
    let greedy = {
        let mut alone = model.session();
        argmax(&alone.score_last(&long).unwrap()).unwrap()
    };
    let one = {
        let mut alone = model.session();
        alone.score_last(&long).unwrap();
        alone.kv_cache_bytes() as f64
    };
    let budget = (one * 1.5) as u64;
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.kv_memory_budget_bytes = budget;
    config.prefill_chunk_tokens = 32;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let next = Verify {
        seq: 0,
        position: long.len() as u32,
        skipped: vec![],
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    };
    let mut sessions = Vec::new();
    for id in [1, 2] {
        let mut s = client.session().await;
        s.send(start(id, &long)).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        s.send(next.clone()).await;
        sessions.push(s);
    }
    // Watch the allocated KV bytes while both prompts are prefilled.
    let kv = || common::metric(&server, "uhlm_kv_cache_bytes");
    let mut peak = 0.0f64;
    let (mut first, mut second) = (None, None);
    let [a, b] = &mut sessions[..] else {
        unreachable!()
    };
    while first.is_none() || second.is_none() {
        peak = peak.max(kv());
        tokio::select! {
            m = a.recv(), if first.is_none() => first = Some(m),
            m = b.recv(), if second.is_none() => second = Some(m),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
    let mut resync = Vec::new();
    for (s, reply) in sessions.iter_mut().zip([first, second]) {
        match reply.flatten() {
            Some(Message::Verdict(v)) => assert_eq!(v.token, greedy),
            Some(Message::Error(e)) if e.code == ErrorCode::NeedResync => resync.push(s),
            other => panic!("expected a Verdict or NeedResync, got {other:?}"),
        }
    }
    assert!(resync.len() <= 1, "both prompts were evicted");
    assert!(peak <= budget as f64, "{peak} bytes of KV cache > {budget}");
    // The evicted device resyncs and gets its answer (the other session, idle now, yields).
    for s in resync {
        s.send(Resync {
            context: long.clone(),
        })
        .await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        s.send(Verify {
            seq: 1,
            ..next.clone()
        })
        .await;
        loop {
            peak = peak.max(kv());
            tokio::select! {
                m = s.recv() => {
                    match m {
                        Some(Message::Verdict(v)) => assert_eq!(v.token, greedy),
                        other => panic!("expected a Verdict, got {other:?}"),
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
    }
    assert!(peak <= budget as f64, "{peak} bytes of KV cache > {budget}");
    assert!(common::metric(&server, "uhlm_evictions_total") >= 1.0);
    server.shutdown().await;
}

/// A long prompt is caught up in passes cut to `pass_target`, not in whole chunks: on a loaded
/// machine a 128-token chunk took over a second (issue 11's campaign), and every other
/// device's `Verify` waited for it. With a target no pass can meet, every chunk after the
/// first (sized before any pass was measured) shrinks to the floor of 16 tokens; with no
/// target, chunks stay whole. Both get the model's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_passes_are_cut_to_the_time_target() {
    let model = llm();
    let sentence = prompt_tokens(&model, "The quick brown fox jumps over the lazy dog.");
    let long: Vec<u32> = sentence.iter().copied().cycle().take(400).collect();
    let greedy = {
        let mut alone = model.session();
        argmax(&alone.score_last(&long).unwrap()).unwrap()
    };
    let mut passes = Vec::new();
    for target in [PassTarget::Fixed(Duration::from_micros(1)), PassTarget::Off] {
        let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
        config.prefill_chunk_tokens = 128;
        config.pass_target = target;
        let server = Server::start_with_model(config, model.clone())
            .await
            .unwrap();
        let (client, _control) = Client::ready_on(&server).await;
        let mut s = client.session().await;
        s.send(start(1, &long)).await;
        assert!(matches!(s.recv().await, Some(Message::Started(_))));
        s.send(Verify {
            seq: 0,
            position: long.len() as u32,
            skipped: vec![],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        })
        .await;
        match s.recv().await {
            Some(Message::Verdict(v)) => assert_eq!(v.token, greedy),
            other => panic!("expected a Verdict, got {other:?}"),
        }
        let n = common::metric(&server, "uhlm_forward_passes_total");
        assert_eq!(
            common::metric(&server, "uhlm_forward_pass_seconds_count"),
            n
        );
        passes.push(n);
        server.shutdown().await;
    }
    // 399 tokens to catch up before the verified position: one chunk of 128, then 271 in
    // passes of at most 16 with the target; passes of 128 without.
    assert!(
        passes[0] >= 18.0 && passes[1] <= 5.0,
        "forward passes with and without a target: {passes:?}"
    );
}

/// A chain of greedy drafts with local tokens between them, the link at `wrong` (if any)
/// drafted as the second most likely token: returns the `Verify` (seq 0) that sends it after
/// `mirror`'s context and the LLM's greedy token at every position, scored by `mirror`
/// without committing anything.
pub(crate) fn greedy_chain(
    mirror: &mut Mirror,
    gaps: &[usize],
    wrong: Option<usize>,
) -> (Verify, Vec<u32>) {
    let base = mirror.session.len();
    let mut logits = tokio::task::block_in_place(|| mirror.score(&[]));
    let mut greedy = Vec::new();
    let next = |logits: &mut Vec<f32>, mirror: &mut Mirror, token: u32| {
        *logits = tokio::task::block_in_place(|| mirror.session.step(token).unwrap());
    };
    let mut drafts = Vec::new();
    let mut skipped_runs = Vec::new();
    for (link, &gap) in gaps.iter().enumerate() {
        let mut skipped = Vec::new();
        for _ in 0..gap {
            let t = argmax(&logits).unwrap();
            skipped.push(t);
            next(&mut logits, mirror, t);
        }
        let best = argmax(&logits).unwrap();
        let draft = if wrong == Some(link) {
            let mut masked = logits.clone();
            masked[best as usize] = f32::NEG_INFINITY;
            argmax(&masked).unwrap()
        } else {
            best
        };
        greedy.push(best);
        drafts.push(Draft {
            token: draft,
            q: common::dense_q(&logits),
        });
        skipped_runs.push(skipped);
        next(&mut logits, mirror, draft);
    }
    mirror.session.truncate(base);
    let first = drafts.remove(0);
    let mut runs = skipped_runs.into_iter();
    let skipped = runs.next().unwrap();
    let chain = drafts
        .into_iter()
        .zip(runs)
        .map(|(draft, skipped)| Link {
            skipped,
            draft,
            uncertainty: 0.5,
        })
        .collect();
    let verify = Verify {
        seq: 0,
        position: (mirror.context.len() + skipped.len()) as u32,
        skipped,
        draft: Some(first),
        uncertainty: 0.5,
        chain,
    };
    (verify, greedy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_verified_in_order_up_to_its_first_rejection() {
    let model = llm();
    let prompt = prompt_tokens(&model, "The three primary colours are");
    let config = ServerConfig::local(common::llm_path(), [API_KEY]);
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;
    let mut s = client.session().await;
    s.send(start(1, &prompt)).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    let mut mirror = Mirror::new(&model, &prompt);
    // Rounds: a chain rejected at link 2, one rejected at its first link, one accepted whole.
    for (seq, (gaps, wrong)) in [
        (vec![1, 0, 2, 1], Some(2)),
        (vec![0, 3], Some(0)),
        (vec![2, 0, 1], None),
    ]
    .into_iter()
    .enumerate()
    {
        let seq = seq as u32;
        let (mut verify, greedy) = greedy_chain(&mut mirror, &gaps, wrong);
        verify.seq = seq;
        let positions = verify.positions().unwrap();
        s.send(verify.clone()).await;
        let v = match s.recv().await {
            Some(Message::Verdict(v)) => v,
            other => panic!("expected a Verdict, got {other:?}"),
        };
        let decided = wrong.unwrap_or(gaps.len() - 1);
        assert_eq!(v.link(), decided, "round {seq}: {v:?}");
        assert_eq!(
            v.token, greedy[decided],
            "round {seq}: the LLM's greedy token"
        );
        assert_eq!(v.accepted, wrong.is_none());
        // The device keeps what the verdict settled; the server's context ends there too.
        let inputs = verify.inputs();
        let kept = positions[decided] as usize - mirror.context.len();
        let mut scored = mirror.pending.clone();
        scored.extend_from_slice(&inputs[..kept]);
        tokio::task::block_in_place(|| mirror.session.score(&scored).unwrap());
        mirror.commit(&inputs[..kept], v.token);
        assert_eq!(mirror.context.len(), positions[decided] as usize + 1);
    }
    // The server's cache holds exactly the settled context: greedy verifies go on from it.
    greedy_verifies(&mut s, &mut mirror, 3, 2).await.unwrap();
    // Positions decided: 3 + 1 + 3 by the chains, 3 by the single verifies.
    assert_eq!(common::metric(&server, "uhlm_tokens_verified_total"), 10.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_longer_than_the_server_allows_are_refused() {
    let model = llm();
    let prompt = prompt_tokens(&model, "Counting: one, two,");
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.max_chain_links = 1;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    let (_control, answer) = client
        .hello(API_KEY, server.model_fingerprint(), PROTOCOL_VERSION)
        .await;
    match answer {
        Some(Message::Welcome(w)) => assert_eq!(w.max_chain_links, 1),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut s = client.session().await;
    s.send(start(1, &prompt)).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    let mut mirror = Mirror::new(&model, &prompt);
    let (mut verify, _) = greedy_chain(&mut mirror, &[0, 0, 0], None);
    verify.seq = 4;
    s.send(verify).await;
    match s.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, Some(4)), "{e}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    server.shutdown().await;
}
