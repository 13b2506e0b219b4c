//! The napkin math of every op: the bytes one call must move between memory and the cores, and
//! the floating-point operations it must do. Benches report these as criterion throughput and
//! the roofline report divides them by measured times, so both read the same numbers.
//!
//! Bytes count each operand once at its stored size (a lower bound: what a perfect cache would
//! still have to stream); FLOPs count a multiply-add as 2.

use crate::kv::KvDtype;
use crate::model::config::Config;

/// What one call of an op costs at least.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct OpCost {
    pub bytes: f64,
    pub flops: f64,
}

impl OpCost {
    /// FLOPs per byte: below the machine's ridge point (peak FLOP/s ÷ bandwidth) an op is
    /// bound by memory, above it by compute.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }
}

impl std::ops::Add for OpCost {
    type Output = OpCost;
    fn add(self, other: OpCost) -> OpCost {
        OpCost {
            bytes: self.bytes + other.bytes,
            flops: self.flops + other.flops,
        }
    }
}

impl std::ops::Mul<f64> for OpCost {
    type Output = OpCost;
    fn mul(self, times: f64) -> OpCost {
        OpCost {
            bytes: self.bytes * times,
            flops: self.flops * times,
        }
    }
}

const F32: f64 = 4.0;

/// out[m, n] = x[m, k] · Wᵀ with W `[n, k]` of `weight_elem_bytes` per element:
/// W once + x + out; 2·m·n·k FLOPs.
pub fn matmul(m: usize, n: usize, k: usize, weight_elem_bytes: usize) -> OpCost {
    let (m, n, k) = (m as f64, n as f64, k as f64);
    OpCost {
        bytes: n * k * weight_elem_bytes as f64 + (m * k + m * n) * F32,
        flops: 2.0 * m * n * k,
    }
}

/// out = rmsnorm(x) · weight over `[rows, dim]`: read x, write out, read the weight; per element
/// a square-add and two muls.
pub fn rms_norm(rows: usize, dim: usize) -> OpCost {
    let (rows, dim) = (rows as f64, dim as f64);
    OpCost {
        bytes: 2.0 * rows * dim * F32 + dim * F32,
        flops: 4.0 * rows * dim,
    }
}

/// RoPE on q `[rows, q_dim]` and k `[rows, kv_dim]` in place: read and write both; per pair of
/// elements 4 muls and 2 adds.
pub fn rope(rows: usize, q_dim: usize, kv_dim: usize) -> OpCost {
    let elems = (rows * (q_dim + kv_dim)) as f64;
    OpCost {
        bytes: 2.0 * elems * F32,
        flops: 3.0 * elems,
    }
}

/// Copy of the step's k and v `[rows, kv_dim]` into the cache (`kv_elem_bytes` per entry).
pub fn kv_append(cfg: &Config, rows: usize, kv: KvDtype) -> OpCost {
    let heads = (rows * cfg.num_kv_heads) as f64;
    OpCost {
        bytes: heads * (2.0 * cfg.head_dim as f64 * F32 + kv.row_pair_bytes(cfg.head_dim) as f64),
        flops: 0.0,
    }
}

/// gate = silu(gate) · up over `[rows, intermediate]`: read gate and up, write gate; per element
/// a negation, an exp, an add, a division and a mul (the exp counted as one).
pub fn swiglu(rows: usize, intermediate: usize) -> OpCost {
    let elems = (rows * intermediate) as f64;
    OpCost {
        bytes: 3.0 * elems * F32,
        flops: 5.0 * elems,
    }
}

