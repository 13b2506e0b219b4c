//! Tokenizer and prompt tests: the Llama 3 reference prompts of transformers (../shared), and a
//! tiny byte-level tokenizer written here for the template engine, errors and decoding.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvlab::model::tokenizer::{ChatOptions, Message, Tokenizer};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// `../shared/<relative>`, or None (the test skips) when absent; absent under CI=true fails.
fn shared_path(relative: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{} is missing and CI=true", path.display());
    }
    eprintln!("skipping: {} not found", path.display());
    None
}

/// The Llama 3.2 tokenizers of ../shared/models, loaded once for all tests.
fn llama3(model: &str) -> Option<&'static Tokenizer> {
    static BASE: OnceLock<Option<Tokenizer>> = OnceLock::new();
    static INSTRUCT: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let cell = match model {
        "llama-3.2-1b" => &BASE,
        "llama-3.2-1b-instruct" => &INSTRUCT,
        _ => panic!("no model folder {model}"),
    };
    cell.get_or_init(|| {
        let dir = shared_path(&format!("models/{model}"))?;
        Some(Tokenizer::load(&dir).unwrap().expect("tokenizer.json"))
    })
    .as_ref()
}

#[derive(serde::Deserialize)]
struct ReferencePrompts {
    date_string: String,
    cases: Vec<ReferenceCase>,
}

#[derive(serde::Deserialize)]
struct ReferenceCase {
    scenario: String,
    turn: usize,
    messages: Vec<Message>,
    chat_template_ids: Vec<u32>,
    fallback_ids: Vec<u32>,
}

fn reference_prompts() -> Option<ReferencePrompts> {
    let path = shared_path("reference/chat_prompts_llama3.json")?;
    Some(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}

#[test]
fn llama3_prompts_match_transformers() {
    let (Some(reference), Some(instruct), Some(base)) = (
        reference_prompts(),
        llama3("llama-3.2-1b-instruct"),
        llama3("llama-3.2-1b"),
    ) else {
        return;
    };
    assert!(instruct.has_chat_template());
    assert!(!base.has_chat_template());
    let opts = ChatOptions {
        add_generation_prompt: true,
        date_string: Some(reference.date_string.clone()),
    };
    assert_eq!(reference.cases.len(), 15);
    for case in &reference.cases {
        let what = format!("{} turn {}", case.scenario, case.turn);
        let template_ids = instruct.encode_messages(&case.messages, &opts).unwrap();
        assert_eq!(
            template_ids, case.chat_template_ids,
            "chat template, {what}"
        );
        let fallback_ids = base.encode_messages(&case.messages, &opts).unwrap();
        assert_eq!(fallback_ids, case.fallback_ids, "fallback, {what}");
    }
    let first = &reference.cases[0];
    assert_eq!(
        (first.scenario.as_str(), first.turn),
        ("insurance_claim_auto", 1)
    );
    let fallback = base.encode_messages(&first.messages, &opts).unwrap();
    assert_eq!(fallback.len(), 152, "the study's first turn");
    assert_eq!(fallback[0], 128000, "BOS from the post-processor");
}

#[test]
fn llama3_template_dates_today_without_date_string() {
    let (Some(reference), Some(instruct)) = (reference_prompts(), llama3("llama-3.2-1b-instruct"))
    else {
        return;
    };
    let messages = &reference.cases[0].messages;
    let today = chrono::Local::now().format("%d %b %Y").to_string();
    let with_today = ChatOptions {
        add_generation_prompt: true,
        date_string: Some(today),
    };
    let undated = ChatOptions {
        add_generation_prompt: true,
        date_string: None,
    };
    assert_eq!(
        instruct.encode_messages(messages, &undated).unwrap(),
        instruct.encode_messages(messages, &with_today).unwrap()
    );
}

#[test]
fn llama3_special_tokens_and_decoding() {
    let (Some(instruct), Some(base)) = (llama3("llama-3.2-1b-instruct"), llama3("llama-3.2-1b"))
    else {
        return;
    };
    assert_eq!(base.vocab_size(), 128256);
    assert_eq!(base.token_id("<|begin_of_text|>"), Some(128000));
    assert_eq!(base.eos_token_id(), Some(128001));
    assert_eq!(instruct.eos_token_id(), Some(128009));

    let hello = base.encode_text("Hello world", true).unwrap();
    assert_eq!(hello[0], 128000);
    assert_eq!(base.encode_text("Hello world", false).unwrap(), hello[1..]);
    assert_eq!(base.decode(&hello, false), "<|begin_of_text|>Hello world");
    assert_eq!(base.decode(&hello, true), "Hello world");
    // Ids past the vocabulary keep their place, visibly.
    let with_unknown = [hello[1], 128256, 200000, hello[2]];
    assert_eq!(
        base.decode(&with_unknown, false),
        "Hello<|id:128256|><|id:200000|> world"
    );
    // Llama 3's tokenizer_config sets clean_up_tokenization_spaces, as transformers applies it.
    let spaced = base.encode_text("Yes . No ,", false).unwrap();
    assert_eq!(base.decode(&spaced, false), "Yes. No,");
}

#[test]
fn llama3_ordinary_ids_reencode_exactly() {
    let Some(tokenizer) = llama3("llama-3.2-1b") else {
        return;
    };
    let mask = tokenizer.ordinary_text_mask();
    assert_eq!(mask.len(), 128256);
    assert!(
        mask[128000..].iter().all(|&ordinary| !ordinary),
        "special tokens"
    );
    let ordinary: Vec<u32> = (0..mask.len() as u32)
        .filter(|&id| mask[id as usize])
        .collect();
    eprintln!("{} ordinary ids of {}", ordinary.len(), mask.len());
    assert!(ordinary.len() > 30_000, "{} ordinary ids", ordinary.len());
    let id = |text: &str| tokenizer.encode_text(text, false).unwrap()[0];
    assert!(mask[id(" the") as usize] && mask[id(" Hello") as usize]);
    for excluded in ["the", " 123", " .", "\n", "  ", " é"] {
        let ids = tokenizer.encode_text(excluded, false).unwrap();
        assert!(ids.iter().all(|&i| !mask[i as usize]), "{excluded:?}");
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.random_range(1..=48);
        let ids: Vec<u32> = (0..len)
            .map(|_| ordinary[rng.random_range(0..ordinary.len())])
            .collect();
        let text = tokenizer.decode(&ids, false);
        assert_eq!(
            tokenizer.encode_text(&text, false).unwrap(),
            ids,
            "{text:?}"
        );
    }
}

#[test]
fn tiny_reference_checkpoints_have_no_tokenizer() {
    for name in [
        "tiny-llama3-gqa4-bf16",
        "tiny-mha-f32-sharded",
        "tiny-gqa3-headdim32-f16",
    ] {
        let Some(dir) = shared_path(&format!("reference/{name}")) else {
            return;
        };
        assert!(Tokenizer::load(&dir).unwrap().is_none(), "{name}");
    }
}

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        byte as char
    } else {
        char::from_u32(256 + (0..byte).filter(|&b| !printable(b)).count() as u32).unwrap()
    }
}

