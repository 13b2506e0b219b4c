//! Device memory of the CUDA backend: every allocation counted under what it holds.

use super::device::{Device, DeviceBuffer};
use anyhow::Result;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What an allocation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryUse {
    Weights,
    Activations,
    /// KV pools' arenas, and the step views their kernels read.
    KvCache,
    /// Per-step scratch: token ids, decode-attention partials, argmax partials.
    Scratch,
}

const USES: usize = 4;

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
}

impl Drop for TrackedBuffer {
    fn drop(&mut self) {
        self.ledger.sub(self.what, self.buffer.len());
    }
}

/// Device memory as the CUDA backend sees it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MemoryReport {
    pub weights_bytes: u64,
    pub activation_bytes: u64,
    pub kv_cache_bytes: u64,
    pub scratch_bytes: u64,
    /// Everything kvlab allocated on the device, by the device's count.
    pub allocated_bytes: u64,
    /// Free and total device memory (None on the emulator).
    pub device_free_bytes: Option<u64>,
    pub device_total_bytes: Option<u64>,
}
