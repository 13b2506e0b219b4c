//! How far one next-token distribution is from another: the numbers `kvlab kv-eval` adds up per
//! turn, computed in f64 from the two rows of logits.

/// One step's comparison of a candidate's logits with the reference's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepComparison {
    /// KL(reference ‖ candidate) of the softmaxes, in nats.
    pub kl_divergence: f64,
    /// The two rows have the same argmax (first index on ties, as greedy decoding picks).
    pub same_top1: bool,
    /// max over the vocabulary of |candidate − reference|.
    pub max_logit_error: f64,
    /// −log p(target) under the candidate and under the reference.
    pub candidate_nll: f64,
    pub reference_nll: f64,
    /// The reference's largest logit minus its second largest: how near a tie its choice was.
    pub reference_margin: f64,
}

/// log-softmax of a row, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}

/// Index of the largest value, the first one on ties.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Compares `candidate` with `reference` (rows of logits over the same vocabulary) at a step
/// whose next token is `target`.
pub fn compare(reference: &[f32], candidate: &[f32], target: u32) -> StepComparison {
    let (p, q) = (log_softmax(reference), log_softmax(candidate));
    let kl_divergence = p
        .iter()
        .zip(&q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        .max(0.0);
    let max_logit_error = reference
        .iter()
        .zip(candidate)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .fold(0.0, f64::max);
    StepComparison {
        kl_divergence,
        same_top1: argmax(reference) == argmax(candidate),
        max_logit_error,
        candidate_nll: -q[target as usize],
        reference_nll: -p[target as usize],
        reference_margin: margin(reference),
    }
}

/// The largest value minus the second largest (0 for fewer than two).
fn margin(row: &[f32]) -> f64 {
    let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &v in row {
        let v = v as f64;
        if v > first {
            (first, second) = (v, first);
        } else if v > second {
            second = v;
        }
    }
    if second.is_finite() {
        first - second
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_match_their_definitions() {
        let reference = [2.0f32, 1.0, 0.0, -1.0];
        // Identical rows: nothing differs.
        let same = compare(&reference, &reference, 1);
        assert_eq!((same.kl_divergence, same.max_logit_error), (0.0, 0.0));
        assert!(same.same_top1);
        assert_eq!(same.candidate_nll, same.reference_nll);
        // A constant shift leaves the distribution as it is, but not the logits.
        let shifted: Vec<f32> = reference.iter().map(|l| l + 3.0).collect();
        let c = compare(&reference, &shifted, 0);
        assert!(c.kl_divergence < 1e-12 && c.same_top1);
        assert!((c.max_logit_error - 3.0).abs() < 1e-12);
        // By hand: p = softmax(2, 1, 0, -1), q = softmax(0, 1, 0, -1).
        let candidate = [0.0f32, 1.0, 0.0, -1.0];
        let softmax = |row: &[f64]| {
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            row.iter().map(|x| x.exp() / z).collect::<Vec<f64>>()
        };
        let p = softmax(&[2.0, 1.0, 0.0, -1.0]);
        let q = softmax(&[0.0, 1.0, 0.0, -1.0]);
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        let c = compare(&reference, &candidate, 2);
        assert!(
            (c.kl_divergence - kl).abs() < 1e-12,
            "{} vs {kl}",
            c.kl_divergence
        );
        assert!(!c.same_top1, "argmax 0 against argmax 1");
        assert!((c.max_logit_error - 2.0).abs() < 1e-12);
        assert!((c.candidate_nll + q[2].ln()).abs() < 1e-12);
        assert!((c.reference_nll + p[2].ln()).abs() < 1e-12);
        assert_eq!(c.reference_margin, 1.0);
        assert_eq!(margin(&[0.5, 3.0, 3.0]), 0.0, "a tie");
        assert_eq!(margin(&[-1.0, 2.5, 0.25]), 2.25);
        // Ties go to the first index, as greedy decoding picks.
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
