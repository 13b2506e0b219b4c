//! One `serve-bench` run: conversations replayed against the scheduler at one load, in one
//! mode, measured request by request and step by step.
//!
//! The load is either closed (`--concurrency C`: C clients, each running one conversation at a
//! time and taking the next when it ends) or open (`--arrival-rate R`: conversations start at
//! the times of a seeded Poisson process of R per second; or at the times a trace gives). In
//! both, a conversation's next turn is sent the moment its previous one is answered (no think
//! time), so that each turn is one request. Times are the wall clock from the run's start;
//! every event of a step (a request admitted, preempted, given a token, finished) is dated by
//! the end of that step.

use super::scheduler::{Mode, Request, Scheduler, SchedulerOptions, StepReport};
use super::workload::{Conversation, ConversationState};
use crate::generate::Generator;
use crate::model::tokenizer::{ChatOptions, Tokenizer};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution as _, Exp};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How conversations arrive.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// A closed loop of this many clients.
    Concurrency(usize),
    /// Conversations per second, Poisson.
    ArrivalRate(f64),
    /// At the times the trace gives.
    TraceTimes,
}

impl Load {
    /// The value plotted on a load axis: clients, or conversations per second.
    pub fn value(&self) -> f64 {
        match *self {
            Load::Concurrency(c) => c as f64,
            Load::ArrivalRate(r) => r,
            Load::TraceTimes => 0.0,
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "concurrency {c}"),
            Load::ArrivalRate(r) => write!(f, "{r} conversations/s"),
            Load::TraceTimes => f.write_str("the trace's arrival times"),
        }
    }
}

/// One run's settings.
#[derive(Clone, Debug, Serialize)]
pub struct RunOptions {
    pub scheduler: SchedulerOptions,
    /// Positions per chunk of the paged pool.
    pub chunk_tokens: usize,
    pub load: Load,
    /// Seed of the Poisson arrivals.
    pub seed: u64,
}

/// One request's measures: a row of `requests.csv`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestRecord {
    pub mode: Mode,
    pub load: String,
    pub request: u64,
    pub conversation: String,
    /// 1-based.
    pub turn: usize,
    pub success: bool,
    pub error: String,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Of the prompt, tokens found cached at its first admission (prefix reuse).
    pub reused_tokens: usize,
    /// Seconds from the run's start.
    pub arrival_seconds: f64,
    /// From arrival to the first admission.
    pub queue_seconds: f64,
    /// From arrival to the first token.
    pub ttft_seconds: f64,
    /// From arrival to the last token.
    pub latency_seconds: f64,
    /// Mean time between its tokens after the first (time per output token).
    pub tpot_seconds: f64,
    pub preemptions: usize,
    /// Positions computed again after its preemptions.
    pub recomputed_tokens: usize,
    /// Its sequence when it finished: bytes held, and bytes of written positions.
    pub kv_reserved_bytes: u64,
    pub kv_live_bytes: u64,
    pub stopped_on_eos: bool,
}

/// The pool and the queues after one step: a row of `timeline.csv`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineSample {
    pub mode: Mode,
    pub load: String,
    /// End of the step, from the run's start.
    pub seconds: f64,
    pub step_seconds: f64,
    pub decode_rows: usize,
    pub prefill_rows: usize,
    /// Sequences in the step.
    pub sequences: usize,
    /// Requests admitted (holding a sequence) and waiting, after the step.
    pub running: usize,
    pub waiting: usize,
    /// Conversations keeping their sequence between turns.
    pub kept: usize,
    pub reserved_bytes: u64,
    pub live_bytes: u64,
    pub cached_idle_bytes: u64,
    pub capacity_bytes: u64,
}

/// A preemption as the results state it: a row of `preemptions.csv`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreemptionRecord {
    pub mode: Mode,
    pub load: String,
    pub seconds: f64,
    pub request: u64,
    pub conversation: String,
    pub turn: usize,
    pub sequence: String,
    pub positions_freed: usize,
    pub reason: String,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct RunOutcome {
    pub requests: Vec<RequestRecord>,
    pub timeline: Vec<TimelineSample>,
    pub preemptions: Vec<PreemptionRecord>,
    /// Every gap between two consecutive tokens of a request, in seconds.
    pub inter_token_seconds: Vec<f64>,
    pub wall_seconds: f64,
    /// Stopped by the stop flag before every conversation ended.
    pub interrupted: bool,
}

/// Hooks for progress display and incremental output; every method has a do-nothing default.
/// An error from any of them stops the run (e.g. a results file cannot be written).
pub trait Observer {
    fn step(&mut self, _sample: &TimelineSample, _report: &StepReport) -> Result<()> {
        Ok(())
    }
    fn preempted(&mut self, _preemption: &PreemptionRecord) -> Result<()> {
        Ok(())
    }
    fn request_finished(&mut self, _record: &RequestRecord) -> Result<()> {
        Ok(())
    }
}

impl Observer for () {}

/// A request sent and not yet finished.
struct InFlight {
    conversation: usize,
    turn: usize,
    prompt_tokens: usize,
    arrival: f64,
    admitted: Option<f64>,
    token_times: Vec<f64>,
}

