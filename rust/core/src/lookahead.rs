//! The device's drafting window for pipelined verification, as a plain state machine.
//!
//! While a chain `Verify` is in flight the device keeps drafting on the assumption that its
//! drafts are accepted. [`Lookahead`] holds every token the server has not been given yet, in
//! order: confident tokens committed locally and uncertain drafts (links) waiting to be sent or
//! verified. A token is final once no unverified link comes before it; only final tokens are
//! shown, so nothing shown is ever revised. A `Verdict` settles the links it decided and drops
//! everything drafted after a rejected one (the device rolls its model back by that many
//! tokens and appends the server's token instead).
//!
//! One chain is in flight at a time; the links drafted meanwhile go together in the next one.
//! [`LookaheadLimit`] bounds how far ahead the device drafts: about one round trip of drafting,
//! less when recent chains were rejected early.

use crate::protocol::{Acceptance, Draft, Link, Verdict};

/// A token the server has not been given yet. `M` is what the device keeps with each drafted
/// token until it is final (its uncertainty, the signals its policy learns from).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<M> {
    pub token: u32,
    pub meta: M,
    /// `Some` for an uncertain draft that the server must verify.
    pub uplink: Option<Uplink>,
}

/// What an uncertain draft sends: its distribution and its uncertainty.
#[derive(Clone, Debug, PartialEq)]
pub struct Uplink {
    pub draft: Draft,
    pub uncertainty: f32,
}

/// A token that became final.
#[derive(Clone, Debug, PartialEq)]
pub enum Settled<M> {
    /// Committed on the device without asking the server.
    Local { token: u32, meta: M },
    /// An uncertain draft the server accepted.
    Accepted {
        token: u32,
        meta: M,
        acceptance: Acceptance,
    },
    /// An uncertain draft the server rejected; `token` is the server's resample.
    Resampled {
        token: u32,
        draft: u32,
        meta: M,
        acceptance: Acceptance,
    },
    /// An uncertain draft kept without verification (the server could not be asked).
    Unverified { token: u32, meta: M },
}

impl<M> Settled<M> {
    pub fn token(&self) -> u32 {
        match self {
            Settled::Local { token, .. }
            | Settled::Accepted { token, .. }
            | Settled::Resampled { token, .. }
            | Settled::Unverified { token, .. } => *token,
        }
    }
}

/// The request a [`Lookahead`] wants sent: the fields of a `Verify` besides `seq` and
/// `position` (`position` is the server's context length plus `skipped.len()`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChainRequest {
    pub skipped: Vec<u32>,
    pub draft: Draft,
    pub uncertainty: f32,
    pub chain: Vec<Link>,
}

/// What a `Verdict` did to the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied<M> {
    /// Tokens that became final, in order (none of them returned before).
    pub settled: Vec<Settled<M>>,
    /// Tokens drafted after a rejected link, now dropped: the device's model forgets its last
    /// `dropped + 1` tokens (these and the rejected draft) and takes the server's token.
    pub rejected: Option<usize>,
}

/// Why a `Verdict` does not fit the window (a broken server; the session should end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookaheadError {
    #[error("a verdict arrived with no chain in flight")]
    NothingInFlight,
    #[error("the verdict decides link {link} of a chain of {links}")]
    NoSuchLink { link: usize, links: usize },
    #[error("the verdict accepted link {link} but did not go on to the next")]
    StoppedEarly { link: usize },
    #[error("the verdict accepted draft {draft} with another token {token}")]
    AcceptedOther { draft: u32, token: u32 },
}

/// Tokens drafted but not yet given to the server, oldest first (see the module docs).
#[derive(Clone, Debug)]
pub struct Lookahead<M> {
    entries: Vec<Entry<M>>,
    /// Leading entries already returned as final (local tokens before the first link).
    settled: usize,
    /// Links of the chain in flight (the first ones of the window); 0: none in flight.
    in_flight: usize,
}

