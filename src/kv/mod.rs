//! KV memory, device-neutral: layouts, the chunk pool every sequence draws from, block tables,
//! the prefix index and the step view that the backends' `rope`, `kv_append` and `attention`
//! read. Nothing here knows a backend: a backend allocates the pool's arena
//! (`Backend::alloc_kv_memory`) and this module decides which chunk of it holds what.
//!
//! - [`KvLayout`]: the geometry of the arena (kind, element type, shape, positions per chunk),
//!   mirrored field for field by `kernels/kv_layout.cuh`.
//! - [`ChunkPool`]: chunk ids into the arena, a free list, reference counts, the sequences and
//!   their block tables, and the accounting (reserved, live, shared, cached but idle).
//! - [`StepView`]: the rows of one forward step, their positions, slots and sequences, and the
//!   block tables (and, once they evict, slot maps) of those sequences, in the form the CPU code
//!   and the kernels read.
//! - [`EvictionPolicy`]: which positions a sequence keeps under a token budget (StreamingLLM's
//!   sinks and window, H2O's heavy hitters), applied by the pool after each step.
//!
//! The **static** strategy gives a sequence one contiguous run of the arena, reserved up front
//! for its whole capacity; the **dynamic** strategy takes fixed-size chunks on demand, found
//! through a block table (vLLM's paged layout); `none` builds a transient contiguous sequence
//! for each forward pass. The `+reuse` strategies keep a conversation's sequence between calls
//! and, in the chunked layout, share full chunks between sequences through a prefix index.

mod layout;
pub mod map;
mod policy;
mod pool;
mod prefix;
pub mod quant;
mod step;

pub use layout::{KvDtype, KvLayout, KvPart, LayoutKind};
pub use policy::EvictionPolicy;
pub use pool::{ChunkCopy, ChunkPool, PoolExhausted, PoolStats, PrefixMatch, SeqId, SeqStats};
pub use prefix::ChainKey;
pub use step::{RowOffsets, SeqStep, StepView, EMPTY_SLOT};

use serde::{Deserialize, Serialize};

/// Bytes in a MiB, for the reports of KV memory.
pub const MIB: f64 = (1u64 << 20) as f64;

/// What the forward pass keeps between tokens, and whether it keeps it between calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum Strategy {
    /// No cache: every new token reruns the forward pass over the whole sequence.
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    /// One contiguous buffer preallocated to a maximum context.
    #[serde(rename = "static")]
    #[value(name = "static")]
    Static,
    /// Fixed-size chunks allocated on demand, found through a block table.
    #[serde(rename = "dynamic")]
    #[value(name = "dynamic")]
    Dynamic,
    /// `dynamic`, with the conversation's cache kept across turns and full chunks shared
    /// between sequences through the prefix index.
    #[serde(rename = "dynamic+reuse")]
    #[value(name = "dynamic+reuse")]
    DynamicReuse,
    /// `static`, with the conversation's contiguous buffer kept across turns.
    #[serde(rename = "static+reuse")]
    #[value(name = "static+reuse")]
    StaticReuse,
}

impl Strategy {
    /// The study's three.
    pub const ALL: [Strategy; 3] = [Strategy::None, Strategy::Dynamic, Strategy::Static];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Static => "static",
            Strategy::Dynamic => "dynamic",
            Strategy::DynamicReuse => "dynamic+reuse",
            Strategy::StaticReuse => "static+reuse",
        }
    }

    /// The layout of the strategy's sequences.
    pub fn layout_kind(self) -> LayoutKind {
        match self {
            Strategy::Dynamic | Strategy::DynamicReuse => LayoutKind::Chunked,
            Strategy::None | Strategy::Static | Strategy::StaticReuse => LayoutKind::Contiguous,
        }
    }

    /// Whether a conversation's cache is kept between calls.
    pub fn reuses(self) -> bool {
        matches!(self, Strategy::DynamicReuse | Strategy::StaticReuse)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        [
            Strategy::None,
            Strategy::Static,
            Strategy::Dynamic,
            Strategy::DynamicReuse,
            Strategy::StaticReuse,
        ]
        .into_iter()
        .find(|strategy| strategy.name() == s)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown cache strategy {s:?} (expected none, static, dynamic, dynamic+reuse or \
                 static+reuse)"
            )
        })
    }
}
