//! What `kvlab serve-bench` replays: conversations whose turns are requests, each sent when
//! the previous one is answered. Two kinds:
//!
//! - **Copies of the study's scenarios**: conversation `i` is a copy of a scenario drawn with
//!   the workload seed; its history is templated by the model's chat template every turn, as
//!   the study's protocol does. The copies differ from their first user message on (it starts
//!   with "Customer i: "), so that they share the system prompt and nothing more.
//! - **A multi-turn trace**, in the shape of vLLM's `benchmarks/multi_turn` generator
//!   (`generate_multi_turn.json`): a prefix shared by every conversation, a prefix of each
//!   conversation's own, then turns of a user message and an answer of given lengths. The
//!   trace holds lengths; the token ids come from the workload seed. It is generated
//!   ([`synthetic_trace`]) or read from a file of JSON lines ([`parse_trace`]), one
//!   conversation per line:
//!
//! ```json
//! {"conversation": "c0", "shared_prefix_tokens": 500, "prefix_tokens": 812, "turns": [{"user_tokens": 143, "answer_tokens": 97}], "arrival_seconds": 0.0}
//! ```
//!
//! `conversation` (a unique name) and `turns` (at least one, each with two positive counts)
//! are required; the prefixes default to 0; `arrival_seconds`, when given, must be given on
//! every line, and then conversations start at those times. Every conversation's shared prefix
//! is the start of one seeded sequence, so two lengths share their common part.

use crate::model::tokenizer::{ChatOptions, Message, Tokenizer};
use crate::scenario::protocol::message;
use crate::scenario::scenarios::Scenario;
use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution as _, LogNormal};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

/// A count given as `N` or as a range `A-B` (inclusive), drawn uniformly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CountRange {
    pub min: usize,
    pub max: usize,
}

impl CountRange {
    pub fn draw(&self, rng: &mut StdRng) -> usize {
        rng.random_range(self.min..=self.max)
    }
}

impl std::str::FromStr for CountRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{text:?} is not a count or a range of counts (e.g. 12-18)"))
        };
        let (min, max) = match text.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(text)?, parse(text)?),
        };
        if min == 0 || max < min {
            return Err(format!(
                "{text:?}: a range runs from at least 1 up to a larger or equal count"
            ));
        }
        Ok(CountRange { min, max })
    }
}

impl std::fmt::Display for CountRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// One turn of a trace: lengths only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TraceTurn {
    pub user_tokens: usize,
    pub answer_tokens: usize,
}

/// One line of a trace.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TraceConversation {
    pub conversation: String,
    pub shared_prefix_tokens: usize,
    pub prefix_tokens: usize,
    pub turns: Vec<TraceTurn>,
    pub arrival_seconds: Option<f64>,
}

/// The shape of a generated trace, as vLLM's `generate_multi_turn.json` states it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TraceShape {
    pub conversations: usize,
    pub turns: CountRange,
    /// Constant, shared by every conversation.
    pub shared_prefix_tokens: usize,
    /// Each conversation's own prefix: lognormal with this mean, at most 5 times it (vLLM:
    /// average 1000, max 5000); 0 for none.
    pub prefix_tokens_mean: usize,
    pub user_tokens: CountRange,
    pub answer_tokens: CountRange,
}

/// A trace of `shape`, drawn with `seed`.
pub fn synthetic_trace(shape: &TraceShape, seed: u64) -> Result<Vec<TraceConversation>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mean = shape.prefix_tokens_mean as f64;
    // A lognormal of mean `mean` with sigma 1: mu = ln(mean) - sigma^2 / 2.
    let prefix = (mean > 0.0)
        .then(|| LogNormal::new(mean.ln() - 0.5, 1.0))
        .transpose()
        .context("the conversation prefix's distribution")?;
    Ok((0..shape.conversations)
        .map(|i| TraceConversation {
            conversation: format!("c{i}"),
            shared_prefix_tokens: shape.shared_prefix_tokens,
            prefix_tokens: prefix.map_or(0, |d| {
                (d.sample(&mut rng).round() as usize).clamp(1, 5 * shape.prefix_tokens_mean)
            }),
            turns: (0..shape.turns.draw(&mut rng))
                .map(|_| TraceTurn {
                    user_tokens: shape.user_tokens.draw(&mut rng),
                    answer_tokens: shape.answer_tokens.draw(&mut rng),
                })
                .collect(),
            arrival_seconds: None,
        })
        .collect())
}

