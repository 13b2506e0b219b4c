//! The CUDA emulator as a [`Device`]: kernels/*.cu compiled for the host (build.rs), run by
//! the fiber runtime of kernels/emu/cuda_emu.cpp; device memory is host memory.
//!
//! Launches are synchronous and, like copies and memsets, serialised as on one CUDA stream.
//! Blocks of a grid run on the emulator's own thread pool (`KVLAB_EMU_THREADS`); a block never
//! leaves its OS thread, so results do not depend on the split. Fresh allocations and dynamic
//! shared memory read as 0xff bytes (NaN), so reads of never-written memory show.
//!
//! Tests under AddressSanitizer: `cargo test --release --features emu-asan --test emulator`
//! (the kvlab crate and its kernels are rebuilt instrumented; dependencies are shared).
//!
//! Checks beyond CUDA's own errors:
//! - every pointer argument must lie inside a live device buffer;
//! - in a programmatic launch ([`LaunchConfig::programmatic`]) every thread must call
//!   `grid_dependency_wait()` before it returns. Launches run one after another here, so the
//!   wait itself has nothing to wait for: where a kernel places it (before its first read of
//!   another kernel's output) only a GPU can check;
//! - each buffer has guard bytes before and after it. Without AddressSanitizer they hold a
//!   pattern that is verified after every launch for the buffers passed to it (catches
//!   out-of-bounds writes up to [`GUARD_AFTER`] bytes past the end). With the `emu-asan`
//!   feature they are poisoned and AddressSanitizer reports any access, reads included;
//! - race check ([`EmuDevice::with_options`], or `KVLAB_EMU_RACECHECK=1`): every launch runs
//!   twice, threads and blocks in forward then in reverse order, from the same memory; results
//!   that differ mean the kernel depends on thread order between barriers (a shared or global
//!   memory race). Float atomics in a different order also differ: do not race-check those.
//!
//! Stream rules of the driver, enforced for the stream [`WORK_STREAM`] names (or the one
//! [`EmuDevice::on_stream`] picks): capture cannot begin on the legacy NULL stream
//! (`CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`), and an operation a thread-local capture prohibits
//! (an allocation, a free, a copy, an event, a synchronize) is refused and invalidates the
//! capture, so that `end_capture` fails (`CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`).
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::device::{
    argument_slots, check_kernel_args, check_launch_limits, check_max_dynamic_shared,
    kernel_signature, Device, DeviceBuffer, DeviceMemory, Event, Graph, KernelArg, LaunchConfig,
    ParamKind, StreamKind, KERNELS, WORK_STREAM,
};

/// The GPU the emulator answers occupancy queries for: an H100 SXM's 132 SMs with compute
/// capability 9.0's per-SM limits on threads, blocks and shared memory. Registers are not
/// modelled (the emulator has none to count), so the answer is an upper bound: on a GPU a kernel
/// whose registers run out first fits fewer blocks (`kvlab kernel-report` lists each kernel's
/// registers; at 48 a thread, 65536 registers hold 5 blocks of 256 threads where this model
/// says 8). Grids sized from it cover the same rows either way: the kernels stride.
pub mod emulated_sm {
    pub const MULTIPROCESSORS: u32 = 132;
    pub const MAX_THREADS: u32 = 2048;
    pub const MAX_BLOCKS: u32 = 32;
    /// Shared memory of one SM, of which the driver reserves 1 KiB for each resident block.
    pub const SHARED_BYTES: u32 = 228 * 1024;
    pub const RESERVED_SHARED_PER_BLOCK: u32 = 1024;

    /// Blocks of `threads` threads (whole warps) and `shared_bytes` (static + dynamic) that one
    /// SM holds; 0 when one does not fit.
    pub fn max_active_blocks(threads: u32, shared_bytes: u32) -> u32 {
        let warps = threads.div_ceil(32).max(1);
        let by_threads = MAX_THREADS / (warps * 32);
        let by_shared = SHARED_BYTES / (shared_bytes + RESERVED_SHARED_PER_BLOCK);
        by_threads.min(by_shared).min(MAX_BLOCKS)
    }
}

