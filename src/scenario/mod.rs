//! The study runner.