/// The trace as JSON lines (the format [`parse_trace`] reads).
pub fn trace_to_jsonl(trace: &[TraceConversation]) -> String {
    let mut text = String::new();
    for c in trace {
        let mut line = json!({
            "conversation": c.conversation,
            "shared_prefix_tokens": c.shared_prefix_tokens,
            "prefix_tokens": c.prefix_tokens,
            "turns": c.turns,
        });
        if let Some(t) = c.arrival_seconds {
            line["arrival_seconds"] = json!(t);
        }
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text
}

/// Reads a trace file (JSON lines).
pub fn read_trace(path: &Path) -> Result<Vec<TraceConversation>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trace file {}", path.display()))?;
    parse_trace(&text, &path.display().to_string())
}

/// Parses a trace; errors name `origin`, the line and the field. Blank lines are skipped.
pub fn parse_trace(text: &str, origin: &str) -> Result<Vec<TraceConversation>> {
    let mut trace: Vec<TraceConversation> = Vec::new();
    // The line of each conversation of `trace`.
    let mut line_numbers = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{origin}, line {}", index + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{at}: not a JSON object: {e}"))?;
        let Value::Object(fields) = value else {
            bail!("{at}: a line is one JSON object (a conversation)");
        };
        let c = conversation_of(&fields).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        if let Some(first) = trace.iter().position(|t| t.conversation == c.conversation) {
            bail!(
                "{at}: field `conversation`: {:?} is also the name on line {}",
                c.conversation,
                line_numbers[first]
            );
        }
        if let Some(previous) = trace.last() {
            ensure!(
                previous.arrival_seconds.is_some() == c.arrival_seconds.is_some(),
                "{at}: field `arrival_seconds`: given on some lines and not on others (give it on \
                 every line, or on none)"
            );
        }
        trace.push(c);
        line_numbers.push(index + 1);
    }
    ensure!(
        !trace.is_empty(),
        "{origin}: the trace holds no conversation"
    );
    Ok(trace)
}