/// Replays `conversations` on `generator` at `opts.load`; `stop` is checked between steps.
pub fn run(
    generator: &mut dyn Generator,
    tokenizer: Option<&Tokenizer>,
    chat: &ChatOptions,
    conversations: &[Conversation],
    opts: &RunOptions,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<RunOutcome> {
    let sched = &opts.scheduler;
    generator.clear_kv_cache()?;
    generator.open_kv_pool(sched.mode.strategy(sched.prefix_reuse), opts.chunk_tokens)?;
    let mut run = Run {
        scheduler: Scheduler::new(sched.clone())?,
        tokenizer,
        chat,
        conversations,
        label: opts.load.to_string(),
        mode: sched.mode,
        states: vec![None; conversations.len()],
        in_flight: HashMap::new(),
        next_request: 0,
        started: Instant::now(),
        outcome: RunOutcome::default(),
    };
    let result = run.replay(generator, opts, stop, observer);
    // Whatever happened, the pool is left empty for the next run.
    let pool = generator.kv_pool_mut()?;
    run.scheduler.release_all(pool)?;
    pool.clear_cached();
    result?;
    run.outcome.wall_seconds = run.started.elapsed().as_secs_f64();
    Ok(run.outcome)
}

struct Run<'a> {
    scheduler: Scheduler,
    tokenizer: Option<&'a Tokenizer>,
    chat: &'a ChatOptions,
    conversations: &'a [Conversation],
    label: String,
    mode: Mode,
    /// Per conversation: its history while it runs.
    states: Vec<Option<ConversationState>>,
    in_flight: HashMap<u64, InFlight>,
    next_request: u64,
    started: Instant,
    outcome: RunOutcome,
}

