//! The calibration's tests (pooling runs, the combined predictor's split), on the shared
//! synthetic run; a file of their own, so that calibrate.rs does not import the fixture that
//! imports it.

use super::*;
use crate::test_support::synthetic_run;

#[test]
fn runs_pool_into_one_calibration_and_a_combined_one_is_split() {
    let runs = [synthetic_run(3), synthetic_run(4)];
    let pooled = pooled_calibration(&runs, &UncertaintyKind::default(), 0.1, 0.9).unwrap();
    assert_eq!(pooled.samples, 2 * 80 * 50);
    let q = pooled.output_quality.expect("per-output threshold");
    assert!(
        q.controlled.u_th > 0.0 && q.controlled.skip_rate > 0.5,
        "{q:?}"
    );
    assert_eq!((q.max_risk, q.confidence), (0.1, 0.9));

    let combined = combined_calibration(&runs, 0.1, 0.9).unwrap();
    // Weights from the even outputs, thresholds from the odd ones: half the tokens.
    assert_eq!(combined.samples, 80 * 50);
    assert!(combined.estimator.validate().is_ok());
    let UncertaintyKind::Combined { signals, .. } = &combined.estimator else {
        panic!("{:?}", combined.estimator)
    };
    assert_eq!(*signals, UncertaintyKind::combinable());
    let q = combined.output_quality.expect("per-output threshold");
    assert!(
        q.controlled.u_th > 0.0 && q.controlled.skip_rate > 0.5,
        "{q:?}"
    );
    // It round-trips through the file the SDK loads.
    assert_eq!(
        Calibration::from_json(&combined.to_json()).unwrap(),
        combined
    );

    let mut lacking = synthetic_run(5);
    lacking.options.estimators.pop();
    assert!(combined_calibration(&[lacking], 0.1, 0.9).is_err());
}
