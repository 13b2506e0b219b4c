//! The device interface: everything the CUDA backend needs from a device, implemented by a
//! real GPU ([`super::gpu::GpuDevice`], cudarc + NVRTC) and by the CPU emulator
//! ([`super::emu::EmuDevice`]). The backend holds an `Arc<dyn Device>` and never knows which.
//!
//! Device memory is addressed by raw device addresses (`u64`): a kernel's pointer argument is
//! `KernelArg::Ptr(buffer.ptr() + offset_bytes)`. Every launch is checked against the kernel's
//! signature (parsed from kernels/*.cu by build.rs) and against the hardware limits, with the
//! same errors on both implementations.
use std::any::Any;
use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};

use crate::kv::KvLayout;

/// What a kernel parameter is, as parsed from `extern "C" __global__ void name(...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `T*` or `const T*`: a device address.
    Ptr,
    /// `int`.
    I32,
    /// `unsigned`.
    U32,
    /// `float`.
    F32,
    /// `KvLayout` by value (kernels/kv_layout.cuh, the mirror of [`crate::kv::KvLayout`]).
    KvLayout,
}

impl ParamKind {
    /// 64-bit argument slots the parameter takes in the emulator's trampolines: one for a
    /// pointer or a scalar (its value in the low bytes), a struct's bytes rounded up to whole
    /// slots.
    pub fn slots(self) -> usize {
        match self {
            ParamKind::KvLayout => std::mem::size_of::<KvLayout>().div_ceil(8),
            ParamKind::Ptr | ParamKind::I32 | ParamKind::U32 | ParamKind::F32 => 1,
        }
    }
}

#[derive(Debug)]
pub struct KernelParam {
    pub name: &'static str,
    pub kind: ParamKind,
}

/// One kernel of kernels/*.cu.
#[derive(Debug)]
pub struct KernelSignature {
    pub name: &'static str,
    /// File name inside kernels/, e.g. `"rmsnorm.cu"`.
    pub source_file: &'static str,
    pub params: &'static [KernelParam],
    /// `__shared__` bytes declared in the kernel's own body (the emulator's view; helpers'
    /// `__shared__` are not counted, see build.rs). The GPU reports its own number.
    pub static_shared_bytes: u32,
}

/// One kernels/*.cu or kernels/*.cuh, embedded for NVRTC.
#[derive(Debug)]
pub struct KernelSource {
    pub file: &'static str,
    pub text: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel's position in [`KERNELS`] and its signature.
pub fn kernel_signature(name: &str) -> Result<(usize, &'static KernelSignature)> {
    static INDEX: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    let index = INDEX.get_or_init(|| {
        KERNELS
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name, i))
            .collect()
    });
    let position = *index
        .get(name)
        .with_context(|| format!("no kernel named `{name}` in kernels/*.cu"))?;
    Ok((position, &KERNELS[position]))
}

/// One kernel argument. A pointer is a raw device address, so `buf.ptr() + offset` works.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    /// The geometry of a KV arena, passed by value as one argument.
    KvLayout(KvLayout),
}

impl KernelArg {
    pub fn kind(&self) -> ParamKind {
        match self {
            KernelArg::Ptr(_) => ParamKind::Ptr,
            KernelArg::I32(_) => ParamKind::I32,
            KernelArg::U32(_) => ParamKind::U32,
            KernelArg::F32(_) => ParamKind::F32,
            KernelArg::KvLayout(_) => ParamKind::KvLayout,
        }
    }

    /// Appends the argument's [`ParamKind::slots`] 64-bit slots, little endian: a pointer or
    /// scalar in the low bytes of one slot, a struct's `#[repr(C)]` bytes (zero-padded to whole
    /// slots). The emulator's trampolines read arguments from these slots, and cuLaunchKernel
    /// reads a scalar's value through a pointer to its slot.
    pub fn push_slots(&self, slots: &mut Vec<u64>) {
        match *self {
            KernelArg::Ptr(address) => slots.push(address),
            KernelArg::I32(value) => slots.push(value as u32 as u64),
            KernelArg::U32(value) => slots.push(value as u64),
            KernelArg::F32(value) => slots.push(value.to_bits() as u64),
            KernelArg::KvLayout(layout) => {
                let mut words = [0u64; std::mem::size_of::<KvLayout>().div_ceil(8)];
                bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..std::mem::size_of::<KvLayout>()]
                    .copy_from_slice(bytemuck::bytes_of(&layout));
                slots.extend_from_slice(&words);
            }
        }
    }
}

