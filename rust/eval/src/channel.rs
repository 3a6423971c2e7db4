//! A simulated wireless link, for throughput estimates without a radio.
//!
//! The U-HLM papers model the uplink as a Rayleigh-fading channel: each transmission sees a
//! power gain `|h|^2 ~ Exp(1)` and gets the Shannon rate `B·log2(1 + SNR·|h|^2)`. The downlink (one
//! token id) is modelled at a fixed rate, and every round trip pays the RTT.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Link parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelConfig {
    /// Uplink bandwidth `B` in Hz.
    pub bandwidth_hz: f64,
    /// Mean uplink signal-to-noise ratio in dB.
    pub snr_db: f64,
    /// Round-trip propagation time in seconds, paid once per message exchange.
    pub rtt_s: f64,
    /// Downlink rate in bit/s.
    pub downlink_bps: f64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            bandwidth_hz: 1e6,
            snr_db: 10.0,
            rtt_s: 0.02,
            downlink_bps: 50e6,
        }
    }
}

impl ChannelConfig {
    /// Linear SNR.
    pub fn snr_linear(&self) -> f64 {
        10f64.powf(self.snr_db / 10.0)
    }

    /// Shannon rate `B·log2(1 + SNR·g)` for a channel power gain `g = |h|^2`, in bit/s.
    pub fn uplink_rate_bps(&self, gain: f64) -> f64 {
        self.bandwidth_hz * (1.0 + self.snr_linear() * gain).log2()
    }
}

/// Per-message timing for one exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transfer {
    pub uplink_s: f64,
    pub downlink_s: f64,
    pub rtt_s: f64,
    /// The fading gain drawn for this uplink.
    pub gain: f64,
}

impl Transfer {
    pub fn total_s(&self) -> f64 {
        self.uplink_s + self.downlink_s + self.rtt_s
    }
}

/// A fading channel with its own seeded RNG, so simulations are reproducible.
pub struct Channel {
    config: ChannelConfig,
    rng: ChaCha8Rng,
}

impl Channel {
    pub fn new(config: ChannelConfig, seed: u64) -> Self {
        Self {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Draws a Rayleigh power gain `|h|^2 ~ Exp(1)`.
    pub fn draw_gain(&mut self) -> f64 {
        // 1 - U lies in (0, 1], so the log is finite.
        -(1.0 - self.rng.random::<f64>()).ln()
    }

    /// Time to send `uplink_bytes` and receive `downlink_bytes` in one exchange.
    pub fn exchange(&mut self, uplink_bytes: usize, downlink_bytes: usize) -> Transfer {
        let gain = self.draw_gain();
        let rate = self.config.uplink_rate_bps(gain);
        let uplink_s = if uplink_bytes == 0 {
            0.0
        } else if rate > 0.0 {
            uplink_bytes as f64 * 8.0 / rate
        } else {
            f64::INFINITY
        };
        Transfer {
            uplink_s,
            downlink_s: downlink_bytes as f64 * 8.0 / self.config.downlink_bps,
            rtt_s: self.config.rtt_s,
            gain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shannon_rate_matches_formula() {
        let c = ChannelConfig {
            bandwidth_hz: 1e6,
            snr_db: 10.0,
            ..Default::default()
        };
        assert!((c.snr_linear() - 10.0).abs() < 1e-12);
        assert!((c.uplink_rate_bps(1.0) - 1e6 * 11f64.log2()).abs() < 1e-6);
        assert_eq!(c.uplink_rate_bps(0.0), 0.0);
    }

    #[test]
    fn gains_are_exponential_with_unit_mean() {
        let mut ch = Channel::new(ChannelConfig::default(), 5);
        let n = 200_000;
        let gains: Vec<f64> = (0..n).map(|_| ch.draw_gain()).collect();
        let mean = gains.iter().sum::<f64>() / n as f64;
        let below_one = gains.iter().filter(|&&g| g < 1.0).count() as f64 / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // P(g < 1) = 1 - e^-1 for Exp(1).
        assert!((below_one - (1.0 - (-1f64).exp())).abs() < 0.005);
    }

    #[test]
    fn exchange_time_scales_with_payload() {
        let cfg = ChannelConfig::default();
        let (mut a, mut b) = (Channel::new(cfg.clone(), 9), Channel::new(cfg, 9));
        let small = a.exchange(100, 4);
        let large = b.exchange(10_000, 4);
        assert_eq!(small.gain, large.gain);
        assert!((large.uplink_s / small.uplink_s - 100.0).abs() < 1e-9);
        assert!(large.total_s() > small.total_s());
        assert_eq!(a.exchange(0, 0).uplink_s, 0.0);
    }
}