impl<M> Default for Lookahead<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Lookahead<M> {
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            settled: 0,
            in_flight: 0,
        }
    }

    /// Appends a drafted token: `uplink` is `Some` if the policy wants it verified.
    pub fn push(&mut self, token: u32, meta: M, uplink: Option<Uplink>) {
        self.entries.push(Entry {
            token,
            meta,
            uplink,
        });
    }

    /// Tokens drafted beyond the final ones: what a rejection could still drop.
    pub fn speculative(&self) -> usize {
        self.first_link().map_or(0, |i| self.entries.len() - i)
    }

    /// Uncertain drafts not yet settled.
    pub fn links(&self) -> usize {
        self.entries.iter().filter(|e| e.uplink.is_some()).count()
    }

    /// Whether a chain is waiting for its `Verdict`.
    pub fn in_flight(&self) -> bool {
        self.in_flight > 0
    }

    /// Tokens the server has not been given (final ones included).
    pub fn unsent(&self) -> &[Entry<M>] {
        &self.entries
    }

    fn first_link(&self) -> Option<usize> {
        self.entries.iter().position(|e| e.uplink.is_some())
    }

    /// Local tokens that became final since the last call (those before the first link).
    pub fn take_final(&mut self) -> Vec<Settled<M>>
    where
        M: Clone,
    {
        let end = self.first_link().unwrap_or(self.entries.len());
        let out = self.entries[self.settled..end]
            .iter()
            .map(|e| Settled::Local {
                token: e.token,
                meta: e.meta.clone(),
            })
            .collect();
        self.settled = end;
        out
    }

    /// The final local tokens to give the server now, ahead of the next chain (an `Extend`):
    /// all of them, once there are at least `min` (0: never) and the window holds no link
    /// (a waiting link's chain carries them anyway). They leave the window.
    pub fn take_extend(&mut self, min: usize) -> Option<Vec<u32>> {
        if min == 0 || self.in_flight > 0 || self.first_link().is_some() || self.settled < min {
            return None;
        }
        let tokens = self
            .entries
            .drain(..self.settled)
            .map(|e| e.token)
            .collect();
        self.settled = 0;
        Some(tokens)
    }

    /// The chain to send now: every link in the window (at most `max_links + 1`, the first
    /// and `max_links` chained, and no more than about `max_bytes` on the wire after the
    /// first), with the local tokens before each. `None` while a chain is in flight or when no
    /// link waits.
    pub fn request(&mut self, max_links: usize, max_bytes: usize) -> Option<ChainRequest> {
        if self.in_flight > 0 {
            return None;
        }
        let mut skipped = Vec::new();
        let mut request: Option<ChainRequest> = None;
        let mut links = 0;
        let mut bytes = 0;
        for e in &self.entries {
            match &e.uplink {
                None => skipped.push(e.token),
                Some(d) => {
                    // A token id takes at most 5 bytes (varint), a float 4.
                    bytes += d.draft.q.len() + 5 * (skipped.len() + 1) + 16;
                    let skipped = std::mem::take(&mut skipped);
                    match request.as_mut() {
                        None => {
                            request = Some(ChainRequest {
                                skipped,
                                draft: d.draft.clone(),
                                uncertainty: d.uncertainty,
                                chain: Vec::new(),
                            })
                        }
                        Some(r) if r.chain.len() < max_links && bytes <= max_bytes => {
                            r.chain.push(Link {
                                skipped,
                                draft: d.draft.clone(),
                                uncertainty: d.uncertainty,
                            })
                        }
                        Some(_) => break,
                    }
                    links += 1;
                }
            }
        }
        self.in_flight = links;
        request
    }

    /// Settles the chain in flight with its `Verdict`.
    pub fn on_verdict(&mut self, v: &Verdict) -> Result<Applied<M>, LookaheadError>
    where
        M: Clone,
    {
        if self.in_flight == 0 {
            return Err(LookaheadError::NothingInFlight);
        }
        let n = v.link();
        if n >= self.in_flight {
            return Err(LookaheadError::NoSuchLink {
                link: n,
                links: self.in_flight,
            });
        }
        if v.accepted && n + 1 < self.in_flight {
            return Err(LookaheadError::StoppedEarly { link: n });
        }
        // The entry of link n.
        let decided = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.uplink.is_some())
            .nth(n)
            .map(|(i, _)| i)
            .expect("in_flight counts links of the window");
        let draft = self.entries[decided].uplink.as_ref().map(|l| l.draft.token);
        if v.accepted && draft != Some(v.token) {
            return Err(LookaheadError::AcceptedOther {
                draft: draft.unwrap_or(v.token),
                token: v.token,
            });
        }
        let rejected = (!v.accepted).then(|| self.entries.len() - decided - 1);
        if rejected.is_some() {
            self.entries.truncate(decided + 1);
        }
        let mut accepted = v.accepted_links.iter();
        let settled_before = self.settled;
        let mut settled = Vec::new();
        for (i, e) in self.entries.drain(..=decided).enumerate() {
            let (token, meta) = (e.token, e.meta);
            let s = match e.uplink {
                None if i < settled_before => continue,
                None => Settled::Local { token, meta },
                Some(_) if i == decided && !v.accepted => Settled::Resampled {
                    token: v.token,
                    draft: token,
                    meta,
                    acceptance: Acceptance {
                        beta: v.beta,
                        tv_distance: v.tv_distance,
                    },
                },
                Some(_) => Settled::Accepted {
                    token,
                    meta,
                    acceptance: if i == decided {
                        Acceptance {
                            beta: v.beta,
                            tv_distance: v.tv_distance,
                        }
                    } else {
                        // Counted by `NoSuchLink`/`StoppedEarly` above: one per earlier link.
                        accepted.next().copied().unwrap_or(Acceptance {
                            beta: 0.0,
                            tv_distance: 0.0,
                        })
                    },
                },
            };
            settled.push(s);
        }
        self.settled = 0;
        self.in_flight = 0;
        settled.extend(self.take_final());
        Ok(Applied { settled, rejected })
    }

    /// The server could not be asked (link down, busy): every link keeps its draft and every
    /// token becomes final. The tokens stay in the window, owed to the server as local ones,
    /// unless the session is gone ([`Lookahead::clear`]).
    pub fn settle_unverified(&mut self) -> Vec<Settled<M>>
    where
        M: Clone,
    {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            let uplink = e.uplink.take();
            if i < self.settled {
                continue;
            }
            let (token, meta) = (e.token, e.meta.clone());
            out.push(match uplink {
                None => Settled::Local { token, meta },
                Some(_) => Settled::Unverified { token, meta },
            });
        }
        self.settled = self.entries.len();
        self.in_flight = 0;
        out
    }

    /// Forgets the final tokens: the server now holds them (a resync from the device's final
    /// context), or nobody will send them (no session: the next starts from the whole
    /// context). What is still speculative stays, to be sent.
    pub fn drop_final(&mut self) {
        self.entries.drain(..self.settled);
        self.settled = 0;
        self.in_flight = 0;
    }

    /// Forgets every token; `settle_unverified` first so that none is lost.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.settled = 0;
        self.in_flight = 0;
    }
}

