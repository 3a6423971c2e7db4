//! The link model against its profile, in simulated time: rate, delay, loss, queue overflow,
//! bursty loss and ordering, over tens of thousands of packets per case.

use std::time::Duration;

use uhlm_linkemu::{DirectionProfile, DropReason, Fate, GilbertElliott, Link, LinkProfile};

const PACKETS: usize = 20_000;

fn directions() -> Vec<(String, DirectionProfile)> {
    LinkProfile::presets()
        .into_iter()
        .flat_map(|p| {
            [
                (format!("{} uplink", p.name), p.uplink),
                (format!("{} downlink", p.name), p.downlink),
            ]
        })
        .collect()
}

/// Loss-rate check: within 3 standard errors of the binomial proportion.
fn assert_loss(name: &str, lost: usize, total: usize, expected: f64) {
    let measured = lost as f64 / total as f64;
    let se = (expected * (1.0 - expected) / total as f64).sqrt();
    assert!(
        (measured - expected).abs() <= 3.0 * se + 1e-12,
        "{name}: loss {measured:.5} vs profile {expected:.5} (3 SE = {:.5})",
        3.0 * se
    );
}

#[test]
fn saturated_throughput_matches_the_rate() {
    // Offer 1200-byte packets at twice the rate: the bottleneck stays busy, the queue overflows.
    let len = 1200usize;
    for (name, profile) in directions() {
        let Some(rate) = profile.rate_bps else {
            continue;
        };
        let mut link = Link::seeded(profile.clone(), 1).unwrap();
        let gap = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64 / 2.0);
        let mut delivered = Vec::new();
        let (mut lost, mut queue_full) = (0usize, 0usize);
        for i in 0..PACKETS as u32 * 2 {
            match link.offer(gap * i, len) {
                Fate::Deliver(at) => delivered.push(at),
                Fate::Dropped(DropReason::Loss) => lost += 1,
                Fate::Dropped(DropReason::QueueFull) => queue_full += 1,
                Fate::Dropped(other) => panic!("{name}: the model never reports {other:?}"),
            }
        }
        assert!(
            queue_full > PACKETS / 2,
            "{name}: {queue_full} queue drops at 2× the rate"
        );
        // Lost packets used the bottleneck too, so count them when measuring its rate.
        let carried = delivered.len() + lost;
        assert!(
            carried >= PACKETS / 2,
            "{name}: only {carried} packets carried"
        );
        let span = (*delivered.last().unwrap() - delivered[0]).as_secs_f64();
        let measured = (carried - 1) as f64 * len as f64 * 8.0 / span;
        assert!(
            (measured / rate as f64 - 1.0).abs() < 0.05,
            "{name}: measured {measured:.0} bit/s vs {rate}"
        );
        assert_loss(&name, lost, carried, profile.mean_loss());
    }
}

#[test]
fn light_load_delay_is_propagation_plus_serialisation() {
    // Packets 100 ms apart never queue and never catch up with each other's jitter.
    let len = 500usize;
    for (name, profile) in directions() {
        let mut link = Link::seeded(profile.clone(), 2).unwrap();
        let gap = Duration::from_millis(100);
        let mut delays = Vec::new();
        let mut lost = 0usize;
        for i in 0..PACKETS as u32 {
            let sent = gap * i;
            match link.offer(sent, len) {
                Fate::Deliver(at) => delays.push((at - sent).as_secs_f64()),
                Fate::Dropped(DropReason::Loss) => lost += 1,
                Fate::Dropped(other) => panic!("{name}: {other:?} at light load"),
            }
        }
        let expected = (profile.delay + profile.serialisation(len)).as_secs_f64();
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!(
            (mean - expected).abs() < 0.001,
            "{name}: mean delay {mean:.6} s vs {expected:.6} s"
        );
        let jitter = profile.jitter.as_secs_f64();
        let (min, max) = delays
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
        assert!(min >= expected - jitter - 1e-6, "{name}: min delay {min}");
        assert!(max <= expected + jitter + 1e-6, "{name}: max delay {max}");
        if jitter > 0.0 {
            // Uniform on ±jitter spans most of it over this many packets.
            assert!(
                max - min > 1.8 * jitter,
                "{name}: delay spread {}",
                max - min
            );
        }
        assert_loss(&name, lost, PACKETS, profile.mean_loss());
    }
}

