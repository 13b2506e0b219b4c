//! The study's five conversations (compiled in) and user scenario files of the same shape.
//!
//! A scenario file, JSON or TOML, has the shape of the study's `study_scenarios.json`:
//! `system_prompts` maps a name to a system prompt, `scenarios` maps a name to
//! `{ system = <a system_prompts name>, turns = [<user message>, ...] }`, and an optional
//! `source` says where it came from. JSON files keep their scenarios in file order; TOML tables
//! come out sorted by name (pass `--scenarios` names to choose an order).

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

/// The study's scenarios and system prompts, exactly as its notebook defines them.
const STUDY_SCENARIOS_JSON: &str = include_str!("study_scenarios.json");

/// One conversation: a system prompt, then user messages, one per turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub system_prompt: String,
    pub turns: Vec<String>,
    /// "study" for the compiled-in scenarios, else the file it was read from.
    pub origin: String,
}

/// The five scenarios of the study (15 turns each), in the study's order.
pub fn study_scenarios() -> Vec<Scenario> {
    parse(STUDY_SCENARIOS_JSON, Format::Json, "study")
        .expect("the compiled-in study_scenarios.json is valid")
}

/// The study's scenario of that name.
pub fn study_scenario(name: &str) -> Result<Scenario> {
    let all = study_scenarios();
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    let known = names.join(", ");
    all.iter()
        .find(|s| s.name == name)
        .cloned()
        .with_context(|| format!("no study scenario named {name:?} (the study's: {known})"))
}

/// Scenarios from `--scenarios` items, in the order given: `all` (the study's five), a study
/// scenario's name, or a `.json` / `.toml` file (all of its scenarios).
pub fn select(items: &[String]) -> Result<Vec<Scenario>> {
    let mut chosen: Vec<Scenario> = Vec::new();
    for item in items {
        let item = item.trim();
        let found = if item == "all" {
            study_scenarios()
        } else if is_scenario_file(item) {
            load_file(Path::new(item))?
        } else {
            vec![study_scenario(item)?]
        };
        for scenario in found {
            if let Some(earlier) = chosen.iter().find(|s| s.name == scenario.name) {
                bail!(
                    "scenario {:?} is chosen twice (from {} and from {})",
                    scenario.name,
                    earlier.origin,
                    scenario.origin
                );
            }
            chosen.push(scenario);
        }
    }
    if chosen.is_empty() {
        bail!("no scenario chosen");
    }
    Ok(chosen)
}

fn is_scenario_file(item: &str) -> bool {
    let path = Path::new(item);
    path.is_file() || Format::of(path).is_ok()
}

/// How a scenario file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
}

impl Format {
    /// From the file's extension.
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Ok(Format::Json),
            Some(e) if e.eq_ignore_ascii_case("toml") => Ok(Format::Toml),
            _ => bail!("{}: a scenario file ends in .json or .toml", path.display()),
        }
    }
}

/// All scenarios of a user file.
pub fn load_file(path: &Path) -> Result<Vec<Scenario>> {
    let format = Format::of(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read scenario file {}", path.display()))?;
    parse(&text, format, &path.display().to_string())
}

/// Scenarios from the text of a scenario file; errors name `origin`, the line and the field.
pub fn parse(text: &str, format: Format, origin: &str) -> Result<Vec<Scenario>> {
    // Both parsers put the line (and column) of a syntax or type error in their message.
    let file: ScenarioFile = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| anyhow!("{origin}: {e}"))?,
        Format::Toml => toml::from_str(text).map_err(|e| anyhow!("{origin}: {e}"))?,
    };
    // Where a name or value first appears: quoted (a JSON key, a string), or a TOML table header.
    let at = |name: &str| {
        let found = [
            format!("\"{name}\""),
            format!("scenarios.{name}"),
            name.to_string(),
        ]
        .iter()
        .find_map(|needle| line_of(text, needle));
        match found {
            Some(line) => format!("{origin}, line {line}"),
            None => origin.to_string(),
        }
    };
    if file.scenarios.0.is_empty() {
        bail!("{}: `scenarios` holds no scenario", at("scenarios"));
    }
    let mut scenarios = Vec::new();
    for (name, entry) in file.scenarios.0 {
        let prompt = file
            .system_prompts
            .0
            .iter()
            .find(|(prompt_name, _)| *prompt_name == entry.system);
        let Some((_, system_prompt)) = prompt else {
            let known: Vec<&str> = file
                .system_prompts
                .0
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            bail!(
                "{}: scenario {name:?}: field `system` names {:?}, which `system_prompts` lacks (it has: {})",
                at(&entry.system),
                entry.system,
                known.join(", ")
            );
        };
        if entry.turns.is_empty() {
            bail!("{}: scenario {name:?}: field `turns` is empty", at(&name));
        }
        if let Some(i) = entry.turns.iter().position(|t| t.trim().is_empty()) {
            bail!(
                "{}: scenario {name:?}: `turns[{i}]` is an empty message",
                at(&name)
            );
        }
        scenarios.push(Scenario {
            name,
            system_prompt: system_prompt.clone(),
            turns: entry.turns,
            origin: origin.to_string(),
        });
    }
    Ok(scenarios)
}