/// A byte-level BPE whose id is the byte (0..=255), plus " h" = 256 and " hi" = 257, and the
/// added tokens <s> = 300 (BOS, added by the post-processor) and </s> = 301; 258..=299 are
/// holes like those of kvlab's synthetic tokenizer.
fn tiny_tokenizer_json() -> serde_json::Value {
    let space = byte_level_char(b' ');
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), json!(b)))
        .collect();
    vocab.insert(format!("{space}h"), json!(256));
    vocab.insert(format!("{space}hi"), json!(257));
    // The tokenizers crate renumbers added tokens that the model's vocabulary lacks.
    vocab.insert("<s>".to_string(), json!(300));
    vocab.insert("</s>".to_string(), json!(301));
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(300, "<s>"), added(301, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [300], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab,
                  "merges": [[space.to_string(), "h"], [format!("{space}h"), "i"]]}
    })
}

/// A model folder holding the tiny tokenizer and the given extra files.
fn tiny_model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tiny_tokenizer_json().to_string(),
    )
    .unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn config_with_template(template: &str) -> (&'static str, String) {
    let config = json!({
        "bos_token": {"content": "<s>", "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false, "special": true},
        "eos_token": "</s>",
        "chat_template": template,
    });
    ("tokenizer_config.json", config.to_string())
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.to_string(),
        content: content.to_string(),
    }
}

/// The rendered prompt, read back through the byte-level ids.
fn rendered(tokenizer: &Tokenizer, messages: &[Message], opts: &ChatOptions) -> String {
    tokenizer.decode(&tokenizer.encode_messages(messages, opts).unwrap(), false)
}

