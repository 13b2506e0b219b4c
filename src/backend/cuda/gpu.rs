//! A real GPU as a [`Device`], through cudarc's driver API: one context, one stream created for
//! kvlab ([`WORK_STREAM`]; the legacy NULL stream cannot be captured into a graph), kernels
//! compiled by NVRTC to cubins for the device's own architecture (the driver never JIT-compiles
//! PTX), one module per kernels/*.cu loaded on the first launch of one of its kernels.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::{
    CUdevice_attribute, CUdeviceptr, CUevent_flags, CUfunction_attribute, CUgraphInstantiate_flags,
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
    CUstreamCaptureMode,
};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream, DriverError,
};

use super::device::{
    argument_slots, check_kernel_args, check_launch_limits, check_max_dynamic_shared,
    kernel_signature, Device, DeviceBuffer, DeviceMemory, Event, Graph, KernelArg, LaunchConfig,
    StreamKind, KERNELS, WORK_STREAM,
};
use super::nvrtc::{kernel_source, CudaVersion, Nvrtc, Output};
use crate::kv::KvLayout;

/// Whether a CUDA driver can be loaded and reports at least one device. Never panics: cudarc
/// panics on first use when libcuda is missing, so its presence is checked first.
pub fn cuda_device_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    result::init().is_ok() && result::device::get_count().is_ok_and(|count| count > 0)
}

/// The CUDA version of the machine's driver (`cuDriverGetVersion`), None without one.
pub fn driver_cuda_version() -> Option<CudaVersion> {
    // SAFETY: as in cuda_device_present; cuDriverGetVersion only writes the int.
    if !unsafe { cudarc::driver::sys::is_culib_present() } || result::init().is_err() {
        return None;
    }
    let mut code = 0;
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut code) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| CudaVersion::from_driver_code(code))
}

/// The kernel module's version ("580.159.04") from /proc/driver/nvidia/version, when readable.
pub fn kernel_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?;
    let after = line.split("Kernel Module").nth(1)?;
    let version = after.split_whitespace().next()?;
    Some(version.to_string())
}

struct GpuAllocation {
    ptr: CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
    allocated: Arc<AtomicU64>,
}

impl Drop for GpuAllocation {
    fn drop(&mut self) {
        // Errors cannot propagate out of drop; cudarc records them on the context.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: ptr came from cuMemAlloc and is freed once; cuMemFree waits for pending work.
        self.ctx.record_err(unsafe { result::free_sync(self.ptr) });
        self.allocated
            .fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

// cudarc's graph is not internally synchronised; the mutex serialises replays.
struct GpuGraph(Mutex<CudaGraph>);
// SAFETY: the graph is only used under its mutex, on the context it was captured in.
unsafe impl Send for GpuGraph {}
unsafe impl Sync for GpuGraph {}

pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    nvrtc: &'static Nvrtc,
    /// NVRTC target: "sm_" + the device's compute capability.
    arch: String,
    name: String,
    driver: CudaVersion,
    multiprocessors: i32,
    l2_cache_bytes: usize,
    /// Whether launches marked [`LaunchConfig::programmatic`] get the attribute: compute
    /// capability 9.0 and newer (below it the kernels' waits compile to nothing, and the
    /// launches are plain ones).
    programmatic_launch: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<usize, CudaFunction>>,
    max_dynamic_shared: Mutex<HashMap<usize, u32>>,
    allocated: Arc<AtomicU64>,
    capturing: AtomicBool,
    /// The first operation refused during the current capture: the capture fails, as on the
    /// emulator (see emu.rs).
    capture_refused: Mutex<Option<String>>,
}

impl GpuDevice {
    /// Opens device `ordinal`. Errors (no driver, no device, compute capability below 8.0, no
    /// NVRTC, an NVRTC the driver cannot follow) are reported, never panics.
    pub fn open(ordinal: usize) -> Result<Self> {
        ensure!(
            unsafe { cudarc::driver::sys::is_culib_present() },
            "no CUDA driver: libcuda could not be loaded"
        );
        let ctx =
            CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .context("reading the compute capability")?;
        let name = ctx.name().context("reading the device name")?;
        ensure!(
            major >= 8,
            "{name} has compute capability {major}.{minor}; kvlab's kernels need 8.0 or newer (mma.sync bf16, cp.async)"
        );
        let driver = driver_cuda_version().context("cuDriverGetVersion failed")?;
        let nvrtc = Nvrtc::shared().context("the CUDA backend compiles its kernels with NVRTC")?;
        let arch = format!("sm_{major}{minor}");
        nvrtc.check_arch(&arch, &name)?;
        let attribute = |which: CUdevice_attribute| {
            ctx.attribute(which)
                .with_context(|| format!("reading {which:?} of {name}"))
        };
        let multiprocessors =
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2_cache_bytes =
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize;
        // One stream, so cudarc's multi-stream event tracking is only overhead.
        // SAFETY: no cudarc slices exist yet; kvlab allocates through raw device pointers.
        unsafe { ctx.disable_event_tracking() };
        let stream = match WORK_STREAM {
            StreamKind::Legacy => ctx.default_stream(),
            StreamKind::Created => ctx.new_stream().context("creating kvlab's CUDA stream")?,
        };
        let device = GpuDevice {
            ctx,
            stream,
            nvrtc,
            arch,
            name,
            driver,
            multiprocessors,
            l2_cache_bytes,
            programmatic_launch: major >= 9,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            max_dynamic_shared: Mutex::new(HashMap::new()),
            allocated: Arc::new(AtomicU64::new(0)),
            capturing: AtomicBool::new(false),
            capture_refused: Mutex::new(None),
        };
        // Said at start, so that every run's log names what compiled and what ran its kernels.
        eprintln!("kvlab: {}", device.describe());
        Ok(device)
    }

