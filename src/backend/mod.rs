//! Backends: one trait, a CPU implementation and a CUDA implementation.
