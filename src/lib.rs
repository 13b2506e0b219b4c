//! kvlab: a laboratory for the KV cache of LLM inference.
//!
//! - [`model`]: config, weights, tokenizer and the one forward pass (written against [`backend::Backend`]).
//! - [`kv`]: the KV cache layouts (static = one contiguous buffer, dynamic = chunks + chunk table) and their accounting.
//! - [`backend`]: the CPU backend and the CUDA backend (real GPU or the CPU emulator of CUDA semantics).
//! - [`generate`]: prefill + greedy decode loop, timing, outside the model.
//! - [`scenario`]: the study runner.
//! - [`serve`]: many conversations at once: the continuous-batching scheduler and `serve-bench`.
//! - [`eval`]: `kvlab kv-eval`, what smaller caches (int8/fp8 KV, eviction policies) change in a model's output.
//! - [`selftest`]: the CUDA backend's checks on whichever device runs them (`kvlab selftest`).
pub mod backend;
pub mod eval;
pub mod generate;
pub mod kv;
pub mod model;
pub mod npy;
pub mod roofline;
pub mod runtime;
pub mod scenario;
pub mod selftest;
pub mod serve;