    /// The driver's and NVRTC's versions: "driver 580.159.04 (CUDA 13.0), NVRTC 13.0 (path)".
    pub fn versions(&self) -> String {
        let module = kernel_driver_version().map_or(String::new(), |v| format!("{v} "));
        format!(
            "driver {module}(CUDA {}), {}",
            self.driver,
            self.nvrtc.describe()
        )
    }

    /// The raw stream kvlab issues on (for libraries timed beside kvlab, as cuBLAS), with the
    /// device's context made current on the calling thread.
    pub fn cu_stream(&self) -> Result<cudarc::driver::sys::CUstream> {
        self.ctx.bind_to_thread()?;
        Ok(self.stream.cu_stream())
    }

    fn function(&self, index: usize) -> Result<CudaFunction> {
        if let Some(function) = self.functions.lock().unwrap().get(&index) {
            return Ok(function.clone());
        }
        let kernel = &KERNELS[index];
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(kernel.source_file) {
                Some(module) => module.clone(),
                None => {
                    let source = kernel_source(kernel.source_file)?;
                    let cubin = self.nvrtc.compile(source, &self.arch, Output::Cubin)?;
                    let module = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                        .with_context(|| {
                            format!(
                                "the driver (CUDA {}) refused the cubin of kernels/{} that {} \
                                 compiled for {}",
                                self.driver,
                                kernel.source_file,
                                self.nvrtc.describe(),
                                self.arch
                            )
                        })?;
                    modules.insert(kernel.source_file, module.clone());
                    module
                }
            }
        };
        let function = module.load_function(kernel.name).with_context(|| {
            format!(
                "finding kernel `{}` in kernels/{}",
                kernel.name, kernel.source_file
            )
        })?;
        self.functions
            .lock()
            .unwrap()
            .insert(index, function.clone());
        Ok(function)
    }

    fn ensure_not_capturing(&self, what: &str) -> Result<()> {
        if !self.capturing.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.capture_refused
            .lock()
            .unwrap()
            .get_or_insert_with(|| what.to_string());
        anyhow::bail!(
            "{what} during graph capture: only launches and memsets may be issued while capturing \
             (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is invalidated)"
        )
    }

