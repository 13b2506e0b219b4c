//! CUDA graphs for repeated forward passes.
//!
//! Inside [`Backend::run_step`](crate::backend::Backend::run_step) the backend records its
//! launches instead of issuing them. At the end of the step the recorded list is compared with
//! the list of the graph captured earlier: equal (same kernels, grids and arguments, so the same
//! buffers) means the graph replays exactly the work this step asked for, and it is launched;
//! a list equal to the previous step's is captured into a new graph first; anything else is
//! launched one kernel at a time. Decode steps of the static and the dynamic cache repeat their
//! list exactly, because every kernel reads positions, lengths and the chunk table from device
//! memory, which the host updates with copies before the step's launches. A step whose buffers
//! changed (a new cache, larger activations, the no-cache strategy's growing recompute) simply
//! does not match, so a stale graph can never run.
//!
//! Copies run when they are issued. A copy issued after a launch was recorded would run before
//! it, so the step gives up recording: the launches recorded so far are issued, then the copy,
//! and the rest of the step runs launch by launch.

use super::device::{Device, Graph, KernelArg, LaunchConfig};
use anyhow::Result;

/// One kernel launch, as issued to the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub config: LaunchConfig,
    pub args: Vec<KernelArg>,
}

impl Launch {
    pub fn issue(&self, device: &dyn Device) -> Result<()> {
        device.launch(self.kernel, self.config, &self.args)
    }
}

/// How the last step ran (for tests and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepExecution {
    /// Kernel by kernel (graphs off, a first sighting, or a step that had to give up recording).
    Launches,
    /// Captured into a new graph, then replayed.
    Captured,
    /// An existing graph replayed.
    Replayed,
}

/// Counts of how steps ran since the backend started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    pub steps_launched: u64,
    pub graphs_captured: u64,
    pub graphs_replayed: u64,
}

#[derive(Default)]
pub struct StepRecorder {
    /// Some while a step records; None again once it gives up at a copy.
    recording: Option<Vec<Launch>>,
    /// The previous step's launches, for the "seen twice" test.
    previous: Vec<Launch>,
    captured: Option<(Vec<Launch>, Graph)>,
    pub stats: GraphStats,
    pub last: Option<StepExecution>,
}

impl StepRecorder {
    pub fn begin(&mut self) {
        self.recording = Some(Vec::new());
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Records `launch` if a step is recording, else issues it.
    pub fn launch(&mut self, device: &dyn Device, launch: Launch) -> Result<()> {
        match self.recording.as_mut() {
            Some(list) => {
                list.push(launch);
                Ok(())
            }
            None => launch.issue(device),
        }
    }

    /// Called before a copy or a free: issues what was recorded so far and stops recording
    /// this step.
    pub fn flush_recording(&mut self, device: &dyn Device) -> Result<()> {
        if let Some(list) = self.recording.take() {
            if list.is_empty() {
                self.recording = Some(list);
                return Ok(());
            }
            for launch in &list {
                launch.issue(device)?;
            }
        }
        Ok(())
    }

    /// Ends the step: replays, captures or launches what it recorded.
    pub fn finish(&mut self, device: &dyn Device) -> Result<()> {
        let Some(list) = self.recording.take() else {
            // Recording stopped at a copy; the launches already ran.
            self.stats.steps_launched += 1;
            self.last = Some(StepExecution::Launches);
            return Ok(());
        };
        if let Some((launches, graph)) = &self.captured {
            if *launches == list {
                device.launch_graph(graph)?;
                self.stats.graphs_replayed += 1;
                self.last = Some(StepExecution::Replayed);
                return Ok(());
            }
        }
        if !list.is_empty() && list == self.previous {
            self.captured = None;
            device.begin_capture()?;
            let issued = list.iter().try_for_each(|l| l.issue(device));
            let graph = device.end_capture();
            issued?;
            let graph = graph?;
            device.launch_graph(&graph)?;
            self.captured = Some((list, graph));
            self.stats.graphs_captured += 1;
            self.last = Some(StepExecution::Captured);
            return Ok(());
        }
        for launch in &list {
            launch.issue(device)?;
        }
        self.previous = list;
        self.stats.steps_launched += 1;
        self.last = Some(StepExecution::Launches);
        Ok(())
    }

    /// Counts a step that ran with graphs off.
    pub fn note_launched(&mut self) {
        self.stats.steps_launched += 1;
        self.last = Some(StepExecution::Launches);
    }

    /// Drops the recording of a step whose forward pass failed.
    pub fn abandon(&mut self) {
        self.recording = None;
    }

    /// Forgets captured graphs (graphs switched off).
    pub fn clear(&mut self) {
        self.recording = None;
        self.previous.clear();
        self.captured = None;
    }
}
