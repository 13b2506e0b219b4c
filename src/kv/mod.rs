//! KV cache layouts and accounting.
