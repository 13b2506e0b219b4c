//! Model: config, weights, tokenizer, forward pass.
