//! Many conversations at once: a continuous-batching [`scheduler`] over one KV pool, and what
//! `kvlab serve-bench` needs to measure it: the [`workload`] (scenario copies or a multi-turn
//! trace), the [`runner`] that replays it at a load, and its [`report`] and [`plots`].
pub mod plots;
pub mod report;
pub mod runner;
pub mod scheduler;
pub mod workload;