/// The argument slots of a launch, in parameter order (see [`KernelArg::push_slots`]).
pub fn argument_slots(args: &[KernelArg]) -> Vec<u64> {
    let mut slots = Vec::with_capacity(args.len());
    for arg in args {
        arg.push_slots(&mut slots);
    }
    slots
}

/// Checks count and kinds of `args` against the kernel's parameters.
pub fn check_kernel_args(kernel: &KernelSignature, args: &[KernelArg]) -> Result<()> {
    ensure!(
        args.len() == kernel.params.len(),
        "kernel `{}` ({}) takes {} arguments, got {}",
        kernel.name,
        kernel.source_file,
        kernel.params.len(),
        args.len()
    );
    for (index, (param, arg)) in kernel.params.iter().zip(args).enumerate() {
        ensure!(
            param.kind == arg.kind(),
            "kernel `{}` argument {index} (`{}`): expected {:?}, got {:?}",
            kernel.name,
            param.name,
            param.kind,
            arg
        );
    }
    Ok(())
}

/// Grid and block dimensions and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    /// Programmatic dependent launch: the kernel may start while the previous kernel of the
    /// stream still runs (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`); only for
    /// the [`PROGRAMMATIC_KERNELS`], whose threads wait for it before touching its output.
    pub programmatic: bool,
}

impl LaunchConfig {
    /// A 1-D launch: `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32, shared_mem_bytes: u32) -> Self {
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_mem_bytes,
            programmatic: false,
        }
    }

    pub fn block_count(&self) -> u64 {
        self.grid.iter().map(|&d| d as u64).product()
    }

    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|&d| d as u64).product()
    }
}

/// The kernels of a decode step, which the backend launches as programmatic dependents when
/// `CudaOptions::programmatic_launch` is on: every thread of each calls
/// `grid_dependency_wait()` (kernels/common.cuh) before it reads anything another kernel writes
/// and before it writes anything, on every path (the emulator fails a programmatic launch in
/// which a thread returns without it). The matvec entries share `matvec` in kernels/matmul.cu,
/// which waits after its first weight loads; the others wait first thing.
pub const PROGRAMMATIC_KERNELS: &[&str] = &[
    "embedding_gather_bf16_to_f32",
    "embedding_gather_chosen_bf16_to_f32",
    "matvec_bf16",
    "matvec_bf16_out_f32",
    "matvec_bf16_add_f32",
    "matvec_rms_norm_bf16",
    "matvec_rms_norm_bf16_out_f32",
    "matvec_swiglu_bf16_add_f32",
    "rope_kv_append_bf16",
    "rope_kv_append_quantize_bf16",
    "attention_decode_bf16",
    "attention_decode_int8_kv_bf16",
    "attention_decode_fp8_kv_bf16",
    "argmax_f32",
];

/// Hardware limits of compute capability 8.0 / 9.0 (the H100's opt-in shared memory).
pub mod limits {
    pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
    pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
    pub const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65535, 65535];
    /// Static + dynamic shared memory without the opt-in attribute.
    pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;
    /// Static + dynamic shared memory with `set_max_dynamic_shared`.
    pub const MAX_OPT_IN_SHARED_BYTES: u32 = 227 * 1024;
}