/// How far ahead of its final tokens the device drafts.
///
/// Drafting past a chain in flight costs nothing in latency (the device would wait idle) but
/// every token drafted after a draft the server rejects is thrown away. The limit is about one
/// round trip's worth of drafting, at least 2 tokens, and no more than twice the expected run
/// of tokens before a rejection when recent links were rejected often; and never more than the
/// server's latest window ([`Verdict::window`](crate::protocol::Verdict::window)). Only the
/// server knows whether a longer round trip is the network (drafting ahead hides it) or its
/// own queue (drafting ahead lengthens it: the thrown-away tokens are scored in passes that
/// every device waits for).
#[derive(Clone, Debug)]
pub struct LookaheadLimit {
    max: usize,
    /// Smoothed seconds of one round trip, of drafting one token, and the smoothed rate at
    /// which drafted tokens end up rejected.
    round_trip: Option<f64>,
    draft: Option<f64>,
    rejections: f64,
    /// The server's window in its last verdict.
    server: Option<usize>,
}

/// Weight of the newest observation in the running averages.
const SMOOTHING: f64 = 0.2;

impl LookaheadLimit {
    /// A limit that never exceeds `max` tokens (0 turns pipelining off: one link at a time).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            round_trip: None,
            draft: None,
            rejections: 0.0,
            server: None,
        }
    }

    fn smooth(avg: &mut Option<f64>, x: f64) {
        *avg = Some(avg.map_or(x, |a| a + SMOOTHING * (x - a)));
    }

    pub fn observe_round_trip(&mut self, seconds: f64) {
        Self::smooth(&mut self.round_trip, seconds);
    }

    pub fn observe_draft(&mut self, seconds: f64) {
        Self::smooth(&mut self.draft, seconds);
    }

    /// Counts a settled chain: `tokens` drafted tokens became final or were dropped, `rejected`
    /// whether it ended with a rejection.
    pub fn observe_chain(&mut self, tokens: usize, rejected: bool) {
        if tokens == 0 {
            return;
        }
        let rate = f64::from(u8::from(rejected)) / tokens as f64;
        self.rejections += SMOOTHING * (rate - self.rejections);
    }

    /// Takes the window of the server's latest verdict (`None`: it sets no limit).
    pub fn observe_server_window(&mut self, window: Option<u16>) {
        self.server = window.map(usize::from);
    }

    /// Most tokens to hold beyond the final ones right now.
    pub fn limit(&self) -> usize {
        if self.max == 0 {
            return 0;
        }
        let per_trip = match (self.round_trip, self.draft) {
            (Some(rtt), Some(d)) if d > 0.0 => (rtt / d).ceil() + 1.0,
            _ => 2.0,
        };
        let run = if self.rejections > 0.0 {
            2.0 / self.rejections
        } else {
            f64::INFINITY
        };
        let own = (per_trip.min(run).max(2.0) as usize).min(self.max);
        self.server.map_or(own, |s| own.min(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(token: u32) -> Option<Uplink> {
        Some(Uplink {
            draft: Draft {
                token,
                q: vec![token as u8],
            },
            uncertainty: 0.5,
        })
    }

    fn verdict(token: u32, accepted: bool, earlier: usize) -> Verdict {
        Verdict {
            seq: 0,
            token,
            accepted,
            beta: 0.25,
            tv_distance: 0.5,
            accepted_links: vec![
                Acceptance {
                    beta: 0.0,
                    tv_distance: 0.1
                };
                earlier
            ],
            window: None,
        }
    }

    fn tokens<M>(s: &[Settled<M>]) -> Vec<u32> {
        s.iter().map(Settled::token).collect()
    }

    #[test]
    fn final_local_tokens_go_ahead_of_the_next_chain_only_between_chains() {
        let mut w = Lookahead::new();
        w.push(1, 0, None);
        w.push(2, 0, None);
        // Not final yet (not shown), then too few.
        assert_eq!(w.take_extend(2), None);
        assert_eq!(tokens(&w.take_final()), [1, 2]);
        assert_eq!(w.take_extend(3), None);
        assert_eq!(w.take_extend(0), None, "0: never");
        assert_eq!(w.take_extend(2), Some(vec![1, 2]));
        assert!(w.unsent().is_empty());
        // A link waiting: its chain carries the tokens before it.
        w.push(3, 0, None);
        w.push(4, 0, link(4));
        w.take_final();
        assert_eq!(w.take_extend(1), None);
        let r = w.request(4, 1 << 20).unwrap();
        assert_eq!(r.skipped, [3]);
        // In flight: what is drafted meanwhile is speculative, and stays.
        w.push(5, 0, None);
        assert_eq!(w.take_extend(1), None);
        w.on_verdict(&verdict(4, true, 0)).unwrap();
        assert_eq!(w.take_extend(1), Some(vec![5]));
    }

    #[test]
    fn local_tokens_before_the_first_link_are_final_at_once() {
        let mut w = Lookahead::new();
        w.push(1, 0, None);
        w.push(2, 0, None);
        assert_eq!(tokens(&w.take_final()), [1, 2]);
        assert!(w.take_final().is_empty(), "returned once");
        w.push(3, 0, link(3));
        w.push(4, 0, None);
        assert!(w.take_final().is_empty(), "4 waits for 3's verdict");
        assert_eq!(w.speculative(), 2);
    }

    #[test]
    fn a_chain_carries_every_link_with_the_local_tokens_between() {
        let mut w = Lookahead::new();
        for (t, l) in [
            (1, false),
            (2, true),
            (3, false),
            (4, false),
            (5, true),
            (6, false),
        ] {
            w.push(t, t, if l { link(t) } else { None });
        }
        let r = w.request(8, usize::MAX).unwrap();
        assert_eq!(r.skipped, [1]);
        assert_eq!(r.draft.token, 2);
        assert_eq!(r.chain.len(), 1);
        assert_eq!(r.chain[0].skipped, [3, 4]);
        assert_eq!(r.chain[0].draft.token, 5);
        assert!(w.request(8, usize::MAX).is_none(), "one chain in flight");
        // The same shape as the server reads it.
        let v = crate::protocol::Verify {
            seq: 0,
            position: 10,
            skipped: r.skipped,
            draft: Some(r.draft),
            uncertainty: 0.5,
            chain: r.chain,
        };
        assert_eq!(v.inputs(), [1, 2, 3, 4]);
        assert_eq!(v.positions().unwrap(), [10, 13]);
    }

    #[test]
    fn chains_are_cut_at_the_link_limit() {
        let mut w = Lookahead::new();
        for t in 0..5 {
            w.push(t, t, link(t));
        }
        let r = w.request(2, usize::MAX).unwrap();
        assert_eq!(r.chain.len(), 2);
        // Links 0..=2 in flight; accepting all of them leaves 3 and 4 for the next chain.
        let a = w.on_verdict(&verdict(2, true, 2)).unwrap();
        assert_eq!(tokens(&a.settled), [0, 1, 2]);
        assert_eq!(a.rejected, None);
        let r = w.request(2, usize::MAX).unwrap();
        assert_eq!((r.draft.token, r.chain.len()), (3, 1));
        w.on_verdict(&verdict(4, true, 1)).unwrap();
        // A byte budget cuts the chain too (each link here is about 22 bytes); the first
        // link always goes.
        for t in 5..9 {
            w.push(t, t, link(t));
        }
        let r = w.request(8, 50).unwrap();
        assert_eq!((r.draft.token, r.chain.len()), (5, 1));
        w.on_verdict(&verdict(6, true, 1)).unwrap();
        assert_eq!(w.request(8, 0).unwrap().chain.len(), 0);
    }

    #[test]
    fn an_accepted_chain_settles_everything_up_to_the_next_link() {
        let mut w = Lookahead::new();
        w.push(1, 0, None);
        w.push(2, 20, link(2));
        w.push(3, 0, None);
        w.push(4, 40, link(4));
        w.push(5, 0, None);
        assert_eq!(tokens(&w.take_final()), [1]);
        w.request(8, usize::MAX).unwrap();
        w.push(6, 60, link(6));
        w.push(7, 0, None);
        let a = w.on_verdict(&verdict(4, true, 1)).unwrap();
        // 1 was shown before; 5 follows the last verified link and is final now.
        assert_eq!(tokens(&a.settled), [2, 3, 4, 5]);
        assert!(matches!(
            a.settled[0],
            Settled::Accepted {
                meta: 20,
                acceptance: Acceptance { beta: 0.0, .. },
                ..
            }
        ));
        assert!(matches!(
            a.settled[2],
            Settled::Accepted {
                meta: 40,
                acceptance: Acceptance { beta: 0.25, .. },
                ..
            }
        ));
        assert_eq!(w.speculative(), 2, "6 and 7 wait for the next chain");
        // 5 is final but the server has not got it yet.
        let r = w.request(8, usize::MAX).unwrap();
        assert_eq!(r.skipped, [5]);
        assert_eq!(r.draft.token, 6);
    }

    #[test]
    fn a_rejection_drops_what_was_drafted_after_it() {
        let mut w = Lookahead::new();
        w.push(1, 10, link(1));
        w.push(2, 0, None);
        w.push(3, 30, link(3));
        w.push(4, 0, None);
        w.request(8, usize::MAX).unwrap();
        w.push(5, 50, link(5));
        w.push(6, 0, None);
        // Link 0 accepted, link 1 (token 3) rejected for 9: 4, 5 and 6 are dropped.
        let a = w.on_verdict(&verdict(9, false, 1)).unwrap();
        assert_eq!(tokens(&a.settled), [1, 2, 9]);
        assert!(matches!(
            a.settled[2],
            Settled::Resampled {
                draft: 3,
                meta: 30,
                ..
            }
        ));
        assert_eq!(a.rejected, Some(3));
        assert!(w.unsent().is_empty());
        assert!(!w.in_flight());
    }

    #[test]
    fn verdicts_that_do_not_fit_are_refused() {
        let mut w: Lookahead<u32> = Lookahead::new();
        assert_eq!(
            w.on_verdict(&verdict(1, true, 0)),
            Err(LookaheadError::NothingInFlight)
        );
        w.push(1, 0, link(1));
        w.push(2, 0, link(2));
        w.request(8, usize::MAX).unwrap();
        assert_eq!(
            w.on_verdict(&verdict(1, true, 2)),
            Err(LookaheadError::NoSuchLink { link: 2, links: 2 })
        );
        assert_eq!(
            w.on_verdict(&verdict(1, true, 0)),
            Err(LookaheadError::StoppedEarly { link: 0 })
        );
        assert_eq!(
            w.on_verdict(&verdict(7, true, 1)),
            Err(LookaheadError::AcceptedOther { draft: 2, token: 7 })
        );
        assert_eq!(w.speculative(), 2, "a refused verdict changes nothing");
    }

    #[test]
    fn unverified_tokens_keep_their_drafts_and_stay_owed() {
        let mut w = Lookahead::new();
        w.push(1, 0, None);
        assert_eq!(tokens(&w.take_final()), [1]);
        w.push(2, 20, link(2));
        w.push(3, 0, None);
        w.request(8, usize::MAX).unwrap();
        let s = w.settle_unverified();
        assert_eq!(tokens(&s), [2, 3]);
        assert!(matches!(s[0], Settled::Unverified { meta: 20, .. }));
        assert!(!w.in_flight());
        // Still owed as local tokens; nothing left to verify.
        assert_eq!(w.unsent().len(), 3);
        assert!(w.request(8, usize::MAX).is_none());
        w.drop_final();
        assert!(w.unsent().is_empty());
    }

    #[test]
    fn a_resync_keeps_the_speculative_tokens_to_send_again() {
        let mut w = Lookahead::new();
        w.push(1, 0, None);
        w.take_final();
        w.push(2, 0, link(2));
        w.push(3, 0, None);
        w.request(8, usize::MAX).unwrap();
        w.drop_final();
        assert_eq!(w.unsent().len(), 2);
        let r = w.request(8, usize::MAX).unwrap();
        assert!(r.skipped.is_empty());
        assert_eq!(r.draft.token, 2);
    }

    #[test]
    fn the_limit_covers_a_round_trip_and_shrinks_with_rejections() {
        let mut l = LookaheadLimit::new(64);
        assert_eq!(l.limit(), 2, "nothing measured yet");
        l.observe_draft(0.025);
        l.observe_round_trip(0.2);
        assert_eq!(l.limit(), 9);
        for _ in 0..50 {
            l.observe_chain(4, true);
        }
        assert!(l.limit() <= 8 && l.limit() >= 2, "{}", l.limit());
        l.observe_round_trip(100.0);
        assert_eq!(LookaheadLimit::new(3).limit().max(l.limit().min(3)), 3);
        assert_eq!(LookaheadLimit::new(0).limit(), 0);
    }

    #[test]
    fn the_server_window_caps_the_limit_until_it_is_lifted() {
        let mut l = LookaheadLimit::new(64);
        l.observe_draft(0.025);
        l.observe_round_trip(0.2);
        assert_eq!(l.limit(), 9);
        l.observe_server_window(Some(3));
        assert_eq!(l.limit(), 3);
        // A busy server may ask for one link at a time, below the device's own floor of 2.
        l.observe_server_window(Some(0));
        assert_eq!(l.limit(), 0);
        // A window wider than the device's own changes nothing; none lifts the cap.
        l.observe_server_window(Some(40));
        assert_eq!(l.limit(), 9);
        l.observe_server_window(Some(0));
        l.observe_server_window(None);
        assert_eq!(l.limit(), 9);
    }
}
