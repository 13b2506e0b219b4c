//! CUDA graphs for repeated forward passes.
//!
//! Inside [`Backend::run_step`](crate::backend::Backend::run_step) the backend records its
//! launches instead of issuing them. At the end of the step the recorded list is compared with
//! the list of the graph captured earlier: equal (same kernels, grids and arguments, so the same
//! buffers) means the graph replays exactly the work this step asked for, and it is launched;
//! a list equal to the previous step's is captured into a new graph first; anything else is
//! launched one kernel at a time. Decode steps of the static and the dynamic cache repeat their
//! list exactly, because every kernel reads the step view (positions, lengths, block tables)
//! from device memory, which the host updates with copies before the step's launches; so does
//! any step with the same rows per sequence as the previous one, over the same sequences' count.
//! A step whose buffers changed (a new cache, larger activations, a step-view buffer grown, the
//! no-cache strategy's growing recompute) simply does not match, so a stale graph can never run.
//!
//! Copies run when they are issued. A copy issued after a launch was recorded would run before
//! it, so the step gives up recording: the launches recorded so far are issued, then the copy,
//! and the rest of the step runs launch by launch.
//!
//! With graphs off a step records all the same and issues its list at the end, launch by
//! launch: either way the step's start event is recorded just before its first launch reaches
//! the device, so that the device time of a step is the device's work (and, without graphs,
//! the gaps between its launches), not the host's time to build the list.
//!
//! A capture that fails (a driver that refuses it, an operation capture prohibits) is said
//! once on stderr; that step and every later one then run launch by launch.

use super::device::{Device, Event, Graph, KernelArg, LaunchConfig};
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

/// Counts of how steps ran since the backend started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    /// Steps run kernel by kernel: graphs off, a list seen for the first time, a step that
    /// gave up recording at a copy, or any step after a failed capture.
    pub steps_launched: u64,
    /// Steps captured into a new graph (then replayed).
    pub graphs_captured: u64,
    /// Steps that replayed the existing graph.
    pub graphs_replayed: u64,
    /// Captures that failed (at most one: after it, no step tries again).
    pub capture_failures: u64,
}

