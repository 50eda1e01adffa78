//! The mlaserve server: command line, OpenAI-compatible HTTP API, chat templates.
//!
//! A request's path: [`app`] routes it → [`extract`] parses the body → [`chat`] / [`completions`]
//! validate it ([`validate`]), render the [`chat_template`] and submit to the engine → [`output`]
//! and [`reasoning`] turn engine events into SSE chunks or one JSON response.

pub mod app;
pub mod chat;
pub mod chat_template;
pub mod completions;
pub mod error;
pub mod extract;
pub mod generate;
pub mod make_model;
pub mod metrics;
pub mod output;
pub mod protocol;
pub mod reasoning;
pub mod serve;
pub mod state;
pub mod validate;
