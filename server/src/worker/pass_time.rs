//! How long a forward pass takes, learnt from the passes the worker has run.
//!
//! A `Verify` that arrives while a pass runs waits for it, then for its own: the pass's
//! duration, not its token count, is what another device feels. Counted in tokens, a 128-token
//! catch-up chunk took over a second in the fault campaign (64 devices' drafting models on the
//! same two cores) and well under 100 ms on an idle machine. So the worker sizes the catch-up
//! chunks of each pass to a target duration, from a model of what a pass costs here and now:
//! a fixed part (every weight read once, per-pass bookkeeping) plus a part per token, fitted
//! by exponentially weighted least squares over the recent passes so that it follows the
//! machine's load.

/// Weight of the newest pass against the ones before: about the last 20 passes count.
const DECAY: f64 = 0.95;

/// The cost model `seconds = fixed + per_token · tokens`, fitted to recent passes.
#[derive(Debug, Default, Clone)]
pub(super) struct PassClock {
    weight: f64,
    tokens: f64,
    seconds: f64,
    tokens_sq: f64,
    tokens_seconds: f64,
}

impl PassClock {
    /// Records that a pass of `tokens` tokens took `seconds`.
    pub(super) fn record(&mut self, tokens: usize, seconds: f64) {
        if tokens == 0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let n = tokens as f64;
        self.weight = self.weight * DECAY + 1.0;
        self.tokens = self.tokens * DECAY + n;
        self.seconds = self.seconds * DECAY + seconds;
        self.tokens_sq = self.tokens_sq * DECAY + n * n;
        self.tokens_seconds = self.tokens_seconds * DECAY + n * seconds;
    }

    /// `(fixed, per_token)` seconds, once a pass has been measured.
    fn model(&self) -> Option<(f64, f64)> {
        if self.weight == 0.0 {
            return None;
        }
        let (mean_n, mean_t) = (self.tokens / self.weight, self.seconds / self.weight);
        let var_n = self.tokens_sq / self.weight - mean_n * mean_n;
        let cov = self.tokens_seconds / self.weight - mean_n * mean_t;
        // Passes of (nearly) one size, or noise that makes more tokens look cheaper: charge
        // the whole time to the tokens, which errs towards shorter passes.
        if var_n < 1.0 || cov <= 0.0 {
            return Some((0.0, mean_t / mean_n));
        }
        let per_token = cov / var_n;
        let fixed = (mean_t - per_token * mean_n).clamp(0.0, mean_t);
        Some((fixed, per_token))
    }

    /// What a pass of `tokens` tokens costs, once a pass has been measured.
    pub(super) fn seconds_for(&self, tokens: usize) -> Option<f64> {
        let (fixed, per_token) = self.model()?;
        Some(fixed + per_token * tokens as f64)
    }

    /// Most tokens a pass can hold and still end within `target` seconds (0 when even an
    /// empty pass takes longer); `None` until a pass has been measured.
    pub(super) fn tokens_within(&self, target: f64) -> Option<usize> {
        let (fixed, per_token) = self.model()?;
        if per_token <= 0.0 {
            return Some(usize::MAX);
        }
        // The epsilon keeps an exact fit from losing a token to rounding.
        Some(((target - fixed) / per_token + 1e-9).max(0.0).floor() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_known_before_a_pass() {
        assert_eq!(PassClock::default().tokens_within(0.25), None);
    }

    #[test]
    fn a_fixed_cost_and_a_cost_per_token_are_told_apart() {
        let mut clock = PassClock::default();
        // 40 ms a pass plus 5 ms a token.
        for n in [8, 128, 16, 64, 100, 4, 32] {
            clock.record(n, 0.040 + 0.005 * n as f64);
        }
        let (fixed, per_token) = clock.model().unwrap();
        assert!((fixed - 0.040).abs() < 1e-9, "{fixed}");
        assert!((per_token - 0.005).abs() < 1e-9, "{per_token}");
        // (250 - 40) / 5 = 42 tokens.
        assert_eq!(clock.tokens_within(0.25), Some(42));
        // Not even an empty pass fits in 30 ms.
        assert_eq!(clock.tokens_within(0.030), Some(0));
    }

    #[test]
    fn twice_a_one_token_pass_holds_few_tokens_where_tokens_cost_and_many_where_passes_do() {
        let auto = |fixed: f64, per_token: f64| {
            let mut clock = PassClock::default();
            for n in [1, 3, 16, 2, 64, 1] {
                clock.record(n, fixed + per_token * n as f64);
            }
            let target = crate::config::AUTO_PASS_MULTIPLE * clock.seconds_for(1).unwrap();
            clock.tokens_within(target).unwrap()
        };
        // A CPU running the model alone: 5 ms a pass, 10 ms a token.
        assert_eq!(auto(0.005, 0.010), 2);
        // A GPU, or shared cores: 40 ms a pass, half a millisecond a token.
        assert_eq!(auto(0.040, 0.0005), 82);
    }

    #[test]
    fn passes_of_one_size_charge_everything_to_the_tokens() {
        let mut clock = PassClock::default();
        for _ in 0..5 {
            clock.record(128, 1.28);
        }
        assert_eq!(clock.tokens_within(0.25), Some(25));
    }

    #[test]
    fn the_model_follows_a_change_in_load() {
        let mut clock = PassClock::default();
        for n in [16, 128, 64, 32] {
            clock.record(n, 0.001 * n as f64);
        }
        assert_eq!(clock.tokens_within(0.25), Some(250));
        // The machine gets four times slower (other processes took the cores).
        for _ in 0..10 {
            for n in [16, 128, 64, 32] {
                clock.record(n, 0.004 * n as f64);
            }
        }
        let tokens = clock.tokens_within(0.25).unwrap();
        assert!((62..=90).contains(&tokens), "{tokens}");
    }

    #[test]
    fn noise_that_makes_more_tokens_look_cheaper_is_not_believed() {
        let mut clock = PassClock::default();
        clock.record(10, 0.5);
        clock.record(100, 0.4);
        // Weighted means (the older pass counts 0.95): 0.449 s over 56.2 tokens, 8.0 ms a token.
        assert_eq!(clock.tokens_within(0.25), Some(31));
    }

    #[test]
    fn unusable_measurements_are_ignored() {
        let mut clock = PassClock::default();
        clock.record(0, 1.0);
        clock.record(10, f64::NAN);
        clock.record(10, -1.0);
        assert_eq!(clock.tokens_within(0.25), None);
    }
}
