//! Eviction policies: which positions a sequence keeps under a token budget.
//!
//! A policy is applied after every step (the prefill, then each decode token): the step's rows
//! attend to what the sequence kept and to each other, then the positions the policy no longer
//! names are evicted, so between steps a sequence holds at most [`EvictionPolicy::kept_tokens`]
//! positions (during a step, that plus the step's rows).
//!
//! - `window:N` keeps the N most recent positions.
//! - `sinks:S,window:N` (StreamingLLM) keeps the first S positions of the sequence, the attention
//!   sinks, and the N most recent.
//! - `h2o:heavy=H,recent=R` (H2O) keeps the R most recent positions and, of the older ones, the H
//!   that have received the most attention: the probability mass attention gave each position,
//!   summed over every step since it was written, every layer, query head and query row. Ties go
//!   to the more recent position.
//!
//! Kept positions keep their original RoPE positions (their keys were rotated when written and
//! are not rotated again), as in H2O; StreamingLLM instead renumbers the kept positions
//! contiguously, which needs keys stored before RoPE. A new token's position is its position in
//! the whole sequence, evicted positions included.

use anyhow::{bail, Context, Result};

/// What a sequence keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EvictionPolicy {
    /// Every position.
    #[default]
    Full,
    Window {
        window: usize,
    },
    Sinks {
        sinks: usize,
        window: usize,
    },
    H2o {
        heavy: usize,
        recent: usize,
    },
}

/// The forms `--kv-policy` takes.
const SYNTAX: &str = "full, window:N, sinks:S,window:N or h2o:heavy=H,recent=R";

impl EvictionPolicy {
    /// Positions kept between steps; None keeps all.
    pub fn kept_tokens(&self) -> Option<usize> {
        match *self {
            EvictionPolicy::Full => None,
            EvictionPolicy::Window { window } => Some(window),
            EvictionPolicy::Sinks { sinks, window } => Some(sinks + window),
            EvictionPolicy::H2o { heavy, recent } => Some(heavy + recent),
        }
    }

    /// Whether the policy ranks positions by the attention they receive.
    pub fn needs_attention_mass(&self) -> bool {
        matches!(self, EvictionPolicy::H2o { .. })
    }

    /// The positions to evict from `live`: the sequence's held positions in increasing order
    /// with the attention mass each has received (read by H2O only).
    pub fn evictions(&self, live: &[(u32, f32)]) -> Vec<u32> {
        let Some(kept) = self.kept_tokens() else {
            return Vec::new();
        };
        if live.len() <= kept {
            return Vec::new();
        }
        let mut keep = vec![false; live.len()];
        let recent = |keep: &mut [bool], n: usize| {
            let from = keep.len().saturating_sub(n);
            keep[from..].fill(true);
        };
        match *self {
            EvictionPolicy::Full => unreachable!("kept_tokens is None"),
            EvictionPolicy::Window { window } => recent(&mut keep, window),
            EvictionPolicy::Sinks { sinks, window } => {
                recent(&mut keep, window);
                for (k, &(pos, _)) in keep.iter_mut().zip(live) {
                    *k |= (pos as usize) < sinks;
                }
            }
            EvictionPolicy::H2o { heavy, recent: r } => {
                recent(&mut keep, r);
                let older = live.len().saturating_sub(r);
                let mut ranked: Vec<usize> = (0..older).collect();
                // Most mass first; of equal mass, the more recent first.
                ranked.sort_by(|&a, &b| live[b].1.total_cmp(&live[a].1).then(b.cmp(&a)));
                for &i in ranked.iter().take(heavy) {
                    keep[i] = true;
                }
            }
        }
        live.iter()
            .zip(keep)
            .filter(|(_, k)| !k)
            .map(|(&(pos, _), _)| pos)
            .collect()
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            EvictionPolicy::Full => write!(f, "full"),
            EvictionPolicy::Window { window } => write!(f, "window:{window}"),
            EvictionPolicy::Sinks { sinks, window } => write!(f, "sinks:{sinks},window:{window}"),
            EvictionPolicy::H2o { heavy, recent } => write!(f, "h2o:heavy={heavy},recent={recent}"),
        }
    }
}

