//! What one turn measures, how the process's memory is read, and the statistics of a column.

use crate::generate::ReuseStats;
use crate::kv::Strategy;
use serde::{Deserialize, Serialize};

/// Everything measured for one (scenario, strategy, turn): one row of `turns.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub scenario: String,
    pub strategy: Strategy,
    /// 1-based.
    pub turn: usize,
    /// The generate call returned without error.
    pub success: bool,
    /// The error of a failed turn; empty on success.
    pub error: String,
    /// Prompt tokens: the whole history, re-templated.
    pub input_tokens: usize,
    /// Tokens generated.
    pub output_tokens: usize,
    /// Tokens the decoded answer re-encodes to on its own: what it adds to the next turn's prompt.
    pub answer_reencoded_tokens: usize,
    /// Wall time of the generate call (the study's "time").
    pub total_seconds: f64,
    /// Time to first token: the prompt's forward pass.
    pub prefill_seconds: f64,
    /// The remaining `output_tokens - 1` tokens.
    pub decode_seconds: f64,
    /// `(output_tokens - 1) / decode_seconds`.
    pub decode_tokens_per_second: f64,
    /// `output_tokens / total_seconds`, the study's tokens/s.
    pub tokens_per_second: f64,
    /// Largest KV bytes the strategy held at once during the call.
    pub kv_reserved_bytes: u64,
    /// KV bytes holding written positions when the call ended (0 for `none`, which keeps nothing).
    pub kv_live_bytes: u64,
    /// Of `kv_live_bytes`' sequence, chunks other sequences held too when the call ended.
    pub kv_shared_bytes: u64,
    /// KV chunk allocations made during the call (a static run counts one).
    pub kv_allocations: u64,
    /// The KV pool when the call ended: its arena, the chunks sequences hold, and the cached
    /// chunks no sequence holds (kept for reuse).
    pub kv_pool_capacity_bytes: u64,
    pub kv_pool_reserved_bytes: u64,
    pub kv_pool_cached_idle_bytes: u64,
    /// `+reuse` strategies: what of the prompt was reused, and why the rest was not.
    pub reuse: Option<ReuseStats>,
    /// Peak resident memory of the process during the call (Linux VmHWM, reset before the call).
    pub process_peak_bytes: Option<u64>,
    /// Peak memory of the accelerator during the call, when the backend reports one.
    pub device_peak_bytes: Option<u64>,
    /// The study's "memory": resident bytes after the call minus before it.
    pub study_memory_delta_bytes: Option<i64>,
    pub stopped_on_eos: bool,
    /// Whether the generated ids equal those of the run's first strategy for the same turn;
    /// `None` when that strategy's turn failed (or this one did).
    pub agrees_with_first_strategy: Option<bool>,
}

impl TurnRecord {
    /// A record with nothing measured yet (and not successful).
    pub fn unmeasured(scenario: &str, strategy: Strategy, turn: usize) -> TurnRecord {
        TurnRecord {
            scenario: scenario.to_string(),
            strategy,
            turn,
            success: false,
            error: String::new(),
            input_tokens: 0,
            output_tokens: 0,
            answer_reencoded_tokens: 0,
            total_seconds: 0.0,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            decode_tokens_per_second: 0.0,
            tokens_per_second: 0.0,
            kv_reserved_bytes: 0,
            kv_live_bytes: 0,
            kv_shared_bytes: 0,
            kv_allocations: 0,
            kv_pool_capacity_bytes: 0,
            kv_pool_reserved_bytes: 0,
            kv_pool_cached_idle_bytes: 0,
            reuse: None,
            process_peak_bytes: None,
            device_peak_bytes: None,
            study_memory_delta_bytes: None,
            stopped_on_eos: false,
            agrees_with_first_strategy: None,
        }
    }
}

/// The process's resident memory, from `/proc/self/status` (Linux); `None` elsewhere.
pub mod process_memory {
    /// Current resident set size (VmRSS).
    pub fn resident_bytes() -> Option<u64> {
        status_kib("VmRSS:").map(|kib| kib * 1024)
    }

    /// Peak resident set size since start or since the last [`reset_peak`] (VmHWM).
    pub fn peak_bytes() -> Option<u64> {
        status_kib("VmHWM:").map(|kib| kib * 1024)
    }

    /// Resets the peak to the current resident size (writing 5 to /proc/self/clear_refs).
    /// False when the system cannot, in which case [`peak_bytes`] is the peak since start.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    fn status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line[field.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }
}

/// Nearest-rank percentile of ascending `sorted` values (not empty): the smallest value with at
/// least a fraction `q` of the values at or below it.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Mean, median and 95th percentile of a column.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    /// Nearest-rank: the smallest value with at least 95% of the values at or below it.
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for no values; NaN values are left out.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Distribution> {
        let mut sorted: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };

        Some(Distribution {
            count: n,
            mean: sorted.iter().sum::<f64>() / n as f64,
            median,
            p95: percentile(&sorted, 0.95),
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_of_known_values() {
        let d = Distribution::of((1..=20).map(f64::from)).unwrap();
        assert_eq!(d.count, 20);
        assert_eq!(d.mean, 10.5);
        assert_eq!(d.median, 10.5);
        assert_eq!(d.p95, 19.0);
        assert_eq!((d.min, d.max), (1.0, 20.0));
        let odd = Distribution::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.p95), (2.0, 3.0));
        assert!(Distribution::of([]).is_none());
        assert_eq!(Distribution::of([f64::NAN, 4.0]).unwrap().count, 1);
    }

    #[test]
    fn process_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = process_memory::resident_bytes().expect("VmRSS on Linux");
            let peak = process_memory::peak_bytes().expect("VmHWM on Linux");
            assert!(rss > 0 && peak >= rss / 2, "rss {rss}, peak {peak}");
        }
    }
}
