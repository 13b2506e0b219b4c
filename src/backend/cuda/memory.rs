//! Device memory of the CUDA backend: every allocation counted under what it holds, and the KV
//! chunk allocator, which keeps released chunks for the next cache instead of freeing them.

use super::device::{Device, DeviceBuffer};
use anyhow::Result;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What an allocation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryUse {
    Weights,
    Activations,
    /// KV chunks handed to caches, and chunk tables.
    KvCache,
    /// Released KV chunks kept by the allocator for reuse.
    KvPool,
    /// Per-step scratch: token ids, decode-attention partials, argmax partials.
    Scratch,
}

const USES: usize = 5;

/// Bytes held now per [`MemoryUse`], shared by every buffer of one backend.
#[derive(Default)]
pub struct MemoryLedger {
    bytes: [AtomicU64; USES],
}

impl MemoryLedger {
    fn add(&self, what: MemoryUse, bytes: usize) {
        self.bytes[what as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn sub(&self, what: MemoryUse, bytes: usize) {
        self.bytes[what as usize].fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    pub fn bytes(&self, what: MemoryUse) -> u64 {
        self.bytes[what as usize].load(Ordering::Relaxed)
    }
}

/// A device buffer counted in a ledger while it lives.
pub struct TrackedBuffer {
    buffer: DeviceBuffer,
    what: MemoryUse,
    ledger: Arc<MemoryLedger>,
}

impl TrackedBuffer {
    pub fn alloc(
        device: &dyn Device,
        ledger: &Arc<MemoryLedger>,
        what: MemoryUse,
        bytes: usize,
    ) -> Result<Self> {
        // A zero-byte request still gets a distinct address, so kernel arguments stay valid.
        let buffer = device.alloc(bytes.max(16))?;
        ledger.add(what, buffer.len());
        Ok(TrackedBuffer {
            buffer,
            what,
            ledger: ledger.clone(),
        })
    }

    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buffer
    }

    pub fn ptr(&self) -> u64 {
        self.buffer.ptr()
    }

    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Moves the buffer to another use (a chunk going into or out of the pool).
    fn reassign(&mut self, what: MemoryUse) {
        self.ledger.sub(self.what, self.buffer.len());
        self.ledger.add(what, self.buffer.len());
        self.what = what;
    }
}

impl Drop for TrackedBuffer {
    fn drop(&mut self) {
        self.ledger.sub(self.what, self.buffer.len());
    }
}

/// Released KV chunks, reused by the next requests of the same size, so that a dynamic cache
/// growing during decode, or the next sequence's cache, rarely reaches the device allocator.
/// A request of another size first frees what the pool holds: the no-cache strategy's
/// transient caches grow by one position per step and would otherwise pile up.
#[derive(Default)]
pub struct ChunkPool {
    free: Mutex<Vec<TrackedBuffer>>,
}

impl ChunkPool {
    /// A chunk of exactly `bytes`: a released one if any, else a new allocation.
    pub fn take(
        &self,
        device: &dyn Device,
        ledger: &Arc<MemoryLedger>,
        bytes: usize,
    ) -> Result<TrackedBuffer> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let found = free
                .iter()
                .position(|b| b.len() == bytes.max(16))
                .map(|i| free.swap_remove(i));
            if found.is_none() {
                free.clear();
            }
            found
        };
        match reused {
            Some(mut chunk) => {
                chunk.reassign(MemoryUse::KvCache);
                Ok(chunk)
            }
            None => TrackedBuffer::alloc(device, ledger, MemoryUse::KvCache, bytes),
        }
    }

    fn give_back(&self, mut chunk: TrackedBuffer) {
        chunk.reassign(MemoryUse::KvPool);
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chunk);
    }

    /// Frees every kept chunk.
    pub fn release(&self) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A KV chunk in use by a cache; returns to its pool when dropped.
pub struct PooledChunk {
    chunk: Option<TrackedBuffer>,
    pool: Arc<ChunkPool>,
}

impl PooledChunk {
    pub fn new(chunk: TrackedBuffer, pool: Arc<ChunkPool>) -> Self {
        PooledChunk {
            chunk: Some(chunk),
            pool,
        }
    }

    pub fn ptr(&self) -> u64 {
        self.chunk.as_ref().map_or(0, |c| c.ptr())
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            self.pool.give_back(chunk);
        }
    }
}

/// Device memory as the CUDA backend sees it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MemoryReport {
    pub weights_bytes: u64,
    pub activation_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_pool_bytes: u64,
    pub scratch_bytes: u64,
    /// Everything kvlab allocated on the device, by the device's count.
    pub allocated_bytes: u64,
    /// Free and total device memory (None on the emulator).
    pub device_free_bytes: Option<u64>,
    pub device_total_bytes: Option<u64>,
}
