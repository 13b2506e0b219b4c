//! CUDA backend: real GPU through cudarc, or the CPU emulator of CUDA semantics.
