//! One sequence's KV cache: its chunks, its chunk table, its length and its accounting.

use super::{KvLayout, Strategy};
use crate::backend::Backend;
use crate::model::config::Config;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How a cache is sized.
#[derive(Clone, Copy, Debug)]
pub struct CacheOptions {
    /// Static: capacity in positions (the preallocated maximum context).
    pub max_context: usize,
    /// Dynamic: positions per chunk.
    pub chunk_tokens: usize,
}

/// Exact memory accounting of one cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStats {
    /// Bytes held by the cache's chunks now.
    pub reserved_bytes: u64,
    /// Bytes of those that hold written positions.
    pub live_bytes: u64,
    /// Chunk allocations made over the cache's life.
    pub allocations: u64,
    /// Largest `reserved_bytes` seen.
    pub peak_reserved_bytes: u64,
    /// Positions written.
    pub tokens: u64,
    /// Chunks held now.
    pub chunks: u64,
}

impl KvStats {
    /// Accounting of a strategy made of several caches over time (the no-cache strategy builds a
    /// transient one per forward pass): allocations add up, peaks take the maximum.
    pub fn absorb(&mut self, other: &KvStats) {
        self.allocations += other.allocations;
        self.peak_reserved_bytes = self.peak_reserved_bytes.max(other.peak_reserved_bytes);
    }
}

/// The KV memory of one sequence, in the layout of `layout`.
///
/// The forward pass calls [`KvCache::begin_step`] with the rows it is about to write, then for
/// each layer the backend writes K/V (`kv_append`) and reads them (`attention`) through the
/// layout, then [`KvCache::end_step`] makes the rows part of the sequence.
pub struct KvCache<B: Backend> {
    pub strategy: Strategy,
    pub layout: KvLayout,
    chunks: Vec<B::KvChunk>,
    /// The backend's copy of the chunk table and step positions (a device array on CUDA).
    table: B::KvTable,
    /// Chunks the table can hold: the cache's capacity is `max_chunks * chunk_tokens` positions.
    max_chunks: usize,
    len: usize,
    step_rows: usize,
    stats: KvStats,
    elem_bytes: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache for `strategy`. Static reserves its whole capacity now; dynamic reserves nothing
    /// until positions arrive. The no-cache strategy uses a static cache sized to one forward pass.
    pub fn new(backend: &B, strategy: Strategy, cfg: &Config, opts: CacheOptions) -> Result<Self> {
        let max_positions = cfg.max_position_embeddings;
        let (chunk_tokens, max_chunks) = match strategy {
            Strategy::Static | Strategy::None => {
                if opts.max_context == 0 {
                    bail!("a static cache needs a capacity of at least one position");
                }
                if opts.max_context > max_positions {
                    bail!(
                        "max context {} exceeds the model's max_position_embeddings {max_positions}",
                        opts.max_context
                    );
                }
                (opts.max_context, 1)
            }
            Strategy::Dynamic => {
                if opts.chunk_tokens == 0 {
                    bail!("--chunk-tokens must be at least 1");
                }
                (
                    opts.chunk_tokens,
                    max_positions.div_ceil(opts.chunk_tokens).max(1),
                )
            }
        };
        let layout = KvLayout {
            num_layers: cfg.num_layers as u32,
            num_kv_heads: cfg.num_kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            chunk_tokens: u32::try_from(chunk_tokens)
                .map_err(|_| anyhow::anyhow!("chunk of {chunk_tokens} positions is too large"))?,
        };
        let table = backend.new_kv_table(&layout, max_chunks.min(1 << 20))?;
        let mut cache = KvCache {
            strategy,
            layout,
            chunks: Vec::new(),
            table,
            max_chunks,
            len: 0,
            step_rows: 0,
            stats: KvStats::default(),
            elem_bytes: backend.kv_elem_bytes(),
        };
        if strategy != Strategy::Dynamic {
            cache.grow(backend, 1)?;
        }
        Ok(cache)
    }

    /// Positions this cache can hold in total.
    pub fn capacity(&self) -> usize {
        self.max_chunks
            .saturating_mul(self.layout.chunk_tokens as usize)
    }

    /// Positions written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position of the first row of the step in progress, and its row count.
    pub fn step(&self) -> (usize, usize) {
        (self.len, self.step_rows)
    }

    pub fn chunks(&self) -> &[B::KvChunk] {
        &self.chunks
    }

    pub fn chunks_mut(&mut self) -> &mut [B::KvChunk] {
        &mut self.chunks
    }

    pub fn table(&self) -> &B::KvTable {
        &self.table
    }

    pub fn stats(&self) -> KvStats {
        self.stats
    }

    pub fn chunk_bytes(&self) -> u64 {
        (self.layout.chunk_elems() * self.elem_bytes) as u64
    }

    /// Makes room for `rows` new positions (allocating chunks for a dynamic cache) and tells the
    /// backend where they go. Writing past a static cache's capacity is an error.
    pub fn begin_step(&mut self, backend: &B, rows: usize) -> Result<()> {
        let end = self.len + rows;
        if end > self.capacity() {
            bail!(
                "context overflow: {} positions requested, but this {} cache holds {} (raise --max-context)",
                end,
                self.strategy,
                self.capacity()
            );
        }
        let chunks_needed = end.div_ceil(self.layout.chunk_tokens as usize);
        if chunks_needed > self.chunks.len() {
            self.grow(backend, chunks_needed)?;
        }
        self.step_rows = rows;
        backend.update_kv_table(&mut self.table, &self.chunks, self.len, rows)
    }

    /// The step's rows are now part of the sequence.
    pub fn end_step(&mut self) {
        self.len += self.step_rows;
        self.step_rows = 0;
        self.stats.tokens = self.len as u64;
        self.stats.live_bytes = (self.len * self.layout.elems_per_token() * self.elem_bytes) as u64;
    }

    fn grow(&mut self, backend: &B, chunks: usize) -> Result<()> {
        while self.chunks.len() < chunks {
            self.chunks.push(backend.alloc_kv_chunk(&self.layout)?);
            self.stats.allocations += 1;
        }
        self.stats.chunks = self.chunks.len() as u64;
        self.stats.reserved_bytes = self.chunks.len() as u64 * self.chunk_bytes();
        self.stats.peak_reserved_bytes = self
            .stats
            .peak_reserved_bytes
            .max(self.stats.reserved_bytes);
        Ok(())
    }
}
