//! Backends: one trait, a CPU implementation and a CUDA implementation.
pub mod cpu;
pub mod cuda;
