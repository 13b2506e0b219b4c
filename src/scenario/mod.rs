//! The study runner: the study's five conversations run with each KV-cache strategy under the
//! study's protocol, measured per turn (prefill apart from decode, KV bytes reserved and live,
//! the process's peak, and the study's own memory delta), and written out as `turns.csv`,
//! `summary.json`, tables, plots and `report.md`.
pub mod metrics;
pub mod plots;
pub mod protocol;
pub mod report;
pub mod scenarios;