/// Exercises what transformers' Jinja environment does differently from minijinja's defaults.
const FEATURE_TEMPLATE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == 'skip' %}
        {%- continue %}
    {%- endif %}
    {%- if message.content.startswith('STOP') %}
        {%- break %}
    {%- endif %}
    <{{ message['role'].upper() }}>
    {{ message.content | trim }}
    {% for key, value in message.items() %}
        {{ key }}={{ value | tojson }}
    {% endfor %}
{%- endfor %}
{% set ns = namespace(count=0) %}
{% for m in messages %}{% set ns.count = ns.count + 1 %}{% endfor %}
count={{ ns.count }} tools={{ 'none' if tools is none else 'set' }} date={{ date_string if date_string is defined else 'undefined' }} strip=[{{ '  x y \n'.strip() }}]
{{ {'b': [1, 2.5, 1e16, 0.00001, -0.0, true, none], 'a': {'x': 'é"\\\n\t\u001c'}, 'c': [], 'd': {}} | tojson }}
{{ {'b': 1, 'a': [1, {'k': 'v'}], 'c': []} | tojson(indent=2, sort_keys=true) }}
{{ {'b': 1, 'a': 'é😀'} | tojson(separators=[',', ':'], ensure_ascii=true) }}
{{ '\u001c\u00a0 padded \n' | trim }}|{{ 'xxhixx' | trim('x') }}
{%- if add_generation_prompt %}
    {{- 'GEN:' + eos_token }}
{%- endif %}

"#;

/// FEATURE_TEMPLATE rendered by Jinja2 3.1.6 in transformers' environment
/// (`_compile_jinja_template`: sandbox, trim_blocks, lstrip_blocks, loopcontrols, its tojson).
const FEATURE_RENDERED: &str = r#"<s>    <SYSTEM>
    Be brief.
        role="system"
        content="  Be brief.\n"
    <USER>
    Hi, "you"
        role="user"
        content="Hi, \"you\"\u001c"
count=5 tools=none date=26 Jul 2024 strip=[x y]
{"b": [1, 2.5, 1e+16, 1e-05, -0.0, true, null], "a": {"x": "é\"\\\n\t\u001c"}, "c": [], "d": {}}
{
  "a": [
    1,
    {
      "k": "v"
    }
  ],
  "b": 1,
  "c": []
}
{"b":1,"a":"\u00e9\ud83d\ude00"}
padded|hiGEN:</s>"#;