/// Guard bytes before each buffer (also keeps buffers 256-byte aligned, as cudaMalloc does).
pub const GUARD_BEFORE: usize = 256;
/// Guard bytes after each buffer.
pub const GUARD_AFTER: usize = 1024;
const GUARD_PATTERN: u8 = 0xa5;
/// Fresh allocations read as 0xff bytes (NaN as f32 / bf16), as uninitialised memory would.
const FRESH_PATTERN: u8 = 0xff;
const ERROR_CAPACITY: usize = 2048;

#[repr(C)]
struct EmuLaunch {
    kernel: u32,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    reverse_order: u32,
    programmatic: u32,
    argument_slots: *const u64,
}

// The argument slots outlive every run of the launch and are only read.
unsafe impl Sync for EmuLaunch {}

extern "C" {
    fn kvlab_emu_run_blocks(
        launch: *const EmuLaunch,
        first_block: u64,
        block_count: u64,
        error: *mut u8,
        error_capacity: usize,
    ) -> i32;
    fn kvlab_emu_sanitizer_active() -> i32;
    fn kvlab_emu_poison(address: *mut u8, bytes: usize);
    fn kvlab_emu_unpoison(address: *mut u8, bytes: usize);
    static kvlab_emu_kernel_count: u32;
}

/// Whether the emulator was built with AddressSanitizer (feature `emu-asan`).
pub fn sanitizer_active() -> bool {
    unsafe { kvlab_emu_sanitizer_active() != 0 }
}

/// A launch as recorded for replay.
#[derive(Clone)]
struct RecordedLaunch {
    kernel: usize,
    config: LaunchConfig,
    slots: Vec<u64>,
}

enum RecordedOp {
    Launch(RecordedLaunch),
    Memset { address: u64, bytes: usize },
}

struct EmuGraph(Vec<RecordedOp>);

struct EmuEvent(Instant);

#[derive(Default)]
struct EmuState {
    /// Live buffers: device address -> length in bytes.
    buffers: BTreeMap<u64, usize>,
    allocated_bytes: u64,
    /// Opt-in dynamic shared memory per kernel index.
    max_dynamic_shared: BTreeMap<usize, u32>,
    capture: Option<Capture>,
}

/// A capture in progress: what it recorded, and the first prohibited operation, if any.
#[derive(Default)]
struct Capture {
    ops: Vec<RecordedOp>,
    invalidated_by: Option<String>,
}

impl EmuState {
    /// Refuses `what` while a capture runs, and invalidates the capture as the driver does.
    fn refuse_during_capture(&mut self, what: &str) -> Result<()> {
        let Some(capture) = self.capture.as_mut() else {
            return Ok(());
        };
        capture
            .invalidated_by
            .get_or_insert_with(|| what.to_string());
        bail!(
            "{what} during graph capture: only launches and memsets may be issued while capturing \
             (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is invalidated)"
        )
    }
}

/// Host memory of one device buffer with its guards: [GUARD_BEFORE | len | GUARD_AFTER].
struct EmuAllocation {
    base: *mut u8,
    layout: Layout,
    len: usize,
    state: Arc<Mutex<EmuState>>,
    stream: Arc<Mutex<()>>,
}

// The allocation owns its memory; the device serialises access through its stream lock.
unsafe impl Send for EmuAllocation {}
unsafe impl Sync for EmuAllocation {}

impl EmuAllocation {
    fn data(&self) -> *mut u8 {
        unsafe { self.base.add(GUARD_BEFORE) }
    }
}

impl Drop for EmuAllocation {
    fn drop(&mut self) {
        // As cudaFree, wait for the work in flight.
        let _stream = lock(&self.stream);
        let mut state = lock(&self.state);
        // A drop cannot fail; the capture it happened in does (the driver refuses cuMemFree).
        let _ = state.refuse_during_capture(&format!("freeing a {}-byte buffer", self.len));
        state.buffers.remove(&(self.data() as u64));
        state.allocated_bytes -= self.len as u64;
        drop(state);
        unsafe {
            kvlab_emu_unpoison(self.base, self.layout.size());
            std::alloc::dealloc(self.base, self.layout);
        }
    }
}

