//! One direction of an emulated link, with no I/O: packets in, fates out.
//!
//! Like `quinn-proto`, the model is driven with explicit time (a [`Duration`] since the link was
//! created) and an injected RNG, so the same seed and the same arrivals give the same fates, and
//! tests run hours of simulated traffic in milliseconds. The relay in [`crate::relay`] feeds it
//! real arrival times and sends each packet at the time it returns.
//!
//! A packet goes through, in order:
//! 1. the bottleneck: a token bucket of `burst_bytes` refilled at `rate_bps`, served in FIFO
//!    order; a packet without enough tokens waits for them, so with `burst_bytes = 0` the
//!    bottleneck is a serialiser taking `len·8/rate` per packet. Waiting packets (including
//!    the one being sent) occupy the queue; an arrival that would overflow it is tail-dropped;
//! 2. loss on the air, after it has used its share of the bottleneck (a corrupted frame still
//!    took air time), independent or Gilbert-Elliott;
//! 3. propagation: `delay ± jitter`, never overtaking the previous packet unless `reorder`.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::profile::{DirectionProfile, ProfileError};

/// Why the link dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The bottleneck queue was full (tail drop).
    QueueFull,
    /// Lost at random (independent or bursty loss).
    Loss,
    /// The relay's own bounded buffers were full (too many in-flight bytes or sessions); only
    /// [`crate::LinkEmulator`] reports this.
    Overflow,
    /// The relay could not send the packet on (socket error); only the relay reports this.
    SendFailed,
}

/// What becomes of one offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped(DropReason),
    /// Arrives at the far end at this time (since the link's start).
    Deliver(Duration),
}

/// One direction of an emulated link. `R` is the randomness source (loss and jitter).
#[derive(Debug, Clone)]
pub struct Link<R = ChaCha8Rng> {
    profile: DirectionProfile,
    rng: R,
    /// Bytes per second, or `None` when unlimited.
    bytes_per_s: Option<f64>,
    /// Token count at `bucket_time` (the last departure, or creation).
    tokens: f64,
    bucket_time: Duration,
    /// Packets not yet out of the bottleneck: (departure time, length), in departure order.
    queue: VecDeque<(Duration, u64)>,
    queued_bytes: u64,
    /// Gilbert-Elliott state.
    in_bad_state: bool,
    /// Latest delivery time handed out, for in-order delivery.
    last_delivery: Duration,
    /// Latest `now` seen, so time never runs backwards inside the model.
    last_now: Duration,
}

impl Link<ChaCha8Rng> {
    /// A link whose randomness is fully determined by `seed`.
    pub fn seeded(profile: DirectionProfile, seed: u64) -> Result<Self, ProfileError> {
        Self::with_rng(profile, ChaCha8Rng::seed_from_u64(seed))
    }
}

impl<R: Rng> Link<R> {
    /// A link drawing its loss and jitter from `rng`. The bucket starts full.
    pub fn with_rng(profile: DirectionProfile, rng: R) -> Result<Self, ProfileError> {
        profile.validate()?;
        Ok(Link {
            bytes_per_s: profile.rate_bps.map(|bps| bps as f64 / 8.0),
            tokens: profile.burst_bytes as f64,
            bucket_time: Duration::ZERO,
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_bad_state: false,
            last_delivery: Duration::ZERO,
            last_now: Duration::ZERO,
            profile,
            rng,
        })
    }

    pub fn profile(&self) -> &DirectionProfile {
        &self.profile
    }

    /// Bytes waiting for the bottleneck at the last `offer` (after it).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Offers a packet of `len` bytes arriving at `now`; returns whether and when it arrives.
    ///
    /// `now` should not decrease between calls; if it does (arrivals timestamped on different
    /// threads) it is treated as the latest time seen.
    pub fn offer(&mut self, now: Duration, len: usize) -> Fate {
        let now = now.max(self.last_now);
        self.last_now = now;
        let len = len as u64;

        let departure = match self.bytes_per_s {
            None => now,
            Some(bytes_per_s) => {
                while self.queue.front().is_some_and(|&(dep, _)| dep <= now) {
                    if let Some((_, bytes)) = self.queue.pop_front() {
                        self.queued_bytes -= bytes;
                    }
                }
                // Serve after the previous packet has left; spend tokens accrued since then.
                let start = now.max(self.bucket_time);
                let accrued = bytes_per_s * start.saturating_sub(self.bucket_time).as_secs_f64();
                let tokens = (self.tokens + accrued).min(self.profile.burst_bytes as f64);
                let (departure, tokens_left) = if tokens >= len as f64 {
                    (start, tokens - len as f64)
                } else {
                    let wait = Duration::from_secs_f64((len as f64 - tokens) / bytes_per_s);
                    (start + wait, 0.0)
                };
                if departure > now {
                    if self.queued_bytes + len > self.profile.queue_bytes {
                        return Fate::Dropped(DropReason::QueueFull);
                    }
                    self.queue.push_back((departure, len));
                    self.queued_bytes += len;
                }
                self.tokens = tokens_left;
                self.bucket_time = departure;
                departure
            }
        };

        if self.lose() {
            return Fate::Dropped(DropReason::Loss);
        }

        let mut arrival = departure + self.profile.delay;
        if !self.profile.jitter.is_zero() {
            let jitter = self.profile.jitter.as_secs_f64();
            let offset = self.rng.random_range(-jitter..=jitter);
            // `validate` guarantees jitter <= delay, so this never goes below `departure`.
            arrival = Duration::from_secs_f64((arrival.as_secs_f64() + offset).max(0.0));
        }
        if !self.profile.reorder {
            arrival = arrival.max(self.last_delivery);
            self.last_delivery = arrival;
        }
        Fate::Deliver(arrival)
    }

    /// Decides loss for the current packet, then steps the Gilbert-Elliott chain.
    fn lose(&mut self) -> bool {
        let p = match (&self.profile.bursty, self.in_bad_state) {
            (Some(ge), true) => ge.loss_bad,
            _ => self.profile.loss,
        };
        let lost = p > 0.0 && self.rng.random_bool(p);
        if let Some(ge) = &self.profile.bursty {
            let flip = if self.in_bad_state {
                ge.p_bad_to_good
            } else {
                ge.p_good_to_bad
            };
            if flip > 0.0 && self.rng.random_bool(flip) {
                self.in_bad_state = !self.in_bad_state;
            }
        }
        lost
    }
}