fn conversation_of(fields: &Map<String, Value>) -> Result<TraceConversation> {
    const KNOWN: [&str; 5] = [
        "conversation",
        "shared_prefix_tokens",
        "prefix_tokens",
        "turns",
        "arrival_seconds",
    ];
    if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        bail!(
            "unknown field `{unknown}` (a line has {})",
            KNOWN.map(|k| format!("`{k}`")).join(", ")
        );
    }
    let conversation = match fields.get("conversation") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(other) => bail!("field `conversation`: expected a non-empty string, found {other}"),
        None => bail!("field `conversation` is missing"),
    };
    let count = |name: &str, value: &Value, positive: bool| -> Result<usize> {
        match value.as_u64() {
            Some(n) if n > 0 || !positive => Ok(n as usize),
            _ => bail!(
                "field `{name}`: expected a {} integer, found {value}",
                if positive { "positive" } else { "non-negative" }
            ),
        }
    };
    let optional_count =
        |name: &str| -> Result<usize> { fields.get(name).map_or(Ok(0), |v| count(name, v, false)) };
    let turns = match fields.get("turns") {
        Some(Value::Array(turns)) if !turns.is_empty() => turns,
        Some(other) => bail!("field `turns`: expected a non-empty array of turns, found {other}"),
        None => bail!("field `turns` is missing"),
    };
    let turns = turns
        .iter()
        .enumerate()
        .map(|(i, turn)| {
            let field = |name: &str| -> Result<usize> {
                let path = format!("turns[{i}].{name}");
                let value = turn
                    .get(name)
                    .with_context(|| format!("field `{path}` is missing"))?;
                count(&path, value, true)
            };
            if let Some(unknown) = turn
                .as_object()
                .and_then(|t| t.keys().find(|k| *k != "user_tokens" && *k != "answer_tokens"))
            {
                bail!("unknown field `turns[{i}].{unknown}` (a turn has `user_tokens`, `answer_tokens`)");
            }
            Ok(TraceTurn {
                user_tokens: field("user_tokens")?,
                answer_tokens: field("answer_tokens")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let arrival_seconds = match fields.get("arrival_seconds") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(t) if t >= 0.0 && t.is_finite() => Some(t),
            _ => bail!("field `arrival_seconds`: expected a number of seconds >= 0, found {v}"),
        },
    };
    Ok(TraceConversation {
        conversation,
        shared_prefix_tokens: optional_count("shared_prefix_tokens")?,
        prefix_tokens: optional_count("prefix_tokens")?,
        turns,
        arrival_seconds,
    })
}

/// How a conversation's prompts are made.
#[derive(Clone, Debug, PartialEq)]
pub enum Script {
    /// The system prompt, then one user message per turn, the history templated by the model's
    /// chat template every turn; answers of `max_new_tokens`.
    Chat {
        system: String,
        users: Vec<String>,
        max_new_tokens: usize,
    },
    /// Token ids: a prefix, then per turn the user's ids and the answer's length.
    Tokens {
        prefix: Vec<u32>,
        turns: Vec<(Vec<u32>, usize)>,
    },
}

/// A conversation to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub name: String,
    /// When it starts (seconds into the run); `None`: as the run's clients or arrival rate
    /// decide.
    pub arrival_seconds: Option<f64>,
    pub script: Script,
}

impl Conversation {
    pub fn turns(&self) -> usize {
        match &self.script {
            Script::Chat { users, .. } => users.len(),
            Script::Tokens { turns, .. } => turns.len(),
        }
    }
}

/// `count` copies of `scenarios`, each drawn with `seed`, running `turns` of their turns (at
/// most all of them) with answers of `max_new_tokens`.
pub fn scenario_copies(
    scenarios: &[Scenario],
    count: usize,
    turns: CountRange,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<Conversation>> {
    ensure!(!scenarios.is_empty(), "no scenario to copy");
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let scenario = scenarios.choose(&mut rng).expect("not empty");
            let mut users: Vec<String> = scenario
                .turns
                .iter()
                .take(turns.draw(&mut rng))
                .cloned()
                .collect();
            users[0] = format!("Customer {i}: {}", users[0]);
            Ok(Conversation {
                name: format!("{}#{i}", scenario.name),
                arrival_seconds: None,
                script: Script::Chat {
                    system: scenario.system_prompt.clone(),
                    users,
                    max_new_tokens,
                },
            })
        })
        .collect()
}

/// The conversations of a trace, their ids drawn from `ids` with `seed`: the shared prefix
/// from one sequence, everything else from one per conversation (by its name).
pub fn trace_conversations(
    trace: &[TraceConversation],
    ids: &[u32],
    seed: u64,
) -> Result<Vec<Conversation>> {
    ensure!(!ids.is_empty(), "no token id to draw a trace's tokens from");
    let longest_shared = trace
        .iter()
        .map(|c| c.shared_prefix_tokens)
        .max()
        .unwrap_or(0);
    let draw = |rng: &mut StdRng, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| *ids.choose(rng).expect("not empty"))
            .collect()
    };
    let shared = draw(&mut rng_for(seed, "shared prefix"), longest_shared);
    Ok(trace
        .iter()
        .map(|c| {
            let mut rng = rng_for(seed, &c.conversation);
            let mut prefix = shared[..c.shared_prefix_tokens].to_vec();
            prefix.extend(draw(&mut rng, c.prefix_tokens));
            let turns = c
                .turns
                .iter()
                .map(|t| (draw(&mut rng, t.user_tokens), t.answer_tokens))
                .collect();
            Conversation {
                name: c.conversation.clone(),
                arrival_seconds: c.arrival_seconds,
                script: Script::Tokens { prefix, turns },
            }
        })
        .collect())
}