pub struct EmuDevice {
    state: Arc<Mutex<EmuState>>,
    /// The one stream: launches, copies and memsets run one at a time, in issue order, even
    /// when issued from several threads.
    stream: Arc<Mutex<()>>,
    pool: rayon::ThreadPool,
    race_check: bool,
    stream_kind: StreamKind,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmuDevice {
    /// An emulator with `threads` OS threads for blocks (`KVLAB_EMU_THREADS`, else all cores),
    /// race check from `KVLAB_EMU_RACECHECK=1`.
    pub fn new() -> Result<Self> {
        let threads = match std::env::var("KVLAB_EMU_THREADS") {
            Ok(value) => value
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| {
                    format!("KVLAB_EMU_THREADS={value:?} is not a positive integer")
                })?,
            Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let race_check = std::env::var("KVLAB_EMU_RACECHECK").is_ok_and(|v| v == "1");
        Self::with_options(threads, race_check)
    }

    /// An emulator running blocks on `threads` OS threads, with or without the race check.
    pub fn with_options(threads: usize, race_check: bool) -> Result<Self> {
        ensure!(threads > 0, "the emulator needs at least one thread");
        let table_size = unsafe { kvlab_emu_kernel_count } as usize;
        ensure!(
            table_size == KERNELS.len(),
            "emulator kernel table has {table_size} entries, the Rust table {}: stale build",
            KERNELS.len()
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("kvlab-emu-{index}"))
            .build()
            .context("starting the emulator's thread pool")?;
        Ok(EmuDevice {
            state: Arc::new(Mutex::new(EmuState::default())),
            stream: Arc::new(Mutex::new(())),
            pool,
            race_check,
            stream_kind: WORK_STREAM,
        })
    }

    /// The same emulator issuing on `stream` instead of [`WORK_STREAM`] (tests of the driver's
    /// stream rules).
    pub fn on_stream(mut self, stream: StreamKind) -> Self {
        self.stream_kind = stream;
        self
    }

    fn state(&self) -> MutexGuard<'_, EmuState> {
        lock(&self.state)
    }