#[derive(Default)]
pub struct StepRecorder {
    /// Some while a step records; None again once it gives up at a copy.
    recording: Option<Vec<Launch>>,
    /// Whether this step may replay or capture a graph (graphs on).
    graphs: bool,
    /// Recorded just before the step's first launch was issued.
    step_start: Option<Event>,
    /// The previous step's launches, for the "seen twice" test.
    previous: Vec<Launch>,
    captured: Option<(Vec<Launch>, Graph)>,
    /// Why the capture failed; no capture is tried again.
    capture_error: Option<String>,
    /// Kernels and launch configurations of the latest step that recorded to its end.
    last_step: Vec<(&'static str, LaunchConfig)>,
    pub stats: GraphStats,
}

impl StepRecorder {
    /// Starts recording a step; `graphs`: it may run as a CUDA graph.
    pub fn begin(&mut self, graphs: bool) {
        self.recording = Some(Vec::new());
        self.graphs = graphs;
        self.step_start = None;
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Why graph capture failed, if it did (steps then run launch by launch).
    pub fn capture_error(&self) -> Option<&str> {
        self.capture_error.as_deref()
    }

    /// The launches of the latest step that recorded to its end (kernel, grid and block), in
    /// order, whether they were replayed, captured or launched (empty before the first).
    pub fn last_step(&self) -> &[(&'static str, LaunchConfig)] {
        &self.last_step
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

    /// Records the step's start event unless it has one: its device work begins now.
    fn mark_start(&mut self, device: &dyn Device) -> Result<()> {
        if self.step_start.is_none() {
            self.step_start = Some(device.record_event()?);
        }
        Ok(())
    }

    fn issue_all(&mut self, device: &dyn Device, list: &[Launch]) -> Result<()> {
        if !list.is_empty() {
            self.mark_start(device)?;
        }
        list.iter().try_for_each(|launch| launch.issue(device))
    }

    /// Called before a copy or a free: issues what was recorded so far and stops recording
    /// this step.
    pub fn flush_recording(&mut self, device: &dyn Device) -> Result<()> {
        if let Some(list) = self.recording.take() {
            if list.is_empty() {
                self.recording = Some(list);
                return Ok(());
            }
            self.issue_all(device, &list)?;
        }
        Ok(())
    }

    /// Ends the step: replays, captures or launches what it recorded. Returns the event
    /// recorded before the step's first launch (None: the step launched nothing).
    pub fn finish(&mut self, device: &dyn Device) -> Result<Option<Event>> {
        let Some(list) = self.recording.take() else {
            // Recording stopped at a copy; the launches already ran.
            self.stats.steps_launched += 1;
            return Ok(self.step_start.take());
        };
        self.last_step = list.iter().map(|l| (l.kernel, l.config)).collect();
        let graphs = self.graphs && self.capture_error.is_none();
        if let (true, Some((launches, graph))) = (graphs, &self.captured) {
            if *launches == list {
                let start = device.record_event()?;
                device.launch_graph(graph)?;
                self.stats.graphs_replayed += 1;
                return Ok(Some(start));
            }
        }
        if graphs && !list.is_empty() && list == self.previous {
            self.captured = None;
            match capture(device, &list) {
                Ok(graph) => {
                    let start = device.record_event()?;
                    device.launch_graph(&graph)?;
                    self.captured = Some((list, graph));
                    self.stats.graphs_captured += 1;
                    return Ok(Some(start));
                }
                Err(error) => {
                    eprintln!(
                        "kvlab: CUDA graph capture failed; this and every later step run launch \
                         by launch: {error:#}"
                    );
                    self.capture_error = Some(format!("{error:#}"));
                    self.stats.capture_failures += 1;
                }
            }
        }
        self.issue_all(device, &list)?;
        self.previous = list;
        self.stats.steps_launched += 1;
        Ok(self.step_start.take())
    }

    /// Drops the recording of a step whose forward pass failed.
    pub fn abandon(&mut self) {
        self.recording = None;
        self.step_start = None;
    }

    /// Forgets captured graphs (graphs switched off).
    pub fn clear(&mut self) {
        self.recording = None;
        self.step_start = None;
        self.previous.clear();
        self.captured = None;
    }
}

/// `list` captured into a graph; the capture is always ended, also when a launch failed.
fn capture(device: &dyn Device, list: &[Launch]) -> Result<Graph> {
    device.begin_capture()?;
    let issued = list.iter().try_for_each(|launch| launch.issue(device));
    let graph = device.end_capture();
    issued?;
    graph
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::device::{DeviceBuffer, DeviceMemory};
    use std::sync::Mutex;

    /// A device that logs what reaches it; its captures fail when `refuse_capture`.
    #[derive(Default)]
    struct LogDevice {
        log: Mutex<Vec<String>>,
        refuse_capture: bool,
    }

    impl LogDevice {
        fn push(&self, what: impl Into<String>) {
            self.log.lock().unwrap().push(what.into());
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    impl Device for LogDevice {
        fn describe(&self) -> String {
            "log".into()
        }
        fn l2_cache_bytes(&self) -> Option<usize> {
            None
        }
        fn alloc(&self, _: usize) -> Result<DeviceBuffer> {
            unimplemented!()
        }
        fn copy_htod(&self, _: &DeviceBuffer, _: usize, _: &[u8]) -> Result<()> {
            unimplemented!()
        }
        fn copy_dtoh(&self, _: &DeviceBuffer, _: usize, _: &mut [u8]) -> Result<()> {
            unimplemented!()
        }
        fn copy_dtod(
            &self,
            _: &DeviceBuffer,
            _: usize,
            _: &DeviceBuffer,
            _: usize,
            _: usize,
        ) -> Result<()> {
            unimplemented!()
        }
        fn memset_zero(&self, _: &DeviceBuffer, _: usize, _: usize) -> Result<()> {
            unimplemented!()
        }
        fn launch(&self, kernel: &str, _: LaunchConfig, _: &[KernelArg]) -> Result<()> {
            self.push(kernel);
            Ok(())
        }
        fn set_max_dynamic_shared(&self, _: &str, _: u32) -> Result<()> {
            unimplemented!()
        }
        fn multiprocessors(&self) -> u32 {
            unimplemented!()
        }
        fn max_active_blocks_per_multiprocessor(&self, _: &str, _: u32, _: u32) -> Result<u32> {
            unimplemented!()
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        fn memory(&self) -> Result<DeviceMemory> {
            unimplemented!()
        }
        fn record_event(&self) -> Result<Event> {
            self.push("event");
            Ok(Event(Box::new(())))
        }
        fn elapsed_ms(&self, _: &Event, _: &Event) -> Result<f32> {
            Ok(0.0)
        }
        fn begin_capture(&self) -> Result<()> {
            self.push("begin_capture");
            anyhow::ensure!(
                !self.refuse_capture,
                "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"
            );
            Ok(())
        }
        fn end_capture(&self) -> Result<Graph> {
            self.push("end_capture");
            Ok(Graph(Box::new(())))
        }
        fn launch_graph(&self, _: &Graph) -> Result<()> {
            self.push("graph");
            Ok(())
        }
    }

    fn launch(kernel: &'static str) -> Launch {
        Launch {
            kernel,
            config: LaunchConfig::linear(1, 32, 0),
            args: vec![KernelArg::I32(7)],
        }
    }

    /// One step of launches a and b, the host's work all done before `finish`.
    fn step(recorder: &mut StepRecorder, device: &LogDevice, graphs: bool) -> Option<Event> {
        let before = device.log.lock().unwrap().len();
        recorder.begin(graphs);
        recorder.launch(device, launch("a")).unwrap();
        recorder.launch(device, launch("b")).unwrap();
        assert_eq!(
            device.log.lock().unwrap().len(),
            before,
            "nothing is issued while the host records"
        );
        recorder.finish(device).unwrap()
    }

    #[test]
    fn the_step_is_timed_from_its_first_launch() {
        let device = LogDevice::default();
        let mut recorder = StepRecorder::default();
        assert!(step(&mut recorder, &device, true).is_some());
        assert_eq!(device.take(), ["event", "a", "b"]);
        // The same list again: captured, then the start event, then the replay.
        step(&mut recorder, &device, true);
        assert_eq!(
            device.take(),
            ["begin_capture", "a", "b", "end_capture", "event", "graph"]
        );
        step(&mut recorder, &device, true);
        assert_eq!(device.take(), ["event", "graph"]);
        // Graphs off: recorded all the same, issued together after the start event.
        recorder.clear();
        step(&mut recorder, &device, false);
        step(&mut recorder, &device, false);
        assert_eq!(device.take(), ["event", "a", "b", "event", "a", "b"]);
        assert_eq!(
            recorder.stats,
            GraphStats {
                steps_launched: 3,
                graphs_captured: 1,
                graphs_replayed: 1,
                capture_failures: 0
            }
        );
    }

    #[test]
    fn a_copy_mid_step_starts_the_timing_where_the_launches_go() {
        let device = LogDevice::default();
        let mut recorder = StepRecorder::default();
        recorder.begin(true);
        recorder.flush_recording(&device).unwrap(); // a copy before any launch: nothing to issue
        recorder.launch(&device, launch("a")).unwrap();
        recorder.flush_recording(&device).unwrap(); // a copy after one
        recorder.launch(&device, launch("b")).unwrap(); // issued at once now
        assert!(recorder.finish(&device).unwrap().is_some());
        assert_eq!(device.take(), ["event", "a", "b"]);
    }

    #[test]
    fn a_refused_capture_is_tried_once_and_the_steps_still_run() {
        let device = LogDevice {
            refuse_capture: true,
            ..LogDevice::default()
        };
        let mut recorder = StepRecorder::default();
        for _ in 0..3 {
            step(&mut recorder, &device, true);
        }
        assert_eq!(
            device.take(),
            [
                "event",
                "a",
                "b",
                "begin_capture",
                "event",
                "a",
                "b",
                "event",
                "a",
                "b"
            ]
        );
        assert_eq!(recorder.stats.capture_failures, 1);
        assert_eq!(recorder.stats.steps_launched, 3);
        assert!(recorder
            .capture_error()
            .unwrap()
            .contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"));
    }
}
