//! What a link does to packets, per direction: the numbers a [`crate::Link`] enforces.
//!
//! A profile is plain data so the harness can record it next to its results (serde) and so the
//! command line can name it (`FromStr`): either a preset (`good`, `cell-edge`, `poor`, `ideal`) or
//! a preset followed by overrides, `poor,up.loss=5%,rtt=200ms` (see [`LinkProfile::from_str`]).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{self, UnitError};

/// The smallest queue a rate-limited direction may have: one full-size Ethernet frame, so every
/// packet a real path would carry can at least wait for its turn.
pub const MIN_QUEUE_BYTES: u64 = 1500;

/// Bursty loss: a two-state Markov chain (Gilbert-Elliott) stepped once per packet.
///
/// In the good state packets are lost with the direction's plain `loss`; in the bad state with
/// `loss_bad`. Long-run loss is `(1 − π_bad)·loss + π_bad·loss_bad` with
/// `π_bad = p_good_to_bad / (p_good_to_bad + p_bad_to_good)`; the mean bad-state run is
/// `1 / p_bad_to_good` packets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliott {
    pub p_good_to_bad: f64,
    pub p_bad_to_good: f64,
    pub loss_bad: f64,
}

impl GilbertElliott {
    /// Long-run fraction of packets seen in the bad state.
    pub fn bad_fraction(&self) -> f64 {
        let total = self.p_good_to_bad + self.p_bad_to_good;
        if total == 0.0 {
            // Never leaves the good state it starts in.
            0.0
        } else {
            self.p_good_to_bad / total
        }
    }
}

/// One direction of the link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionProfile {
    /// Bottleneck rate in bit/s over UDP payload bytes; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Token-bucket depth: this many bytes may leave back to back after an idle period. `0` makes
    /// the bottleneck a plain serialiser (every packet takes `len·8/rate` to leave), which is
    /// what a radio link does, so the presets use it.
    pub burst_bytes: u64,
    /// Bytes that may wait for the bottleneck (including the packet being sent); arrivals that
    /// do not fit are tail-dropped. Ignored when the rate is unlimited.
    pub queue_bytes: u64,
    /// Fixed one-way propagation delay.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Each packet's delay is `delay ± jitter`, uniformly (as `netem` does without a table).
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Let jitter reorder packets. Off by default: without it a packet never overtakes the one
    /// before it (its delivery waits for the previous one), like a single radio bearer.
    #[serde(default)]
    pub reorder: bool,
    /// Independent loss probability per packet (in the good state when `bursty` is set).
    pub loss: f64,
    /// Optional bursty loss on top.
    #[serde(default)]
    pub bursty: Option<GilbertElliott>,
}

impl DirectionProfile {
    /// A direction that does nothing to packets.
    pub const IDEAL: DirectionProfile = DirectionProfile {
        rate_bps: None,
        burst_bytes: 0,
        queue_bytes: 0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        reorder: false,
        loss: 0.0,
        bursty: None,
    };

    /// Long-run fraction of packets lost at random (queue drops excluded).
    pub fn mean_loss(&self) -> f64 {
        match &self.bursty {
            None => self.loss,
            Some(ge) => {
                let bad = ge.bad_fraction();
                (1.0 - bad) * self.loss + bad * ge.loss_bad
            }
        }
    }

    /// Time a packet of `len` bytes occupies the bottleneck when it has no tokens to spend.
    pub fn serialisation(&self, len: usize) -> Duration {
        match self.rate_bps {
            None => Duration::ZERO,
            Some(rate) => Duration::from_secs_f64(len as f64 * 8.0 / rate as f64),
        }
    }