impl std::str::FromStr for EvictionPolicy {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let t = text.trim();
        let count = |value: &str, what: &str| -> Result<usize> {
            value.trim().parse::<usize>().with_context(|| {
                format!("--kv-policy {t:?}: {what} {value:?} is not a number of tokens")
            })
        };
        let policy = if t == "full" {
            EvictionPolicy::Full
        } else if let Some(n) = t.strip_prefix("window:") {
            EvictionPolicy::Window {
                window: count(n, "window")?,
            }
        } else if let Some(rest) = t.strip_prefix("sinks:") {
            let (sinks, window) = rest
                .split_once(",window:")
                .with_context(|| format!("--kv-policy {t:?}: expected sinks:S,window:N"))?;
            EvictionPolicy::Sinks {
                sinks: count(sinks, "sinks")?,
                window: count(window, "window")?,
            }
        } else if let Some(rest) = t.strip_prefix("h2o:") {
            let (heavy, recent) = rest
                .strip_prefix("heavy=")
                .and_then(|r| r.split_once(",recent="))
                .with_context(|| format!("--kv-policy {t:?}: expected h2o:heavy=H,recent=R"))?;
            EvictionPolicy::H2o {
                heavy: count(heavy, "heavy")?,
                recent: count(recent, "recent")?,
            }
        } else {
            bail!("unknown --kv-policy {t:?} (expected {SYNTAX})");
        };
        // The newest position must be kept: the next token attends to it.
        let newest = match policy {
            EvictionPolicy::Full => 1,
            EvictionPolicy::Window { window } | EvictionPolicy::Sinks { window, .. } => window,
            EvictionPolicy::H2o { recent, .. } => recent,
        };
        if newest == 0 {
            bail!(
                "--kv-policy {t:?} keeps no recent position (the window or recent count is 0); \
                 the newest token must stay in the cache"
            );
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(
        positions: impl IntoIterator<Item = u32>,
        mass: impl Fn(u32) -> f32,
    ) -> Vec<(u32, f32)> {
        positions.into_iter().map(|p| (p, mass(p))).collect()
    }

    fn kept(policy: &str, live: &[(u32, f32)]) -> Vec<u32> {
        let evicted = policy.parse::<EvictionPolicy>().unwrap().evictions(live);
        live.iter()
            .map(|&(p, _)| p)
            .filter(|p| !evicted.contains(p))
            .collect()
    }

    #[test]
    fn each_policy_keeps_exactly_the_positions_it_names() {
        let twelve = live(0..12, |_| 0.0);
        assert_eq!(kept("full", &twelve), (0..12).collect::<Vec<_>>());
        assert_eq!(kept("window:5", &twelve), vec![7, 8, 9, 10, 11]);
        assert_eq!(kept("window:12", &twelve), (0..12).collect::<Vec<_>>());
        assert_eq!(kept("sinks:2,window:3", &twelve), vec![0, 1, 9, 10, 11]);
        // Positions already evicted stay out; the sinks are positions, not the first held.
        let holes = live([0, 3, 4, 8, 9, 10, 11], |_| 0.0);
        assert_eq!(kept("sinks:2,window:3", &holes), vec![0, 9, 10, 11]);
        // H2O: the 2 most recent, then the 3 heaviest of the rest; a tie goes to the newer.
        let mass =
            |p: u32| [5.0, 0.1, 0.1, 9.0, 0.2, 0.1, 3.0, 0.0, 0.2, 1.0, 0.0, 0.0][p as usize];
        let weighed = live(0..12, mass);
        assert_eq!(
            kept("h2o:heavy=3,recent=2", &weighed),
            vec![0, 3, 6, 10, 11]
        );
        assert_eq!(
            kept("h2o:heavy=5,recent=2", &weighed),
            vec![0, 3, 6, 8, 9, 10, 11]
        );
        assert_eq!(kept("h2o:heavy=0,recent=4", &weighed), vec![8, 9, 10, 11]);
        // Under the budget, nothing goes.
        assert!("h2o:heavy=8,recent=4"
            .parse::<EvictionPolicy>()
            .unwrap()
            .evictions(&weighed)
            .is_empty());
    }

    #[test]
    fn policies_parse_print_and_refuse_what_they_cannot_mean() {
        for text in [
            "full",
            "window:64",
            "sinks:4,window:60",
            "h2o:heavy=32,recent=32",
        ] {
            let policy: EvictionPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(
            "sinks:4,window:60"
                .parse::<EvictionPolicy>()
                .unwrap()
                .kept_tokens(),
            Some(64)
        );
        for (bad, says) in [
            ("lru", "unknown --kv-policy \"lru\""),
            ("window:", "window \"\" is not a number"),
            ("window:-3", "window \"-3\" is not a number"),
            ("sinks:4", "expected sinks:S,window:N"),
            ("h2o:recent=3", "expected h2o:heavy=H,recent=R"),
            ("window:0", "keeps no recent position"),
            ("h2o:heavy=8,recent=0", "keeps no recent position"),
        ] {
            let err = bad.parse::<EvictionPolicy>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