    fn allocation<'a>(&self, buffer: &'a DeviceBuffer) -> Result<&'a EmuAllocation> {
        buffer
            .allocation()
            .downcast_ref::<EmuAllocation>()
            .context("device buffer does not belong to the emulator")
    }

    fn ensure_not_capturing(&self, what: &str) -> Result<()> {
        self.state().refuse_during_capture(what)
    }

    /// The live buffer containing `address` (one past the end counts): (start, len).
    fn buffer_containing(state: &EmuState, address: u64) -> Option<(u64, usize)> {
        let (&start, &len) = state.buffers.range(..=address).next_back()?;
        (address <= start + len as u64).then_some((start, len))
    }

    /// The distinct buffers that the pointer arguments point into; errors for stray pointers.
    fn argument_buffers(&self, kernel: usize, slots: &[u64]) -> Result<Vec<(u64, usize)>> {
        let signature = &KERNELS[kernel];
        let state = self.state();
        let mut buffers = Vec::new();
        let mut slot = 0;
        for (index, param) in signature.params.iter().enumerate() {
            let first_slot = slot;
            slot += param.kind.slots();
            let address = slots[first_slot];
            if param.kind != ParamKind::Ptr || address == 0 {
                continue;
            }
            let buffer = Self::buffer_containing(&state, address).with_context(|| {
                format!(
                    "kernel `{}` argument {index} (`{}`): {address:#x} is not inside any live device buffer",
                    signature.name, param.name
                )
            })?;
            if !buffers.contains(&buffer) {
                buffers.push(buffer);
            }
        }
        Ok(buffers)
    }

    /// Verifies the guard bytes around each buffer and restores them.
    fn check_guards(&self, buffers: &[(u64, usize)]) -> Result<()> {
        if sanitizer_active() {
            return Ok(());
        }
        for &(start, len) in buffers {
            let before = unsafe {
                std::slice::from_raw_parts_mut((start as *mut u8).sub(GUARD_BEFORE), GUARD_BEFORE)
            };
            let after =
                unsafe { std::slice::from_raw_parts_mut((start as *mut u8).add(len), GUARD_AFTER) };
            let first_bad_before = before.iter().position(|&b| b != GUARD_PATTERN);
            let last_bad_after = after.iter().rposition(|&b| b != GUARD_PATTERN);
            before.fill(GUARD_PATTERN);
            after.fill(GUARD_PATTERN);
            if let Some(position) = first_bad_before {
                bail!(
                    "wrote out of bounds: {} bytes before the device buffer at {start:#x} \
                     ({len} bytes)",
                    GUARD_BEFORE - position
                );
            }
            if let Some(position) = last_bad_after {
                bail!(
                    "wrote out of bounds: up to {} bytes past the end of the device buffer at \
                     {start:#x} ({len} bytes)",
                    position + 1
                );
            }
        }
        Ok(())
    }

    /// Runs every block of a launch: on the pool, or on one fresh thread when `sequential`.
    fn run_grid(&self, launch: &RecordedLaunch, reverse: bool, sequential: bool) -> Result<()> {
        let emu_launch = EmuLaunch {
            kernel: launch.kernel as u32,
            grid: launch.config.grid,
            block: launch.config.block,
            dynamic_shared_bytes: launch.config.shared_mem_bytes,
            reverse_order: reverse as u32,
            programmatic: launch.config.programmatic as u32,
            argument_slots: launch.slots.as_ptr(),
        };
        let blocks = launch.config.block_count();
        let run_range = |first: u64, count: u64| -> Result<()> {
            let mut error = [0u8; ERROR_CAPACITY];
            let status = unsafe {
                kvlab_emu_run_blocks(&emu_launch, first, count, error.as_mut_ptr(), error.len())
            };
            if status == 0 {
                return Ok(());
            }
            let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
            Err(anyhow!("{}", String::from_utf8_lossy(&error[..end])))
        };
        if sequential {
            // A fresh OS thread starts with zeroed `__shared__` statics (they are thread-locals),
            // so leftovers of earlier launches cannot mask a race between the two orders.
            return std::thread::scope(|scope| {
                scope
                    .spawn(|| run_range(0, blocks))
                    .join()
                    .unwrap_or_else(|_| bail!("emulator thread panicked"))
            });
        }
        let threads = self.pool.current_num_threads() as u64;
        if blocks == 1 || threads == 1 {
            return run_range(0, blocks);
        }
        // A few ranges per thread balance uneven blocks without much scheduling overhead.
        let ranges = blocks.min(threads * 4);
        self.pool.install(|| {
            use rayon::prelude::*;
            (0..ranges).into_par_iter().try_for_each(|range| {
                let first = blocks * range / ranges;
                let end = blocks * (range + 1) / ranges;
                run_range(first, end - first)
            })
        })
    }

    fn execute(&self, launch: &RecordedLaunch, buffers: &[(u64, usize)]) -> Result<()> {
        let kernel = KERNELS[launch.kernel].name;
        let context = || {
            format!(
                "emulated kernel `{kernel}` (grid {:?}, block {:?}, {} bytes dynamic shared)",
                launch.config.grid, launch.config.block, launch.config.shared_mem_bytes
            )
        };
        if !self.race_check {
            self.run_grid(launch, false, false).with_context(context)?;
            return self.check_guards(buffers).with_context(context);
        }
        let snapshot: Vec<Vec<u8>> = buffers
            .iter()
            .map(|&(start, len)| read_bytes(start, len).to_vec())
            .collect();
        self.run_grid(launch, false, true).with_context(context)?;
        self.check_guards(buffers).with_context(context)?;
        let forward: Vec<Vec<u8>> = buffers
            .iter()
            .map(|&(start, len)| read_bytes(start, len).to_vec())
            .collect();
        for (&(start, len), bytes) in buffers.iter().zip(&snapshot) {
            write_bytes(start, len).copy_from_slice(bytes);
        }
        self.run_grid(launch, true, true).with_context(context)?;
        let mut difference = None;
        for (index, (&(start, len), expected)) in buffers.iter().zip(&forward).enumerate() {
            let reversed = write_bytes(start, len);
            if difference.is_none() {
                difference = expected
                    .iter()
                    .zip(reversed.iter())
                    .position(|(a, b)| a != b)
                    .map(|at| (index, at));
            }
            reversed.copy_from_slice(expected);
        }
        if let Some((index, at)) = difference {
            let (start, len) = buffers[index];
            bail!(
                "{}: race check failed: byte {at} of the device buffer at {start:#x} ({len} bytes) differs between \
                 forward and reverse thread order; the kernel reads memory another thread writes without a \
                 barrier in between",
                context()
            );
        }
        Ok(())
    }
}