/// A generator seeded by `seed` and `name` (stable across platforms and Rust versions).
fn rng_for(seed: u64, name: &str) -> StdRng {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    StdRng::from_seed(digest.into())
}

/// A conversation in progress: what it said so far, and which turn comes next.
#[derive(Clone, Debug)]
pub struct ConversationState {
    next_turn: usize,
    history: History,
}

#[derive(Clone, Debug)]
enum History {
    Messages(Vec<Message>),
    Tokens(Vec<u32>),
}

impl ConversationState {
    pub fn new(conversation: &Conversation) -> ConversationState {
        let history = match &conversation.script {
            Script::Chat { system, .. } => History::Messages(vec![message("system", system)]),
            Script::Tokens { prefix, .. } => History::Tokens(prefix.clone()),
        };
        ConversationState {
            next_turn: 0,
            history,
        }
    }

    /// 1-based number of the turn [`Self::next_prompt`] gives; `None` when all are done.
    pub fn next_turn(&self, conversation: &Conversation) -> Option<usize> {
        (self.next_turn < conversation.turns()).then_some(self.next_turn + 1)
    }

    /// The next turn's prompt and how many tokens to generate; the user's message joins the
    /// history.
    pub fn next_prompt(
        &mut self,
        conversation: &Conversation,
        tokenizer: Option<&Tokenizer>,
        chat: &ChatOptions,
    ) -> Result<(Vec<u32>, usize)> {
        let turn = self.next_turn;
        self.next_turn += 1;
        match (&conversation.script, &mut self.history) {
            (
                Script::Chat {
                    users,
                    max_new_tokens,
                    ..
                },
                History::Messages(messages),
            ) => {
                let tokenizer =
                    tokenizer.context("a chat conversation needs the model's tokenizer")?;
                messages.push(message("user", &users[turn]));
                let prompt = tokenizer
                    .encode_messages(messages, chat)
                    .context("templating the history")?;
                Ok((prompt, *max_new_tokens))
            }
            (Script::Tokens { turns, .. }, History::Tokens(history)) => {
                let (user, answer_tokens) = &turns[turn];
                history.extend(user);
                Ok((history.clone(), *answer_tokens))
            }
            _ => unreachable!("a state's history has its script's kind"),
        }
    }