    /// cuLaunchKernelEx with programmatic stream serialization allowed: the kernel may start
    /// before the previous kernel of the stream has finished (its threads wait for it in
    /// `grid_dependency_wait()`). Captured into a graph as a programmatic edge (CUDA 12.3+).
    ///
    /// # Safety
    /// As cuLaunchKernel: `params` holds a valid pointer to each of the kernel's parameters.
    unsafe fn launch_programmatic(
        &self,
        function: &CudaFunction,
        config: &LaunchConfig,
        params: &mut [*mut c_void],
    ) -> std::result::Result<(), DriverError> {
        // SAFETY: all-zero bytes are a valid value of this plain C union.
        let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let launch = CUlaunchConfig {
            gridDimX: config.grid[0],
            gridDimY: config.grid[1],
            gridDimZ: config.grid[2],
            blockDimX: config.block[0],
            blockDimY: config.block[1],
            blockDimZ: config.block[2],
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: `launch` and `attribute` live through the call; see the function's contract.
        unsafe {
            cudarc::driver::sys::cuLaunchKernelEx(
                &launch,
                function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }

    fn address(buffer: &DeviceBuffer, offset_bytes: usize) -> CUdeviceptr {
        buffer.ptr() + offset_bytes as u64
    }
}

impl Device for GpuDevice {
    fn describe(&self) -> String {
        format!(
            "{} ({}, {} SMs, {} MiB L2), {}",
            self.name,
            self.arch,
            self.multiprocessors,
            self.l2_cache_bytes >> 20,
            self.versions()
        )
    }

    fn l2_cache_bytes(&self) -> Option<usize> {
        Some(self.l2_cache_bytes)
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.ensure_not_capturing("alloc")?;
        self.ctx.bind_to_thread()?;
        // cuMemAlloc rejects 0 bytes; an empty buffer still gets its own address.
        // SAFETY: plain allocation; freed by GpuAllocation's drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .with_context(|| format!("cuMemAlloc of {bytes} bytes on {}", self.name))?;
        self.allocated.fetch_add(bytes as u64, Ordering::Relaxed);
        let allocation = GpuAllocation {
            ptr,
            bytes,
            ctx: self.ctx.clone(),
            allocated: self.allocated.clone(),
        };
        Ok(DeviceBuffer::new(ptr, bytes, Box::new(allocation)))
    }

    fn copy_htod(&self, dst: &DeviceBuffer, offset_bytes: usize, src: &[u8]) -> Result<()> {
        self.ensure_not_capturing("copy_htod")?;
        dst.check_range(offset_bytes, src.len(), "copy_htod")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: the range was checked; a pageable source is staged before the call returns.
        unsafe {
            result::memcpy_htod_async(
                Self::address(dst, offset_bytes),
                src,
                self.stream.cu_stream(),
            )
        }
        .context("copy_htod")?;
        Ok(())
    }

    fn copy_dtoh(&self, src: &DeviceBuffer, offset_bytes: usize, dst: &mut [u8]) -> Result<()> {
        self.ensure_not_capturing("copy_dtoh")?;
        src.check_range(offset_bytes, dst.len(), "copy_dtoh")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: the range was checked; the stream is synchronised before dst is used.
        unsafe {
            result::memcpy_dtoh_async(
                dst,
                Self::address(src, offset_bytes),
                self.stream.cu_stream(),
            )
        }
        .context("copy_dtoh")?;
        self.stream.synchronize().context("copy_dtoh")?;
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
        self.ctx.bind_to_thread()?;
        // SAFETY: both ranges were checked.
        unsafe {
            result::memcpy_dtod_async(
                Self::address(dst, dst_offset),
                Self::address(src, src_offset),
                bytes,
                self.stream.cu_stream(),
            )
        }
        .context("copy_dtod")?;
        Ok(())
    }

    fn memset_zero(&self, buf: &DeviceBuffer, offset_bytes: usize, bytes: usize) -> Result<()> {
        buf.check_range(offset_bytes, bytes, "memset_zero")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: the range was checked.
        unsafe {
            result::memset_d8_async(
                Self::address(buf, offset_bytes),
                0,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .context("memset_zero")?;
        Ok(())
    }

    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let (index, signature) = kernel_signature(kernel)?;
        check_kernel_args(signature, args)?;
        let max_dynamic_shared = self.max_dynamic_shared.lock().unwrap().get(&index).copied();
        check_launch_limits(signature, &config, max_dynamic_shared)?;
        let function = self.function(index)?;
        // cuLaunchKernel(Ex) takes a pointer to each parameter's value and reads as many bytes
        // as the kernel's parameter has: a scalar's value sits in the low bytes of a 64-bit
        // slot, a layout is read from the `#[repr(C)]` struct itself (plain data laid out as
        // kv_layout.cuh's struct: static_asserts there, a const assert in src/kv/layout.rs).
        let slots = argument_slots(args);
        let mut params: Vec<*mut c_void> = Vec::with_capacity(args.len());
        let mut first_slot = 0;
        for arg in args {
            params.push(match arg {
                KernelArg::KvLayout(layout) => layout as *const KvLayout as *mut c_void,
                KernelArg::Ptr(_) | KernelArg::I32(_) | KernelArg::U32(_) | KernelArg::F32(_) => {
                    &slots[first_slot] as *const u64 as *mut c_void
                }
            });
            first_slot += arg.kind().slots();
        }
        let programmatic = config.programmatic && self.programmatic_launch;
        self.ctx.bind_to_thread()?;
        // SAFETY: arguments were checked against the kernel's parsed signature and `params`
        // points into `slots` and `args`, which outlive the call; pointer arguments are device
        // addresses whose validity is the caller's contract, as in CUDA.
        let launched = unsafe {
            if programmatic {
                self.launch_programmatic(&function, &config, &mut params)
            } else {
                result::launch_kernel(
                    function.cu_function(),
                    (config.grid[0], config.grid[1], config.grid[2]),
                    (config.block[0], config.block[1], config.block[2]),
                    config.shared_mem_bytes,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
        };
        launched.with_context(|| {
            format!(
                "launching `{kernel}` (grid {:?}, block {:?}{})",
                config.grid,
                config.block,
                if programmatic {
                    ", programmatic dependent launch"
                } else {
                    ""
                }
            )
        })?;
        Ok(())
    }

    fn set_max_dynamic_shared(&self, kernel: &str, bytes: u32) -> Result<()> {
        let (index, signature) = kernel_signature(kernel)?;
        check_max_dynamic_shared(signature, bytes)?;
        let function = self.function(index)?;
        self.ctx.bind_to_thread()?;
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .with_context(|| {
                format!("kernel `{kernel}`: setting {bytes} bytes of dynamic shared memory")
            })?;
        self.max_dynamic_shared.lock().unwrap().insert(index, bytes);
        Ok(())
    }

    fn multiprocessors(&self) -> u32 {
        self.multiprocessors as u32
    }

    fn max_active_blocks_per_multiprocessor(
        &self,
        kernel: &str,
        threads_per_block: u32,
        dynamic_shared_bytes: u32,
    ) -> Result<u32> {
        let (index, _) = kernel_signature(kernel)?;
        let function = self.function(index)?;
        self.ctx.bind_to_thread()?;
        function
            .occupancy_max_active_blocks_per_multiprocessor(
                threads_per_block,
                dynamic_shared_bytes as usize,
                None,
            )
            .with_context(|| {
                format!(
                    "cuOccupancyMaxActiveBlocksPerMultiprocessor of `{kernel}` ({threads_per_block} \
                     threads, {dynamic_shared_bytes} bytes of dynamic shared memory)"
                )
            })
    }

    fn synchronize(&self) -> Result<()> {
        self.ensure_not_capturing("synchronize")?;
        self.stream
            .synchronize()
            .context("synchronizing the CUDA stream")?;
        self.ctx
            .check_err()
            .context("an earlier asynchronous CUDA call failed")?;
        Ok(())
    }

    fn memory(&self) -> Result<DeviceMemory> {
        let (free, total) = self.ctx.mem_get_info().context("cuMemGetInfo")?;
        Ok(DeviceMemory {
            allocated_by_kvlab: self.allocated.load(Ordering::Relaxed),
            device_free: Some(free as u64),
            device_total: Some(total as u64),
        })
    }

    fn record_event(&self) -> Result<Event> {
        self.ensure_not_capturing("record_event")?;
        let event = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        event.record(&self.stream)?;
        Ok(Event(Box::new(event)))
    }

    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        let start = start
            .0
            .downcast_ref::<CudaEvent>()
            .context("event does not belong to this GPU")?;
        let end = end
            .0
            .downcast_ref::<CudaEvent>()
            .context("event does not belong to this GPU")?;
        Ok(start.elapsed_ms(end)?)
    }

    fn begin_capture(&self) -> Result<()> {
        ensure!(
            !self.capturing.swap(true, Ordering::Relaxed),
            "begin_capture while a capture is already running"
        );
        *self.capture_refused.lock().unwrap() = None;
        if let Err(error) = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            self.capturing.store(false, Ordering::Relaxed);
            return Err(error).context("cuStreamBeginCapture");
        }
        Ok(())
    }

    fn end_capture(&self) -> Result<Graph> {
        ensure!(
            self.capturing.load(Ordering::Relaxed),
            "end_capture without begin_capture"
        );
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        self.capturing.store(false, Ordering::Relaxed);
        if let Some(what) = self.capture_refused.lock().unwrap().take() {
            anyhow::bail!(
                "cuStreamEndCapture: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: {what} during the \
                 capture invalidated it"
            );
        }
        let graph = graph
            .context("cuStreamEndCapture")?
            .context("the captured graph is empty")?;
        Ok(Graph(Box::new(GpuGraph(Mutex::new(graph)))))
    }

    fn launch_graph(&self, graph: &Graph) -> Result<()> {
        self.ensure_not_capturing("launch_graph")?;
        let graph = graph
            .0
            .downcast_ref::<GpuGraph>()
            .context("graph does not belong to this GPU")?;
        graph.0.lock().unwrap().launch().context("cuGraphLaunch")?;
        Ok(())
    }
}