/// Checks a launch against the hardware limits. `max_dynamic_shared` is the kernel's opt-in
/// (None: not set).
pub fn check_launch_limits(
    kernel: &KernelSignature,
    config: &LaunchConfig,
    max_dynamic_shared: Option<u32>,
) -> Result<()> {
    let name = kernel.name;
    for axis in 0..3 {
        ensure!(
            (1..=limits::MAX_BLOCK[axis]).contains(&config.block[axis]),
            "kernel `{name}`: block dimension {axis} is {}, allowed 1..={}",
            config.block[axis],
            limits::MAX_BLOCK[axis]
        );
        ensure!(
            (1..=limits::MAX_GRID[axis]).contains(&config.grid[axis]),
            "kernel `{name}`: grid dimension {axis} is {}, allowed 1..={}",
            config.grid[axis],
            limits::MAX_GRID[axis]
        );
    }
    ensure!(
        config.threads_per_block() <= limits::MAX_THREADS_PER_BLOCK,
        "kernel `{name}`: block of {:?} = {} threads, at most {} allowed",
        config.block,
        config.threads_per_block(),
        limits::MAX_THREADS_PER_BLOCK
    );
    let static_bytes = kernel.static_shared_bytes;
    ensure!(
        static_bytes <= limits::DEFAULT_SHARED_BYTES,
        "kernel `{name}`: {static_bytes} bytes of static shared memory, at most {} allowed",
        limits::DEFAULT_SHARED_BYTES
    );
    let dynamic = config.shared_mem_bytes;
    match max_dynamic_shared {
        None => ensure!(
            static_bytes + dynamic <= limits::DEFAULT_SHARED_BYTES,
            "kernel `{name}`: {dynamic} bytes of dynamic + {static_bytes} bytes of static shared memory exceed \
             the default {} bytes; call set_max_dynamic_shared first",
            limits::DEFAULT_SHARED_BYTES
        ),
        Some(max) => ensure!(
            dynamic <= max,
            "kernel `{name}`: {dynamic} bytes of dynamic shared memory exceed the {max} bytes set by \
             set_max_dynamic_shared"
        ),
    }
    Ok(())
}

/// Checks the opt-in amount of `set_max_dynamic_shared`.
pub fn check_max_dynamic_shared(kernel: &KernelSignature, bytes: u32) -> Result<()> {
    if kernel.static_shared_bytes as u64 + bytes as u64 > limits::MAX_OPT_IN_SHARED_BYTES as u64 {
        bail!(
            "kernel `{}`: {bytes} bytes of dynamic + {} bytes of static shared memory exceed the {} bytes a block \
             can have",
            kernel.name,
            kernel.static_shared_bytes,
            limits::MAX_OPT_IN_SHARED_BYTES
        );
    }
    Ok(())
}

/// Device memory: what kvlab allocated, and what the device reports (None for the emulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub allocated_by_kvlab: u64,
    pub device_free: Option<u64>,
    pub device_total: Option<u64>,
}

/// A device allocation, freed on drop.
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
    /// The implementation's owner of the memory; dropping it frees the memory.
    allocation: Box<dyn Any + Send + Sync>,
}