fn shaped(rate_bps: u64, queue_bytes: u64) -> DirectionProfile {
    DirectionProfile {
        rate_bps: Some(rate_bps),
        queue_bytes,
        ..DirectionProfile::IDEAL
    }
}

#[test]
fn queue_bounds_the_backlog_and_tail_drops() {
    // 1 Mbit/s, 10 KB queue: a burst of 100 × 1000 B at one instant keeps exactly 10 packets.
    let mut link = Link::seeded(shaped(1_000_000, 10_000), 3).unwrap();
    let fates: Vec<Fate> = (0..100).map(|_| link.offer(Duration::ZERO, 1000)).collect();
    let kept: Vec<Duration> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Deliver(at) => Some(*at),
            Fate::Dropped(_) => None,
        })
        .collect();
    assert_eq!(kept.len(), 10);
    assert!(
        fates[10..]
            .iter()
            .all(|f| *f == Fate::Dropped(DropReason::QueueFull))
    );
    // Serialised back to back, 8 ms each.
    for (i, at) in kept.iter().enumerate() {
        assert_eq!(at.as_micros(), 8_000 * (i as u128 + 1));
    }
    assert_eq!(link.queued_bytes(), 10_000);
    // Once the first has left, exactly one more fits.
    assert!(matches!(
        link.offer(Duration::from_millis(8), 1000),
        Fate::Deliver(_)
    ));
    assert_eq!(
        link.offer(Duration::from_millis(8), 1000),
        Fate::Dropped(DropReason::QueueFull)
    );
    // Time running backwards is treated as the latest time seen, not a panic.
    assert_eq!(
        link.offer(Duration::ZERO, 1000),
        Fate::Dropped(DropReason::QueueFull)
    );
}

#[test]
fn burst_allowance_lets_a_burst_through_at_once() {
    let mut profile = shaped(1_000_000, 10_000);
    profile.burst_bytes = 5_000;
    let mut link = Link::seeded(profile, 4).unwrap();
    let at: Vec<Fate> = (0..7).map(|_| link.offer(Duration::ZERO, 1000)).collect();
    // Five fit in the full bucket; the sixth and seventh wait 8 ms each.
    assert!(at[..5].iter().all(|f| *f == Fate::Deliver(Duration::ZERO)));
    assert_eq!(at[5], Fate::Deliver(Duration::from_millis(8)));
    assert_eq!(at[6], Fate::Deliver(Duration::from_millis(16)));
    // After 1 s idle the bucket is full again, but not fuller than the burst.
    let later: Vec<Fate> = (0..6)
        .map(|_| link.offer(Duration::from_secs(1), 1000))
        .collect();
    assert!(
        later[..5]
            .iter()
            .all(|f| *f == Fate::Deliver(Duration::from_secs(1)))
    );
    assert_eq!(later[5], Fate::Deliver(Duration::from_millis(1008)));
}