#[test]
fn chat_template_renders_like_transformers() {
    let dir = tiny_model_dir(&[config_with_template(FEATURE_TEMPLATE)]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    assert!(tokenizer.has_chat_template());
    let messages = [
        message("system", "  Be brief.\n"),
        message("skip", "hidden"),
        message("user", "Hi, \"you\"\u{1c}"),
        message("user", "STOP here"),
        message("user", "never"),
    ];
    let opts = ChatOptions {
        add_generation_prompt: true,
        date_string: Some("26 Jul 2024".to_string()),
    };
    let ids = tokenizer.encode_messages(&messages, &opts).unwrap();
    assert_eq!(ids[0], 300, "<s> written by the template, not added again");
    assert_eq!(ids.iter().filter(|&&id| id == 300).count(), 1);
    assert_eq!(ids.last(), Some(&301));
    assert_eq!(tokenizer.decode(&ids, false), FEATURE_RENDERED);
    assert_eq!(tokenizer.eos_token_id(), Some(301));

    let undated = ChatOptions::default();
    let text = rendered(&tokenizer, &messages, &undated);
    assert!(text.contains(" date=undefined "), "{text}");
    assert!(text.ends_with("padded|hi"), "no generation prompt: {text}");
}

#[test]
fn chat_template_helpers() {
    let template = "{{ strftime_now('%Y') }}|{{ messages[0].content.split(',') | tojson }}";
    let dir = tiny_model_dir(&[config_with_template(template)]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    let year = chrono::Local::now().format("%Y").to_string();
    assert_eq!(
        rendered(
            &tokenizer,
            &[message("user", "a,b")],
            &ChatOptions::default()
        ),
        format!("{year}|[\"a\", \"b\"]")
    );
}

#[test]
fn raise_exception_surfaces_its_message() {
    let template = "{% if messages[0].role != 'user' %}\
                    {{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok";
    let dir = tiny_model_dir(&[config_with_template(template)]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    let opts = ChatOptions::default();
    assert_eq!(rendered(&tokenizer, &[message("user", "x")], &opts), "ok");
    let err = tokenizer
        .encode_messages(&[message("system", "x")], &opts)
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("Conversations must start with a user turn"),
        "{text}"
    );
}

#[test]
fn fallback_joins_role_lines_after_bos() {
    let dir = tiny_model_dir(&[]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    assert!(!tokenizer.has_chat_template());
    assert_eq!(tokenizer.eos_token_id(), None);
    let messages = [message("system", "Be brief."), message("user", "hi")];
    let ids = tokenizer
        .encode_messages(&messages, &ChatOptions::default())
        .unwrap();
    let text = "system: Be brief.\nuser: hi";
    let mut expected = vec![300];
    expected.extend(tokenizer.encode_text(text, false).unwrap());
    assert_eq!(ids, expected);
    assert_eq!(tokenizer.encode_text(text, true).unwrap(), expected);
    assert_eq!(tokenizer.decode(&ids, true), text);
}

#[test]
fn chat_template_sources() {
    // A list of named templates: "default" is the one used.
    let named = json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default:{{ messages | length }}"},
    ]});
    let dir = tiny_model_dir(&[("tokenizer_config.json", named.to_string())]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    let messages = [message("user", "x")];
    let opts = ChatOptions::default();
    assert_eq!(rendered(&tokenizer, &messages, &opts), "default:1");

    // chat_template.jinja wins over the config's template, as in transformers.
    let dir = tiny_model_dir(&[
        config_with_template("from config"),
        ("chat_template.jinja", "from file\n".to_string()),
    ]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    assert_eq!(rendered(&tokenizer, &messages, &opts), "from file");

    let no_default = json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
    let dir = tiny_model_dir(&[("tokenizer_config.json", no_default.to_string())]);
    let err = format!("{:#}", Tokenizer::load(dir.path()).err().unwrap());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("default"),
        "{err}"
    );
}

#[test]
fn malformed_files_are_named() {
    let empty = tempfile::tempdir().unwrap();
    assert!(Tokenizer::load(empty.path()).unwrap().is_none());

    std::fs::write(empty.path().join("tokenizer.json"), "{\"model\": ").unwrap();
    let err = format!("{:#}", Tokenizer::load(empty.path()).err().unwrap());
    assert!(err.contains("tokenizer.json"), "{err}");

    let cases = [
        ("tokenizer_config.json", "{\"bos_token\": "),
        ("tokenizer_config.json", "{\"bos_token\": 5}"),
        ("tokenizer_config.json", "{\"chat_template\": 5}"),
        ("tokenizer_config.json", "{\"chat_template\": \"{% if %}\"}"),
        ("chat_template.jinja", "{% for %}"),
    ];
    for (file, text) in cases {
        let dir = tiny_model_dir(&[(file, text.to_string())]);
        let err = format!("{:#}", Tokenizer::load(dir.path()).err().unwrap());
        assert!(err.contains(file), "{file} {text}: {err}");
    }
}

#[test]
fn unknown_ids_decode_as_placeholders() {
    let dir = tiny_model_dir(&[]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    assert_eq!(tokenizer.vocab_size(), 260);
    let ids = [b'o' as u32, 258, b'k' as u32, 299, 301, 1_000_000];
    assert_eq!(
        tokenizer.decode(&ids, false),
        "o<|id:258|>k<|id:299|></s><|id:1000000|>"
    );
    assert_eq!(
        tokenizer.decode(&ids, true),
        "o<|id:258|>k<|id:299|><|id:1000000|>"
    );
    // A character split by an unknown id cannot be whole; it still decodes without failing.
    let e_acute = "é".as_bytes();
    let split = [e_acute[0] as u32, 258, e_acute[1] as u32];
    assert_eq!(
        tokenizer.decode(&split, false),
        "\u{fffd}<|id:258|>\u{fffd}"
    );
}

#[test]
fn ordinary_mask_of_the_tiny_tokenizer() {
    let dir = tiny_model_dir(&[]);
    let tokenizer = Tokenizer::load(dir.path()).unwrap().unwrap();
    let mask = tokenizer.ordinary_text_mask();
    assert_eq!(mask.len(), 302);
    let ordinary: Vec<usize> = (0..mask.len()).filter(|&id| mask[id]).collect();
    // Single bytes are never " word"s; " h" and " hi" are; holes and added tokens are not.
    assert_eq!(ordinary, [256, 257]);
}