/// 1-based number of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|i| i + 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default, rename = "source")]
    _source: Option<String>,
    system_prompts: InFileOrder<String>,
    scenarios: InFileOrder<ScenarioEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioEntry {
    system: String,
    turns: Vec<String>,
}

/// A map read as its entries in the order the parser gives them (file order for JSON).
struct InFileOrder<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for InFileOrder<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for EntriesVisitor<T> {
            type Value = InFileOrder<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of names to entries")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, T)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate name {key:?}")));
                    }
                    entries.push((key, value));
                }
                Ok(InFileOrder(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_study_has_five_scenarios_of_fifteen_turns_in_its_order() {
        let all = study_scenarios();
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "insurance_claim_auto",
                "insurance_policy_update",
                "insurance_life_beneficiary",
                "banking_open_account",
                "banking_loan_application"
            ]
        );
        assert!(all.iter().all(|s| s.turns.len() == 15));
        assert!(all[0]
            .system_prompt
            .starts_with("# Identity\nYou are a professional"));
        assert!(all[3].system_prompt.contains("Banco Digital Plus"));
        assert_eq!(
            all[0].turns[0],
            "I was in a car accident yesterday. How do I start a claim?"
        );
    }

    #[test]
    fn toml_and_json_files_of_the_same_shape_agree() {
        let json = r#"{
  "system_prompts": {"helper": "You help."},
  "scenarios": {
    "b_first": {"system": "helper", "turns": ["Hi", "Bye"]},
    "a_second": {"system": "helper", "turns": ["Yo"]}
  }
}"#;
        let toml = r#"
[system_prompts]
helper = "You help."

[scenarios.b_first]
system = "helper"
turns = ["Hi", "Bye"]
"#;
        let from_json = parse(json, Format::Json, "j.json").unwrap();
        assert_eq!(from_json[0].name, "b_first", "JSON keeps file order");
        assert_eq!(from_json[1].turns, ["Yo"]);
        let from_toml = parse(toml, Format::Toml, "t.toml").unwrap();
        assert_eq!(from_toml[0].turns, from_json[0].turns);
        assert_eq!(from_toml[0].system_prompt, "You help.");
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let missing_turns = "{\n  \"system_prompts\": {\"h\": \"x\"},\n  \"scenarios\": {\n    \"s\": {\"system\": \"h\"}\n  }\n}";
        let err = parse(missing_turns, Format::Json, "m.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.json") && err.contains("`turns`") && err.contains("line 4"),
            "{err}"
        );

        let typo = "{\"system_prompts\": {\"h\": \"x\"},\n\"scenarios\": {\"s\": {\"system\": \"h\",\n \"turn\": [\"a\"]}}}";
        let err = parse(typo, Format::Json, "t.json").unwrap_err().to_string();
        assert!(
            err.contains("unknown field `turn`") && err.contains("line 3"),
            "{err}"
        );

        let bad_system =
            "[system_prompts]\nh = \"x\"\n\n[scenarios.s]\nsystem = \"helpr\"\nturns = [\"a\"]\n";
        let err = parse(bad_system, Format::Toml, "b.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.toml, line 5") && err.contains("`system`") && err.contains("\"helpr\""),
            "{err}"
        );

        let wrong_type =
            "[system_prompts]\nh = \"x\"\n\n[scenarios.s]\nsystem = \"h\"\nturns = \"a\"\n";
        let err = parse(wrong_type, Format::Toml, "w.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 6") && err.contains("turns"), "{err}");

        let empty = "{\"system_prompts\": {\"h\": \"x\"},\n\"scenarios\": {\"s\": {\"system\": \"h\", \"turns\": []}}}";
        let err = parse(empty, Format::Json, "e.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("e.json, line 2") && err.contains("`turns` is empty"),
            "{err}"
        );
    }

    #[test]
    fn selection_keeps_the_order_given_and_refuses_duplicates() {
        let picked =
            select(&["banking_open_account".into(), "insurance_claim_auto".into()]).unwrap();
        assert_eq!(picked[0].name, "banking_open_account");
        assert_eq!(picked[1].name, "insurance_claim_auto");
        assert_eq!(select(&["all".into()]).unwrap().len(), 5);
        let err = select(&["insurance_claim_auto".into(), "all".into()]).unwrap_err();
        assert!(err.to_string().contains("chosen twice"), "{err}");
        let err = select(&["insurance_claim".into()]).unwrap_err();
        assert!(err.to_string().contains("insurance_claim_auto"), "{err}");
    }
}