    /// The answer to the last prompt joins the history (decoded, for a chat).
    pub fn answered(&mut self, new_ids: &[u32], tokenizer: Option<&Tokenizer>) {
        match &mut self.history {
            History::Messages(messages) => {
                let answer = tokenizer.map_or(String::new(), |t| t.decode(new_ids, true));
                messages.push(message("assistant", &answer));
            }
            History::Tokens(history) => history.extend(new_ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> TraceShape {
        TraceShape {
            conversations: 4,
            turns: "2-3".parse().unwrap(),
            shared_prefix_tokens: 10,
            prefix_tokens_mean: 6,
            user_tokens: "3-5".parse().unwrap(),
            answer_tokens: "2".parse().unwrap(),
        }
    }

    #[test]
    fn a_generated_trace_reads_back_and_shares_its_prefix() {
        let trace = synthetic_trace(&shape(), 1).unwrap();
        assert_eq!(trace.len(), 4);
        for c in &trace {
            assert!((2..=3).contains(&c.turns.len()));
            assert!((1..=30).contains(&c.prefix_tokens));
            assert!(c.turns.iter().all(|t| (3..=5).contains(&t.user_tokens)));
        }
        let text = trace_to_jsonl(&trace);
        assert_eq!(parse_trace(&text, "t.jsonl").unwrap(), trace);
        let ids: Vec<u32> = (100..200).collect();
        let convs = trace_conversations(&trace, &ids, 9).unwrap();
        let prefixes: Vec<&Vec<u32>> = convs
            .iter()
            .map(|c| match &c.script {
                Script::Tokens { prefix, .. } => prefix,
                Script::Chat { .. } => unreachable!(),
            })
            .collect();
        assert!(prefixes.iter().all(|p| p[..10] == prefixes[0][..10]));
        assert_ne!(prefixes[0][10..], prefixes[1][10..]);
        // The same seed gives the same ids.
        assert_eq!(trace_conversations(&trace, &ids, 9).unwrap(), convs);
    }

    #[test]
    fn bad_trace_lines_are_named_by_line_and_field() {
        let cases = [
            ("{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": 3, \"answer_tokens\": 2}]}\n\n{\"conversation\": \"b\"}", "line 3: field `turns` is missing"),
            ("{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": 3, \"answer_tokens\": 0}]}", "line 1: field `turns[0].answer_tokens`: expected a positive integer, found 0"),
            ("{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": \"x\", \"answer_tokens\": 2}]}", "field `turns[0].user_tokens`: expected a positive integer, found \"x\""),
            ("{\"conversation\": 5, \"turns\": []}", "line 1: field `conversation`: expected a non-empty string, found 5"),
            ("{\"conversation\": \"a\", \"turns\": [], \"extra\": 1}", "line 1: unknown field `extra`"),
            ("{\"conversation\": \"a\", \"turns\": []}", "field `turns`: expected a non-empty array"),
            ("not json", "line 1: not a JSON object"),
            ("{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": 1, \"answer_tokens\": 1}]}\n{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": 1, \"answer_tokens\": 1}]}", "line 2: field `conversation`: \"a\" is also the name on line 1"),
            ("{\"conversation\": \"a\", \"arrival_seconds\": 1, \"turns\": [{\"user_tokens\": 1, \"answer_tokens\": 1}]}\n{\"conversation\": \"b\", \"turns\": [{\"user_tokens\": 1, \"answer_tokens\": 1}]}", "line 2: field `arrival_seconds`: given on some lines"),
            ("{\"conversation\": \"a\", \"arrival_seconds\": -1, \"turns\": [{\"user_tokens\": 1, \"answer_tokens\": 1}]}", "line 1: field `arrival_seconds`: expected a number of seconds >= 0"),
            ("\n", "the trace holds no conversation"),
        ];
        for (text, expected) in cases {
            let err = parse_trace(text, "bad.jsonl").unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.starts_with("bad.jsonl"),
                "{err:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn counts_and_ranges_parse() {
        assert_eq!(
            "12-18".parse::<CountRange>().unwrap(),
            CountRange { min: 12, max: 18 }
        );
        assert_eq!(
            "5".parse::<CountRange>().unwrap(),
            CountRange { min: 5, max: 5 }
        );
        assert!("0".parse::<CountRange>().is_err());
        assert!("9-3".parse::<CountRange>().is_err());
        assert!("x"
            .parse::<CountRange>()
            .unwrap_err()
            .contains("not a count"));
    }

    #[test]
    fn scenario_copies_differ_after_the_system_prompt() {
        let scenarios = crate::scenario::scenarios::study_scenarios();
        let copies = scenario_copies(&scenarios, 6, "2".parse().unwrap(), 8, 3).unwrap();
        assert_eq!(copies.len(), 6);
        for (i, c) in copies.iter().enumerate() {
            let Script::Chat { users, system, .. } = &c.script else {
                unreachable!()
            };
            assert_eq!(users.len(), 2);
            assert!(users[0].starts_with(&format!("Customer {i}: ")));
            assert!(scenarios.iter().any(|s| &s.system_prompt == system));
        }
        assert_eq!(
            scenario_copies(&scenarios, 6, "2".parse().unwrap(), 8, 3).unwrap(),
            copies
        );
    }
}