impl DeviceBuffer {
    pub fn new(ptr: u64, len: usize, allocation: Box<dyn Any + Send + Sync>) -> Self {
        DeviceBuffer {
            ptr,
            len,
            allocation,
        }
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The implementation's allocation object.
    pub fn allocation(&self) -> &(dyn Any + Send + Sync) {
        self.allocation.as_ref()
    }

    /// Checks that `[offset_bytes, offset_bytes + bytes)` lies inside the buffer.
    pub fn check_range(&self, offset_bytes: usize, bytes: usize, what: &str) -> Result<()> {
        ensure!(
            offset_bytes
                .checked_add(bytes)
                .is_some_and(|end| end <= self.len),
            "{what}: bytes {offset_bytes}..{} are outside the device buffer of {} bytes",
            offset_bytes.saturating_add(bytes),
            self.len
        );
        Ok(())
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer {{ ptr: {:#x}, len: {} }}",
            self.ptr, self.len
        )
    }
}

/// The CUDA stream a device issues its work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The legacy NULL stream (cudarc's `default_stream()`): the driver refuses to capture it
    /// into a graph (`CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`).
    Legacy,
    /// A stream kvlab creates (`cuStreamCreate`, non-blocking): capturable.
    Created,
}

/// The stream every kvlab device issues on: [`super::gpu::GpuDevice`] creates it, and the
/// emulator enforces the driver's rules for it, so that choosing the legacy stream again fails
/// the emulator's graph tests in CI, not the first GPU run.
pub const WORK_STREAM: StreamKind = StreamKind::Created;

/// A point in the device's stream of work, for timing.
pub struct Event(pub(crate) Box<dyn Any + Send + Sync>);

/// A captured sequence of launches, replayed by [`Device::launch_graph`].
pub struct Graph(pub(crate) Box<dyn Any + Send + Sync>);

/// What the CUDA backend needs from a device. Work is ordered as issued (one stream);
/// copies to the host return when the data is there.
pub trait Device: Send + Sync {
    /// Device name and compute capability, or "CUDA emulator on CPU, N threads".
    fn describe(&self) -> String;

    /// Bytes of L2 cache (None: the emulator), so that timings can read from memory, not L2.
    fn l2_cache_bytes(&self) -> Option<usize>;

    /// Allocates `bytes` of device memory (contents undefined).
    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer>;

    fn copy_htod(&self, dst: &DeviceBuffer, offset_bytes: usize, src: &[u8]) -> Result<()>;

    fn copy_dtoh(&self, src: &DeviceBuffer, offset_bytes: usize, dst: &mut [u8]) -> Result<()>;

    /// Copies `bytes` from `src` at `src_offset` to `dst` at `dst_offset`, in stream order.
    fn copy_dtod(
        &self,
        src: &DeviceBuffer,
        src_offset: usize,
        dst: &DeviceBuffer,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()>;

    fn memset_zero(&self, buf: &DeviceBuffer, offset_bytes: usize, bytes: usize) -> Result<()>;

    /// Launches the kernel named `kernel` (an `extern "C" __global__` of kernels/*.cu).
    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()>;

    /// Opts the kernel into `bytes` of dynamic shared memory above the default 48 KiB.
    fn set_max_dynamic_shared(&self, kernel: &str, bytes: u32) -> Result<()>;

    /// Streaming multiprocessors of the device (the emulator: of the GPU it models, see
    /// [`super::emu::emulated_sm`]).
    fn multiprocessors(&self) -> u32;

    /// How many blocks of `kernel` with `threads_per_block` threads and `dynamic_shared_bytes`
    /// one multiprocessor holds at once (`cuOccupancyMaxActiveBlocksPerMultiprocessor`); 0 when
    /// not even one fits. Times [`Device::multiprocessors`], the largest grid that is resident
    /// all at once.
    fn max_active_blocks_per_multiprocessor(
        &self,
        kernel: &str,
        threads_per_block: u32,
        dynamic_shared_bytes: u32,
    ) -> Result<u32>;

    /// Waits for all issued work; reports errors of asynchronous work.
    fn synchronize(&self) -> Result<()>;

    fn memory(&self) -> Result<DeviceMemory>;

    /// Records an event after all work issued so far.
    fn record_event(&self) -> Result<Event>;

    /// Milliseconds between two recorded events (waits for `end`).
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32>;

    /// Starts recording launches and memsets into a graph instead of running them. Anything
    /// else (allocations, copies, events, synchronize) is an error until [`Device::end_capture`].
    fn begin_capture(&self) -> Result<()>;

    fn end_capture(&self) -> Result<Graph>;

    /// Replays a captured graph: the same kernels with the same arguments, in order.
    fn launch_graph(&self, graph: &Graph) -> Result<()>;
}

impl<'a> dyn Device + 'a {
    /// Allocates a buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.alloc(bytes.len())?;
        self.copy_htod(&buffer, 0, bytes)?;
        Ok(buffer)
    }

    /// Reads the whole buffer as `T`s.
    pub fn download<T: bytemuck::Pod>(&self, buffer: &DeviceBuffer) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        ensure!(
            buffer.len().is_multiple_of(size),
            "device buffer of {} bytes is not a whole number of {size}-byte elements",
            buffer.len()
        );
        let mut out = vec![T::zeroed(); buffer.len() / size];
        self.copy_dtoh(buffer, 0, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}
