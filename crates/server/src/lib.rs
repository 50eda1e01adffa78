//! The mlaserve server: command line, OpenAI-compatible HTTP API, chat templates.

pub mod chat_template;
pub mod generate;