    /// Checks the numbers make sense, so the link model never meets a NaN or an empty queue.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let probability = |field: &'static str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(ProfileError::Invalid {
                    field,
                    reason: format!("{p} is not a probability in [0, 1]"),
                })
            }
        };
        probability("loss", self.loss)?;
        if let Some(ge) = &self.bursty {
            probability("bursty.p_good_to_bad", ge.p_good_to_bad)?;
            probability("bursty.p_bad_to_good", ge.p_bad_to_good)?;
            probability("bursty.loss_bad", ge.loss_bad)?;
        }
        if self.rate_bps == Some(0) {
            return Err(ProfileError::Invalid {
                field: "rate_bps",
                reason: "a rate of 0 carries nothing; use `None` for unlimited".into(),
            });
        }
        if self.rate_bps.is_some() && self.queue_bytes < MIN_QUEUE_BYTES {
            return Err(ProfileError::Invalid {
                field: "queue_bytes",
                reason: format!(
                    "{} bytes cannot hold one {MIN_QUEUE_BYTES}-byte packet",
                    self.queue_bytes
                ),
            });
        }
        if self.jitter > self.delay {
            return Err(ProfileError::Invalid {
                field: "jitter",
                reason: format!(
                    "jitter {:?} exceeds the delay {:?}; delays cannot be negative",
                    self.jitter, self.delay
                ),
            });
        }
        Ok(())
    }
}

/// Both directions of a link, named so results can say which link they were measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    /// The preset name or the spec it was parsed from.
    pub name: String,
    /// Client → server (the device's uplink).
    pub uplink: DirectionProfile,
    /// Server → client.
    pub downlink: DirectionProfile,
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown link preset `{name}` (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error(
        "unknown profile key `{0}` (keys: [up.|down.]rate, burst, queue, delay, jitter, loss, ge, reorder; rtt)"
    )]
    UnknownKey(String),
    #[error("`{0}` is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("bad value for `{key}`: {source}")]
    BadValue {
        key: String,
        #[source]
        source: UnitError,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Names of the presets, in the order the docs list them.
pub const PRESET_NAMES: [&str; 4] = ["ideal", "good", "cell-edge", "poor"];

fn shaped(
    rate_bps: u64,
    queue_bytes: u64,
    delay_ms: u64,
    jitter_ms: u64,
    loss: f64,
) -> DirectionProfile {
    DirectionProfile {
        rate_bps: Some(rate_bps),
        burst_bytes: 0,
        queue_bytes,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        reorder: false,
        loss,
        bursty: None,
    }
}

impl LinkProfile {
    /// No shaping at all: the baseline the other profiles are compared against.
    pub fn ideal() -> Self {
        LinkProfile {
            name: "ideal".into(),
            uplink: DirectionProfile::IDEAL,
            downlink: DirectionProfile::IDEAL,
        }
    }

    /// A good Wi-Fi or 5G link: 50 Mbit/s both ways, 10 ms RTT, no loss.
    pub fn good() -> Self {
        LinkProfile {
            name: "good".into(),
            uplink: shaped(50_000_000, 256 * 1024, 5, 0, 0.0),
            downlink: shaped(50_000_000, 256 * 1024, 5, 0, 0.0),
        }
    }

    /// The edge of a cell: 1 Mbit/s up, 10 Mbit/s down, 60 ms RTT (±5 ms each way), 1% loss each
    /// way. Queues hold about 250 ms up and 100 ms down.
    pub fn cell_edge() -> Self {
        LinkProfile {
            name: "cell-edge".into(),
            uplink: shaped(1_000_000, 32 * 1024, 30, 5, 0.01),
            downlink: shaped(10_000_000, 128 * 1024, 30, 5, 0.01),
        }
    }

    /// A poor link: 256 kbit/s up, 2 Mbit/s down, 150 ms RTT (±10 ms each way), 3% loss each way.
    /// Queues hold about 500 ms up and 250 ms down.
    pub fn poor() -> Self {
        LinkProfile {
            name: "poor".into(),
            uplink: shaped(256_000, 16 * 1024, 75, 10, 0.03),
            downlink: shaped(2_000_000, 64 * 1024, 75, 10, 0.03),
        }
    }

    /// The preset called `name`, if any.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "ideal" => Some(Self::ideal()),
            "good" => Some(Self::good()),
            "cell-edge" => Some(Self::cell_edge()),
            "poor" => Some(Self::poor()),
            _ => None,
        }
    }

    /// All presets, in [`PRESET_NAMES`] order.
    pub fn presets() -> Vec<Self> {
        PRESET_NAMES
            .iter()
            .filter_map(|n| Self::preset(n))
            .collect()
    }

    /// Round-trip time an empty link adds (both one-way delays).
    pub fn rtt(&self) -> Duration {
        self.uplink.delay + self.downlink.delay
    }

    pub fn validate(&self) -> Result<(), ProfileError> {
        self.uplink.validate()?;
        self.downlink.validate()
    }

    /// Applies one `key=value` override; a key without `up.`/`down.` sets both directions.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        let bad = |source| ProfileError::BadValue {
            key: key.to_owned(),
            source,
        };
        if key == "rtt" {
            let half = units::parse_duration(value).map_err(bad)? / 2;
            self.uplink.delay = half;
            self.downlink.delay = half;
            return Ok(());
        }
        let (targets, field): (Vec<&mut DirectionProfile>, &str) =
            if let Some(field) = key.strip_prefix("up.") {
                (vec![&mut self.uplink], field)
            } else if let Some(field) = key.strip_prefix("down.") {
                (vec![&mut self.downlink], field)
            } else {
                (vec![&mut self.uplink, &mut self.downlink], key)
            };
        for dir in targets {
            match field {
                "rate" => dir.rate_bps = units::parse_rate(value).map_err(bad)?,
                "burst" => dir.burst_bytes = units::parse_bytes(value).map_err(bad)?,
                "queue" => dir.queue_bytes = units::parse_bytes(value).map_err(bad)?,
                "delay" => dir.delay = units::parse_duration(value).map_err(bad)?,
                "jitter" => dir.jitter = units::parse_duration(value).map_err(bad)?,
                "loss" => dir.loss = units::parse_probability(value).map_err(bad)?,
                "reorder" => {
                    dir.reorder = match value {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => return Err(bad(UnitError::NotANumber(value.to_owned()))),
                    }
                }
                "ge" => dir.bursty = parse_gilbert_elliott(value).map_err(bad)?,
                _ => return Err(ProfileError::UnknownKey(key.to_owned())),
            }
        }
        Ok(())
    }
}