/// Causal attention of `rows` queries at positions `start..start + rows` over one layer of the
/// cache: every visible K and V row once (its codes and, quantized, its scale), q and out once;
/// per (query head, visible position) a dot product and an axpy of `head_dim` (4·head_dim
/// FLOPs).
pub fn attention(cfg: &Config, start: usize, rows: usize, kv: KvDtype) -> OpCost {
    let hd = cfg.head_dim as f64;
    let visible = (start + rows) as f64;
    // Σ over rows of the positions each one sees: (start + 1) + ... + (start + rows).
    let pairs = rows as f64 * start as f64 + (rows * (rows + 1) / 2) as f64;
    OpCost {
        bytes: visible * cfg.num_kv_heads as f64 * kv.row_pair_bytes(cfg.head_dim) as f64
            + 2.0 * rows as f64 * cfg.q_dim() as f64 * F32,
        flops: 4.0 * cfg.num_heads as f64 * hd * pairs,
    }
}

/// One decode step (one token at position `context - 1`): every weight the step reads
/// (`weight_bytes`, from `ModelWeights::bytes_read_per_token`) and every cached K/V row; FLOPs of
/// the matmuls (2 per parameter) and the attention. Norms, RoPE and the rest are noise beside.
pub fn decode_step(cfg: &Config, weight_bytes: usize, context: usize, kv: KvDtype) -> OpCost {
    let attention = attention(cfg, context.max(1) - 1, 1, kv) * cfg.num_layers as f64;
    let embedding = cfg.vocab_size * cfg.hidden_size;
    // Every parameter but the embedding table is a matmul weight; a tied lm_head is the table.
    let matmul_params = cfg.num_parameters() - embedding
        + if cfg.tie_word_embeddings {
            embedding
        } else {
            0
        };
    OpCost {
        bytes: weight_bytes as f64 + attention.bytes,
        flops: 2.0 * matmul_params as f64 + attention.flops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roofline::fixture::llama_3_2_1b;

    #[test]
    fn attention_counts_every_visible_pair() {
        let cfg = llama_3_2_1b().unwrap();
        for (start, rows) in [(0, 1), (0, 7), (300, 1), (300, 37)] {
            let pairs: usize = (0..rows).map(|r| start + r + 1).sum();
            let c = attention(&cfg, start, rows, KvDtype::Bf16);
            assert_eq!(c.flops, (4 * 32 * 64 * pairs) as f64);
            // K and V of every visible position, 8 heads of 64 bf16 values; q and out in f32.
            let kv = 2 * (start + rows) * 8 * 64 * 2;
            assert_eq!(c.bytes, (kv + 2 * rows * 2048 * 4) as f64);
            // int8: a byte a value, 4 f32 scales a key row and 1 a value row.
            let int8 = attention(&cfg, start, rows, KvDtype::Int8);
            let kv = (start + rows) * 8 * (64 + 16 + 64 + 4);
            assert_eq!(int8.bytes, (kv + 2 * rows * 2048 * 4) as f64);
        }
    }

    #[test]
    fn decode_step_of_llama_3_2_1b_reads_its_weights_and_cache() {
        let cfg = llama_3_2_1b().unwrap();
        // 1.236 B parameters with the tied embedding counted once, as the lm_head.
        let c = decode_step(&cfg, 2_471_000_000, 2048, KvDtype::F32);
        let kv = 2048.0 * 16.0 * 2.0 * 512.0 * 4.0;
        assert_eq!(c.bytes, 2_471_000_000.0 + kv + 16.0 * 2.0 * 2048.0 * 4.0);
        let matmul_flops = c.flops - 16.0 * 4.0 * 32.0 * 64.0 * 2048.0;
        assert!(
            (matmul_flops / 2.0 - 1.2358e9).abs() < 1e6,
            "{matmul_flops}"
        );
    }

    #[test]
    fn matmul_reads_the_weight_once() {
        let c = matmul(16, 8192, 2048, 2);
        assert_eq!(
            c.bytes,
            (8192 * 2048 * 2 + 16 * 2048 * 4 + 16 * 8192 * 4) as f64
        );
        assert_eq!(c.flops, 2.0 * 16.0 * 8192.0 * 2048.0);
        assert!(matmul(1, 2048, 2048, 2).intensity() < 1.0);
    }
}