fn read_bytes<'a>(address: u64, len: usize) -> &'a [u8] {
    unsafe { std::slice::from_raw_parts(address as *const u8, len) }
}

fn write_bytes<'a>(address: u64, len: usize) -> &'a mut [u8] {
    unsafe { std::slice::from_raw_parts_mut(address as *mut u8, len) }
}

impl Device for EmuDevice {
    fn describe(&self) -> String {
        let mut description = format!(
            "CUDA emulator on CPU, {} threads",
            self.pool.current_num_threads()
        );
        if sanitizer_active() {
            description.push_str(", AddressSanitizer");
        }
        if self.race_check {
            description.push_str(", race check");
        }
        description
    }

    fn l2_cache_bytes(&self) -> Option<usize> {
        None
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.ensure_not_capturing("alloc")?;
        let size = GUARD_BEFORE
            .checked_add(bytes)
            .and_then(|n| n.checked_add(GUARD_AFTER))
            .with_context(|| format!("device allocation of {bytes} bytes overflows"))?;
        let layout = Layout::from_size_align(size, GUARD_BEFORE)
            .with_context(|| format!("device allocation of {bytes} bytes"))?;
        let base = unsafe { std::alloc::alloc(layout) };
        ensure!(
            !base.is_null(),
            "out of host memory allocating {bytes} bytes for the emulator"
        );
        let allocation = EmuAllocation {
            base,
            layout,
            len: bytes,
            state: self.state.clone(),
            stream: self.stream.clone(),
        };
        let data = allocation.data();
        unsafe {
            std::ptr::write_bytes(base, GUARD_PATTERN, GUARD_BEFORE);
            std::ptr::write_bytes(data, FRESH_PATTERN, bytes);
            std::ptr::write_bytes(data.add(bytes), GUARD_PATTERN, GUARD_AFTER);
            kvlab_emu_poison(base, GUARD_BEFORE);
            kvlab_emu_poison(data.add(bytes), GUARD_AFTER);
        }
        let mut state = self.state();
        state.buffers.insert(data as u64, bytes);
        state.allocated_bytes += bytes as u64;
        drop(state);
        Ok(DeviceBuffer::new(data as u64, bytes, Box::new(allocation)))
    }