/// `off`, or `P_GOOD_TO_BAD/P_BAD_TO_GOOD/LOSS_BAD` (each a fraction or a percentage).
fn parse_gilbert_elliott(value: &str) -> Result<Option<GilbertElliott>, UnitError> {
    if matches!(value, "off" | "none") {
        return Ok(None);
    }
    let parts: Vec<&str> = value.split('/').collect();
    let [gb, bg, lb] = parts[..] else {
        return Err(UnitError::NotANumber(format!(
            "{value} (expected P_GOOD_TO_BAD/P_BAD_TO_GOOD/LOSS_BAD)"
        )));
    };
    Ok(Some(GilbertElliott {
        p_good_to_bad: units::parse_probability(gb)?,
        p_bad_to_good: units::parse_probability(bg)?,
        loss_bad: units::parse_probability(lb)?,
    }))
}

impl FromStr for LinkProfile {
    type Err = ProfileError;

    /// `PRESET[,KEY=VALUE]...` or `KEY=VALUE[,KEY=VALUE]...` (starting from `ideal`).
    ///
    /// Keys, each optionally prefixed `up.` or `down.` to set one direction: `rate` (`1mbit`,
    /// `unlimited`), `burst` and `queue` (`32KiB`), `delay` and `jitter` (one way, `30ms`),
    /// `loss` (`1%`), `ge` (Gilbert-Elliott `P_GB/P_BG/LOSS_BAD` or `off`), `reorder`
    /// (`true`/`false`); plus `rtt`, which sets both one-way delays to half of it.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let spec = spec.trim();
        let mut items = spec.split(',').map(str::trim).peekable();
        let mut profile = match items.peek() {
            Some(first) if !first.contains('=') => {
                let name = *first;
                items.next();
                Self::preset(name).ok_or_else(|| ProfileError::UnknownPreset {
                    name: name.to_owned(),
                    known: PRESET_NAMES.join(", "),
                })?
            }
            _ => Self::ideal(),
        };
        for item in items {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ProfileError::NotKeyValue(item.to_owned()))?;
            profile.apply(key.trim(), value.trim())?;
        }
        profile.name = spec.to_owned();
        profile.validate()?;
        Ok(profile)
    }
}

impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_issue() {
        let good = LinkProfile::good();
        assert_eq!(good.uplink.rate_bps, Some(50_000_000));
        assert_eq!(good.downlink.rate_bps, Some(50_000_000));
        assert_eq!(good.rtt(), Duration::from_millis(10));
        assert_eq!(good.uplink.mean_loss(), 0.0);

        let edge = LinkProfile::cell_edge();
        assert_eq!(edge.uplink.rate_bps, Some(1_000_000));
        assert_eq!(edge.downlink.rate_bps, Some(10_000_000));
        assert_eq!(edge.rtt(), Duration::from_millis(60));
        assert_eq!(edge.uplink.mean_loss(), 0.01);

        let poor = LinkProfile::poor();
        assert_eq!(poor.uplink.rate_bps, Some(256_000));
        assert_eq!(poor.downlink.rate_bps, Some(2_000_000));
        assert_eq!(poor.rtt(), Duration::from_millis(150));
        assert_eq!(poor.downlink.mean_loss(), 0.03);

        for p in LinkProfile::presets() {
            p.validate().unwrap();
            assert_eq!(p.name.parse::<LinkProfile>().unwrap(), p);
        }
    }

    #[test]
    fn overrides_apply_per_direction() {
        let p: LinkProfile = "poor,up.loss=5%,rtt=200ms,down.rate=unlimited,ge=1%/30%/50%"
            .parse()
            .unwrap();
        assert_eq!(p.uplink.loss, 0.05);
        assert_eq!(p.downlink.loss, 0.03);
        assert_eq!(p.uplink.delay, Duration::from_millis(100));
        assert_eq!(p.downlink.rate_bps, None);
        assert_eq!(p.uplink.rate_bps, Some(256_000));
        let ge = p.downlink.bursty.unwrap();
        assert_eq!(
            (ge.p_good_to_bad, ge.p_bad_to_good, ge.loss_bad),
            (0.01, 0.3, 0.5)
        );
        assert_eq!(
            p.name,
            "poor,up.loss=5%,rtt=200ms,down.rate=unlimited,ge=1%/30%/50%"
        );
    }

    #[test]
    fn custom_profile_starts_from_ideal() {
        let p: LinkProfile = "rate=1mbit,queue=64KiB,delay=20ms".parse().unwrap();
        assert_eq!(p.uplink.rate_bps, Some(1_000_000));
        assert_eq!(p.downlink.queue_bytes, 65536);
        assert_eq!(p.rtt(), Duration::from_millis(40));
        assert_eq!(p.uplink.loss, 0.0);
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        assert!(matches!(
            "lunar".parse::<LinkProfile>(),
            Err(ProfileError::UnknownPreset { .. })
        ));
        assert!(matches!(
            "good,colour=blue".parse::<LinkProfile>(),
            Err(ProfileError::UnknownKey(_))
        ));
        assert!(matches!(
            "good,loss".parse::<LinkProfile>(),
            Err(ProfileError::NotKeyValue(_))
        ));
        assert!(matches!(
            "good,loss=2".parse::<LinkProfile>(),
            Err(ProfileError::BadValue { .. })
        ));
        assert!(matches!(
            "good,queue=100".parse::<LinkProfile>(),
            Err(ProfileError::Invalid {
                field: "queue_bytes",
                ..
            })
        ));
        assert!(matches!(
            "good,jitter=20ms".parse::<LinkProfile>(),
            Err(ProfileError::Invalid {
                field: "jitter",
                ..
            })
        ));
        assert!(matches!(
            "good,ge=1%/2%".parse::<LinkProfile>(),
            Err(ProfileError::BadValue { .. })
        ));
    }

    #[test]
    fn bursty_mean_loss() {
        let mut d = DirectionProfile::IDEAL;
        d.loss = 0.01;
        d.bursty = Some(GilbertElliott {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.19,
            loss_bad: 0.5,
        });
        // π_bad = 0.05 → 0.95·0.01 + 0.05·0.5.
        assert!((d.mean_loss() - (0.0095 + 0.025)).abs() < 1e-12);
    }
}