#[test]
fn bursty_loss_has_the_right_mean_and_burstiness() {
    let ge = GilbertElliott {
        p_good_to_bad: 0.01,
        p_bad_to_good: 0.2,
        loss_bad: 0.5,
    };
    let profile = DirectionProfile {
        bursty: Some(ge),
        ..DirectionProfile::IDEAL
    };
    let n = 200_000usize;
    let mut link = Link::seeded(profile.clone(), 5).unwrap();
    let lost: Vec<bool> = (0..n)
        .map(|i| {
            link.offer(Duration::from_micros(i as u64), 100) == Fate::Dropped(DropReason::Loss)
        })
        .collect();
    let p = profile.mean_loss();
    let measured = lost.iter().filter(|&&l| l).count() as f64 / n as f64;
    // Losses are correlated: the variance of their sum is inflated by the autocovariance
    // (loss_bad² π_bad π_good λ^k, λ = 1 − p_gb − p_bg) summed over all lags.
    let pi_bad = ge.bad_fraction();
    let lambda = 1.0 - ge.p_good_to_bad - ge.p_bad_to_good;
    let variance = p * (1.0 - p)
        + 2.0 * ge.loss_bad.powi(2) * pi_bad * (1.0 - pi_bad) * lambda / (1.0 - lambda);
    let se = (variance / n as f64).sqrt();
    assert!(
        (measured - p).abs() < 3.0 * se,
        "mean loss {measured:.5} vs {p:.5} (SE {se:.5})"
    );
    // A loss means the bad state; the next packet is still in it with 1 − p_bg.
    let after_loss = lost.windows(2).filter(|w| w[0]).count();
    let loss_after_loss = lost.windows(2).filter(|w| w[0] && w[1]).count();
    let conditional = loss_after_loss as f64 / after_loss as f64;
    let expected = (1.0 - ge.p_bad_to_good) * ge.loss_bad;
    let se = (expected * (1.0 - expected) / after_loss as f64).sqrt();
    assert!(
        (conditional - expected).abs() < 4.0 * se,
        "P(loss | loss) {conditional:.4} vs {expected:.4}"
    );
    // Far burstier than independent loss at the same mean.
    assert!(conditional > 5.0 * p);
}

#[test]
fn jitter_keeps_order_unless_reordering_is_asked_for() {
    let mut profile = DirectionProfile {
        delay: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        ..DirectionProfile::IDEAL
    };
    let deliveries = |profile: &DirectionProfile| {
        let mut link = Link::seeded(profile.clone(), 6).unwrap();
        (0..5_000u64)
            .map(|i| match link.offer(Duration::from_millis(i), 100) {
                Fate::Deliver(at) => at,
                Fate::Dropped(r) => panic!("no loss configured, got {r:?}"),
            })
            .collect::<Vec<_>>()
    };
    let in_order = deliveries(&profile);
    assert!(in_order.windows(2).all(|w| w[0] <= w[1]));
    profile.reorder = true;
    let reordered = deliveries(&profile);
    let inversions = reordered.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(
        inversions > 500,
        "only {inversions} reorderings at 1 ms spacing, ±10 ms jitter"
    );
}

#[test]
fn same_seed_same_fates() {
    let run = |seed| {
        let mut link = Link::seeded(LinkProfile::poor().uplink, seed).unwrap();
        (0..2_000u64)
            .map(|i| link.offer(Duration::from_millis(i * 3), 200))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

#[test]
fn unlimited_rate_adds_only_delay() {
    let profile = DirectionProfile {
        delay: Duration::from_millis(20),
        ..DirectionProfile::IDEAL
    };
    let mut link = Link::seeded(profile, 0).unwrap();
    for i in 0..1000u64 {
        let now = Duration::from_micros(i);
        assert_eq!(
            link.offer(now, 60_000),
            Fate::Deliver(now + Duration::from_millis(20))
        );
    }
}

#[test]
fn invalid_profiles_are_refused() {
    let mut profile = shaped(1_000_000, 100);
    assert!(Link::seeded(profile.clone(), 0).is_err());
    profile.queue_bytes = 10_000;
    profile.loss = f64::NAN;
    assert!(Link::seeded(profile, 0).is_err());
}

#[test]
fn profiles_round_trip_through_toml() {
    for profile in LinkProfile::presets() {
        let text = toml::to_string(&profile).unwrap();
        let back: LinkProfile = toml::from_str(&text).unwrap();
        assert_eq!(back, profile, "{text}");
    }
}