    fn copy_htod(&self, dst: &DeviceBuffer, offset_bytes: usize, src: &[u8]) -> Result<()> {
        self.ensure_not_capturing("copy_htod")?;
        dst.check_range(offset_bytes, src.len(), "copy_htod")?;
        let allocation = self.allocation(dst)?;
        let _stream = lock(&self.stream);
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                allocation.data().add(offset_bytes),
                src.len(),
            )
        };
        Ok(())
    }

    fn copy_dtoh(&self, src: &DeviceBuffer, offset_bytes: usize, dst: &mut [u8]) -> Result<()> {
        self.ensure_not_capturing("copy_dtoh")?;
        src.check_range(offset_bytes, dst.len(), "copy_dtoh")?;
        let allocation = self.allocation(src)?;
        let _stream = lock(&self.stream);
        unsafe {
            std::ptr::copy_nonoverlapping(
                allocation.data().add(offset_bytes),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    fn copy_dtod(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        self.ensure_not_capturing("copy_dtod")?;
        src.check_range(src_offset, bytes, "copy_dtod source")?;
        dst.check_range(dst_offset, bytes, "copy_dtod destination")?;
        let from = unsafe { self.allocation(src)?.data().add(src_offset) };
        let to = unsafe { self.allocation(dst)?.data().add(dst_offset) };
        let _stream = lock(&self.stream);
        unsafe { std::ptr::copy(from, to, bytes) };
        Ok(())
    }

    fn memset_zero(&self, buf: &DeviceBuffer, offset_bytes: usize, bytes: usize) -> Result<()> {
        buf.check_range(offset_bytes, bytes, "memset_zero")?;
        let address = self.allocation(buf)?.data() as u64 + offset_bytes as u64;
        if let Some(capture) = self.state().capture.as_mut() {
            capture.ops.push(RecordedOp::Memset { address, bytes });
            return Ok(());
        }
        let _stream = lock(&self.stream);
        write_bytes(address, bytes).fill(0);
        Ok(())
    }

    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let (index, signature) = kernel_signature(kernel)?;
        check_kernel_args(signature, args)?;
        let max_dynamic_shared = self.state().max_dynamic_shared.get(&index).copied();
        check_launch_limits(signature, &config, max_dynamic_shared)?;
        let launch = RecordedLaunch {
            kernel: index,
            config,
            slots: argument_slots(args),
        };
        let buffers = self.argument_buffers(index, &launch.slots)?;
        if let Some(capture) = self.state().capture.as_mut() {
            capture.ops.push(RecordedOp::Launch(launch));
            return Ok(());
        }
        let _stream = lock(&self.stream);
        self.execute(&launch, &buffers)
    }

    fn set_max_dynamic_shared(&self, kernel: &str, bytes: u32) -> Result<()> {
        let (index, signature) = kernel_signature(kernel)?;
        check_max_dynamic_shared(signature, bytes)?;
        self.state().max_dynamic_shared.insert(index, bytes);
        Ok(())
    }

    fn multiprocessors(&self) -> u32 {
        emulated_sm::MULTIPROCESSORS
    }

    fn max_active_blocks_per_multiprocessor(
        &self,
        kernel: &str,
        threads_per_block: u32,
        dynamic_shared_bytes: u32,
    ) -> Result<u32> {
        let (_, signature) = kernel_signature(kernel)?;
        Ok(emulated_sm::max_active_blocks(
            threads_per_block,
            signature.static_shared_bytes + dynamic_shared_bytes,
        ))
    }

    fn synchronize(&self) -> Result<()> {
        self.ensure_not_capturing("synchronize")
    }

    fn memory(&self) -> Result<DeviceMemory> {
        Ok(DeviceMemory {
            allocated_by_kvlab: self.state().allocated_bytes,
            device_free: None,
            device_total: None,
        })
    }

    fn record_event(&self) -> Result<Event> {
        self.ensure_not_capturing("record_event")?;
        Ok(Event(Box::new(EmuEvent(Instant::now()))))
    }

    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        let start = start
            .0
            .downcast_ref::<EmuEvent>()
            .context("event does not belong to the emulator")?;
        let end = end
            .0
            .downcast_ref::<EmuEvent>()
            .context("event does not belong to the emulator")?;
        Ok(end.0.saturating_duration_since(start.0).as_secs_f32() * 1000.0)
    }

    fn begin_capture(&self) -> Result<()> {
        ensure!(
            self.stream_kind != StreamKind::Legacy,
            "cuStreamBeginCapture: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: the legacy NULL stream \
             cannot be captured; issue the work on a created stream"
        );
        let mut state = self.state();
        ensure!(
            state.capture.is_none(),
            "begin_capture while a capture is already running"
        );
        state.capture = Some(Capture::default());
        Ok(())
    }

    fn end_capture(&self) -> Result<Graph> {
        let capture = self
            .state()
            .capture
            .take()
            .context("end_capture without begin_capture")?;
        if let Some(what) = capture.invalidated_by {
            bail!(
                "cuStreamEndCapture: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: {what} during the \
                 capture invalidated it"
            );
        }
        Ok(Graph(Box::new(EmuGraph(capture.ops))))
    }

    fn launch_graph(&self, graph: &Graph) -> Result<()> {
        self.ensure_not_capturing("launch_graph")?;
        let graph = graph
            .0
            .downcast_ref::<EmuGraph>()
            .context("graph does not belong to the emulator")?;
        let _stream = lock(&self.stream);
        for (position, op) in graph.0.iter().enumerate() {
            match op {
                RecordedOp::Launch(launch) => {
                    let buffers = self
                        .argument_buffers(launch.kernel, &launch.slots)
                        .with_context(|| {
                            format!("graph node {position}: a buffer was freed after capture")
                        })?;
                    self.execute(launch, &buffers)
                        .with_context(|| format!("graph node {position}"))?;
                }
                RecordedOp::Memset { address, bytes } => {
                    let state = self.state();
                    let inside = Self::buffer_containing(&state, *address)
                        .is_some_and(|(start, len)| address + *bytes as u64 <= start + len as u64);
                    drop(state);
                    ensure!(
                        inside,
                        "graph node {position}: memset target was freed after capture"
                    );
                    write_bytes(*address, *bytes).fill(0);
                }
            }
        }
        Ok(())
    }
}
