use clap::Args;

#[derive(Args, Debug)]
pub struct KernelReportArgs {}

/// Registers, spills, stack and shared memory of every kernel for sm_80 and sm_90 (NVRTC + ptxas;
/// `scripts/setup-cuda-tools.sh` installs both).
pub fn run(_args: KernelReportArgs) -> anyhow::Result<()> {
    print!("{}", kvlab::backend::cuda::nvrtc::kernel_report()?);
    Ok(())
}
