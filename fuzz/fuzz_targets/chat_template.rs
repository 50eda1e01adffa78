//! Fuzzed conversations rendered by the DeepSeek chat templates (R1 first, as the fixtures ship it;
//! V3-0324 and V3.1 too), through `ChatTemplate::render` as the server calls it. A render error is a
//! normal answer (400); a panic or a hang is a bug.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mlaserve::chat_template::ChatTemplate;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const TEMPLATES: [&str; 3] = [
    include_str!("../../crates/server/testdata/chat-templates/deepseek-r1.jinja"),
    include_str!("../../crates/server/testdata/chat-templates/deepseek-v3-0324.jinja"),
    include_str!("../../crates/server/testdata/chat-templates/deepseek-v3.1.jinja"),
];

#[derive(Arbitrary, Debug)]
struct Conversation {
    template: u8,
    add_generation_prompt: bool,
    thinking: Option<bool>,
    messages: Vec<Message>,
    /// A free-form `tools` value and extra template variable, as clients may send any JSON.
    tools: Option<Json>,
    extra: Option<(String, Json)>,
}

#[derive(Arbitrary, Debug)]
struct Message {
    role: Role,
    /// None: no `content` key (as the server sends an assistant message without content).
    content: Option<String>,
    name: Option<String>,
    tool_calls: Option<Vec<ToolCall>>,
    tool_call_id: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
    /// Replace the well-formed call with arbitrary JSON.
    raw: Option<Json>,
}

/// Arbitrary JSON of bounded depth.
#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Leaf>),
    Object(Vec<(String, Leaf)>),
}

#[derive(Arbitrary, Debug)]
enum Leaf {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Leaf {
    fn value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => json!(b),
            Leaf::Int(i) => json!(i),
            Leaf::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Leaf::Str(s) => json!(s),
        }
    }
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Int(i) => json!(i),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Str(s) => json!(s),
            Json::List(items) => Value::Array(items.iter().map(Leaf::value).collect()),
            Json::Object(fields) => Value::Object(fields.iter().map(|(k, v)| (k.clone(), v.value())).collect()),
        }
    }
}

fn templates() -> &'static [ChatTemplate] {
    static COMPILED: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    COMPILED
        .get_or_init(|| TEMPLATES.iter().map(|t| ChatTemplate::new(t, BOS, EOS).expect("template compiles")).collect())
}

fuzz_target!(|c: Conversation| {
    let messages: Vec<Value> = c
        .messages
        .iter()
        .take(64)
        .map(|m| {
            let mut obj = Map::new();
            let role = match &m.role {
                Role::System => "system".to_owned(),
                Role::User => "user".to_owned(),
                Role::Assistant => "assistant".to_owned(),
                Role::Tool => "tool".to_owned(),
                Role::Other(s) => s.clone(),
            };
            obj.insert("role".into(), role.into());
            obj.insert("content".into(), m.content.clone().map_or(Value::Null, Value::String));
            if let Some(name) = &m.name {
                obj.insert("name".into(), name.clone().into());
            }
            if let Some(calls) = &m.tool_calls {
                let calls = calls
                    .iter()
                    .map(|t| match &t.raw {
                        Some(raw) => raw.value(),
                        None => json!({"id": t.id, "type": "function",
                                       "function": {"name": t.name, "arguments": t.arguments}}),
                    })
                    .collect();
                obj.insert("tool_calls".into(), Value::Array(calls));
            }
            if let Some(id) = &m.tool_call_id {
                obj.insert("tool_call_id".into(), id.clone().into());
            }
            Value::Object(obj)
        })
        .collect();
    let mut extra = Map::new();
    if let Some(thinking) = c.thinking {
        extra.insert("thinking".into(), thinking.into());
    }
    if let Some(tools) = &c.tools {
        extra.insert("tools".into(), tools.value());
    }
    if let Some((key, value)) = &c.extra {
        extra.insert(key.clone(), value.value());
    }
    let template = &templates()[c.template as usize % TEMPLATES.len()];
    // Only crashes are looked for: what the prompt must contain differs by template (R1 drops the
    // reasoning of earlier assistant turns, for one).
    let _ = template.render(&messages, c.add_generation_prompt, &extra);
});
