//! The worker's loop: take what is queued, plan one pass ([`Plan`]), make room for it in the
//! memory budget, run it, and hand each request to what serves it.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Instant;

use super::plan::Plan;
use super::{GenEvent, Job, SessionKey, Streaming, Worker};
use crate::engine::Engine;

impl<E: Engine> Worker<E> {
    /// Serves `rx` until it closes or a [`Job::Stop`] has been served: a pass at a time.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut stopping = false;
        loop {
            let mut jobs: Vec<Job> = self.held.drain(..).collect();
            if !stopping {
                if jobs.is_empty() && self.is_idle() {
                    match rx.recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                    // Waiting for company only where the operator asks for it.
                    let deadline = Instant::now() + self.settings.batch_wait;
                    while jobs.len() < self.settings.max_batch {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                }
                // Everything already queued: what does not fit in this pass is held.
                while let Ok(job) = rx.try_recv() {
                    jobs.push(job);
                }
            }
            // A pass may take half the budget; caches make room for it before it runs.
            let mut plan = Plan::new(
                self.settings.max_batch,
                self.settings.max_batch_tokens,
                self.engine.pass_cost(),
                self.budget / 2,
            );
            while let Some((key, verify, reply)) = self.ready.pop_front() {
                if let Some((verify, reply)) = self.plan_verify(&mut plan, key, verify, reply) {
                    self.ready.push_front((key, verify, reply));
                    break;
                }
            }
            let mut held_keys = HashSet::new();
            for job in jobs {
                if matches!(job, Job::Stop) {
                    stopping = true;
                    continue;
                }
                // A session's requests keep their order: none passes one held or in the pass.
                if let Some(key) = job.key()
                    && (held_keys.contains(&key) || (plan.has(key) && job.needs_order()))
                {
                    held_keys.insert(key);
                    self.held.push_back(job);
                    continue;
                }
                if let Some(job) = self.handle(job, &mut plan) {
                    held_keys.extend(job.key());
                    self.held.push_back(job);
                }
            }
            self.plan_generations(&mut plan);
            // Catching up gets a share of every pass however full it is, so it never starves;
            // it costs the others one chunk a pass (cut to `pass_target`).
            self.plan_catch_ups(&mut plan);
            // Every session with work in this pass or waiting for the next.
            let mut busy: HashSet<SessionKey> = plan.keys().chain(held_keys).collect();
            busy.extend(self.queued_keys());
            self.window = self.drafting_window(busy.len());
            self.make_room(plan.bytes + plan.growth, &busy);
            self.run_plan(plan);
            // Kept from eviction: these, and the sessions the pass has just queued.
            busy.extend(self.queued_keys());
            self.enforce_budget(&busy);
            self.clock += 1;
            if stopping && self.held.is_empty() && self.ready.is_empty() {
                break;
            }
        }
        // Generations still running end here; their session tasks see the channel close.
        self.streams.clear();
        self.metrics.sessions.dec_by(self.sessions.len() as i64);
        self.sessions.clear();
        self.report_kv_bytes(0);
    }

    /// Sessions queued for a later pass: running generations, catch-ups, caught-up `Verify`s.
    fn queued_keys(&self) -> impl Iterator<Item = SessionKey> + '_ {
        let streams = self.streams.iter().map(|s| s.key);
        let ready = self.ready.iter().map(|r| r.0);
        streams.chain(self.catching_up.iter().copied()).chain(ready)
    }

    /// Nothing to do until a request comes.
    fn is_idle(&self) -> bool {
        self.streams.is_empty()
            && self.catching_up.is_empty()
            && self.ready.is_empty()
            && self.held.is_empty()
    }

    /// Serves `job`, or plans its part of the pass; gives it back if the pass is full.
    fn handle(&mut self, job: Job, plan: &mut Plan) -> Option<Job> {
        self.clock += 1;
        match job {
            Job::Open {
                key,
                context,
                sampling,
                reply,
            } => {
                let r = self.open(key, context, sampling);
                if r.is_ok() {
                    self.queue_catch_up(key);
                }
                let _ = reply.send(r);
            }
            Job::Resync {
                key,
                context,
                reply,
            } => {
                let r = self.resync(key, context);
                if r.is_ok() {
                    self.queue_catch_up(key);
                }
                let _ = reply.send(r);
            }
            Job::Verify { key, verify, reply } => {
                if let Some(e) = self.take_refusal(key) {
                    let _ = reply.send(Err(e));
                    return None;
                }
                if let Some((verify, reply)) = self.defer_verify(key, verify, reply) {
                    return self
                        .plan_verify(plan, key, verify, reply)
                        .map(|(verify, reply)| Job::Verify { key, verify, reply });
                }
            }
            Job::Generate {
                key,
                generate,
                events,
                cancel,
            } => match self
                .take_refusal(key)
                .map_or_else(|| self.admit_generation(key, &generate), Err)
            {
                Ok(()) => {
                    self.metrics.generate_requests.inc();
                    self.streams.push_back(Streaming {
                        key,
                        left: generate.max_tokens,
                        events,
                        cancel,
                    });
                }
                Err(e) => {
                    let _ = events.send(GenEvent::Failed(e));
                }
            },
            Job::Extend { key, tokens } => self.extend(key, tokens),
            Job::Close { key } => {
                if self.sessions.remove(&key).is_some() {
                    self.metrics.sessions.dec();
                }
            }
            Job::Stop => {}
        }
        None
    }
}
