//! Many conversations at once: a continuous-batching [`scheduler`] over one KV pool, and the
//! `kvlab serve-bench` workload runner that measures it.
pub mod scheduler;