impl Run<'_> {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn replay(
        &mut self,
        generator: &mut dyn Generator,
        opts: &RunOptions,
        stop: &AtomicBool,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        // Conversations not started yet, with their start times (closed loop: none, a client
        // takes the next one when it is free).
        let mut starts: VecDeque<(usize, Option<f64>)> = match opts.load {
            Load::Concurrency(_) => (0..self.conversations.len()).map(|i| (i, None)).collect(),
            Load::ArrivalRate(rate) => {
                let gaps = Exp::new(rate).context("the arrival rate")?;
                let mut rng = StdRng::seed_from_u64(opts.seed);
                let mut t = 0.0;
                (0..self.conversations.len())
                    .map(|i| {
                        let start = t;
                        t += gaps.sample(&mut rng);
                        (i, Some(start))
                    })
                    .collect()
            }
            Load::TraceTimes => {
                let mut timed: Vec<(usize, Option<f64>)> = Vec::new();
                for (i, c) in self.conversations.iter().enumerate() {
                    let t = c
                        .arrival_seconds
                        .with_context(|| format!("conversation {} has no arrival time", c.name))?;
                    timed.push((i, Some(t)));
                }
                timed.sort_by(|a, b| a.1.partial_cmp(&b.1).expect("finite times"));
                timed.into()
            }
        };
        let clients = match opts.load {
            Load::Concurrency(c) => c,
            _ => usize::MAX,
        };
        let mut active = 0;
        loop {
            if stop.load(Ordering::SeqCst) {
                self.outcome.interrupted = true;
                return Ok(());
            }
            let now = self.now();
            while let Some(&(conversation, start)) = starts.front() {
                let due = start.is_none_or(|t| t <= now);
                if !due || active >= clients {
                    break;
                }
                starts.pop_front();
                active += 1;
                self.states[conversation] =
                    Some(ConversationState::new(&self.conversations[conversation]));
                active -=
                    self.send_next_turn(generator, conversation, start.unwrap_or(now), observer)?;
            }
            if self.scheduler.is_idle() {
                match starts.front() {
                    None => return Ok(()),
                    Some(&(_, Some(t))) if active < clients => {
                        std::thread::sleep(Duration::from_secs_f64((t - now).max(0.0)));
                        continue;
                    }
                    Some(_) => bail!("no request in flight, yet no client is free"),
                }
            }
            let step_started = Instant::now();
            let report = self.scheduler.step(generator)?;
            let step_seconds = step_started.elapsed().as_secs_f64();
            let t = self.now();
            active -= self.record_step(generator, &report, t, observer)?;
            let stats = generator.kv_pool_mut()?.stats();
            let sample = TimelineSample {
                mode: self.mode,
                load: self.label.clone(),
                seconds: t,
                step_seconds,
                decode_rows: report.decode_rows,
                prefill_rows: report.prefill_rows,
                sequences: report.sequences,
                running: self.scheduler.running(),
                waiting: self.scheduler.waiting(),
                kept: self.scheduler.kept(),
                reserved_bytes: stats.reserved_bytes,
                live_bytes: stats.live_bytes,
                cached_idle_bytes: stats.cached_idle_bytes,
                capacity_bytes: stats.capacity_bytes,
            };
            observer.step(&sample, &report)?;
            self.outcome.timeline.push(sample);
        }
    }

    /// Dates the step's events, records finished requests and sends their conversations' next
    /// turns; returns how many conversations ended.
    fn record_step(
        &mut self,
        generator: &mut dyn Generator,
        report: &StepReport,
        t: f64,
        observer: &mut dyn Observer,
    ) -> Result<usize> {
        for admission in &report.admitted {
            let request = self
                .in_flight
                .get_mut(&admission.request)
                .expect("in flight");
            request.admitted.get_or_insert(t);
        }
        for p in &report.preempted {
            let request = &self.in_flight[&p.request];
            let record = PreemptionRecord {
                mode: self.mode,
                load: self.label.clone(),
                seconds: t,
                request: p.request,
                conversation: self.conversations[request.conversation].name.clone(),
                turn: request.turn,
                sequence: p.sequence.clone(),
                positions_freed: p.positions_freed,
                reason: p.reason.clone(),
            };
            observer.preempted(&record)?;
            self.outcome.preemptions.push(record);
        }
        for token in &report.tokens {
            let request = self.in_flight.get_mut(&token.request).expect("in flight");
            if let Some(&last) = request.token_times.last() {
                self.outcome.inter_token_seconds.push(t - last);
            }
            request.token_times.push(t);
        }
        let mut ended = 0;
        for done in &report.finished {
            let request = self.in_flight.remove(&done.request).expect("in flight");
            let first = request.token_times[0];
            let outputs = done.new_ids.len();
            let record = RequestRecord {
                success: true,
                output_tokens: outputs,
                reused_tokens: done.reuse.reused_tokens,
                queue_seconds: request.admitted.unwrap_or(t) - request.arrival,
                ttft_seconds: first - request.arrival,
                latency_seconds: t - request.arrival,
                tpot_seconds: if outputs > 1 {
                    (t - first) / (outputs - 1) as f64
                } else {
                    0.0
                },
                preemptions: done.preemptions,
                recomputed_tokens: done.recomputed_tokens,
                kv_reserved_bytes: done.kv.reserved_bytes,
                kv_live_bytes: done.kv.live_bytes,
                stopped_on_eos: done.stopped_on_eos,
                ..self.unmeasured(done.request, &request)
            };
            observer.request_finished(&record)?;
            self.outcome.requests.push(record);
            let conversation = request.conversation;
            if let Some(state) = self.states[conversation].as_mut() {
                state.answered(&done.new_ids, self.tokenizer);
            }
            ended += self.send_next_turn(generator, conversation, t, observer)?;
        }
        Ok(ended)
    }

    /// Sends a conversation's next turn at `arrival` (a turn refused by the scheduler is
    /// recorded as failed, and the one after it is sent); returns 1 when it has no more turns.
    fn send_next_turn(
        &mut self,
        generator: &mut dyn Generator,
        conversation: usize,
        arrival: f64,
        observer: &mut dyn Observer,
    ) -> Result<usize> {
        let conv = &self.conversations[conversation];
        loop {
            let state = self.states[conversation]
                .as_mut()
                .expect("a started conversation has a state");
            let Some(turn) = state.next_turn(conv) else {
                self.states[conversation] = None;
                let pool = generator.kv_pool_mut()?;
                self.scheduler.end_conversation(pool, conversation as u64)?;
                return Ok(1);
            };
            let (prompt, max_new_tokens) = state.next_prompt(conv, self.tokenizer, self.chat)?;
            let id = self.next_request;
            self.next_request += 1;
            let in_flight = InFlight {
                conversation,
                turn,
                prompt_tokens: prompt.len(),
                arrival,
                admitted: None,
                token_times: Vec::new(),
            };
            let request = Request {
                id,
                conversation: conversation as u64,
                prompt,
                max_new_tokens,
            };
            match self.scheduler.submit(generator.kv_pool_mut()?, request) {
                Ok(()) => {
                    self.in_flight.insert(id, in_flight);
                    return Ok(0);
                }
                Err(e) => {
                    let record = RequestRecord {
                        error: format!("{e:#}"),
                        ..self.unmeasured(id, &in_flight)
                    };
                    observer.request_finished(&record)?;
                    self.outcome.requests.push(record);
                    if let Some(state) = self.states[conversation].as_mut() {
                        state.answered(&[], self.tokenizer);
                    }
                }
            }
        }
    }

    /// A record of a request with nothing measured yet (and not successful).
    fn unmeasured(&self, id: u64, request: &InFlight) -> RequestRecord {
        RequestRecord {
            mode: self.mode,
            load: self.label.clone(),
            request: id,
            conversation: self.conversations[request.conversation].name.clone(),
            turn: request.turn,
            success: false,
            error: String::new(),
            prompt_tokens: request.prompt_tokens,
            output_tokens: 0,
            reused_tokens: 0,
            arrival_seconds: request.arrival,
            queue_seconds: 0.0,
            ttft_seconds: 0.0,
            latency_seconds: 0.0,
            tpot_seconds: 0.0,
            preemptions: 0,
            recomputed_tokens: 0,
            kv_reserved_bytes: 0,
            kv_live_bytes: 0,
            stopped_on_eos: false,
        }
    }
}
