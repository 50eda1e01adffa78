//! The `deepseek_r1` reasoning parser: splits generated text at `</think>` into reasoning (before)
//! and answer (after), in a stream whose pieces may cut the tags anywhere.
//!
//! R1-style templates open `<think>` in the prompt, so the output starts inside the reasoning; a
//! model may also write its own opening `<think>`, which is dropped.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

pub struct ReasoningParser {
    /// Output seen so far could still begin with `<think>`.
    at_start: bool,
    in_reasoning: bool,
    /// Leading whitespace of the answer after `</think>` is dropped.
    answer_started: bool,
    held: String,
}

impl ReasoningParser {
    /// `prompt_opens_reasoning`: the prompt ends inside an open `<think>` block.
    pub fn new(prompt_opens_reasoning: bool) -> Self {
        ReasoningParser {
            at_start: true,
            in_reasoning: prompt_opens_reasoning,
            answer_started: false,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        if self.at_start {
            let trimmed = self.held.trim_start();
            if OPEN.starts_with(trimmed) && trimmed.len() < OPEN.len() {
                return out; // could still become `<think>`
            }
            self.at_start = false;
            if let Some(rest) = trimmed.strip_prefix(OPEN) {
                self.in_reasoning = true;
                self.held = rest.to_string();
            } else if !self.in_reasoning {
                // A model that does not think: everything is the answer, untouched.
                self.answer_started = true;
            }
        }
        if self.in_reasoning {
            if let Some(at) = self.held.find(CLOSE) {
                out.reasoning = self.held[..at].to_string();
                self.held.drain(..at + CLOSE.len());
                self.in_reasoning = false;
            } else {
                let keep = partial_suffix(&self.held, CLOSE);
                out.reasoning = self.held[..self.held.len() - keep].to_string();
                self.held.drain(..self.held.len() - keep);
                return out;
            }
        }
        if !self.answer_started {
            let start = self.held.len() - self.held.trim_start().len();
            self.held.drain(..start);
            self.answer_started = !self.held.is_empty();
        }
        out.content = std::mem::take(&mut self.held);
        out
    }

    /// Releases held text at the end of the output.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        if self.in_reasoning {
            Split { reasoning: held, content: String::new() }
        } else {
            Split { reasoning: String::new(), content: held }
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len()).rev().find(|&n| text.ends_with(&tag[..n])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opens: bool, pieces: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(opens);
        let (mut r, mut c) = (String::new(), String::new());
        for piece in pieces {
            let s = p.push(piece);
            r += &s.reasoning;
            c += &s.content;
        }
        let s = p.finish();
        (r + &s.reasoning, c + &s.content)
    }

    #[test]
    fn close_tag_split_across_pieces() {
        let want = ("\nadd the units".to_string(), "The answer is 42.".to_string());
        assert_eq!(run(true, &["\nadd the ", "units</th", "ink>\n\nThe answer", " is 42."]), want);
        assert_eq!(run(true, &["\nadd the units<", "/", "think", ">", "\n", "\nThe answer is 42."]), want);
    }

    #[test]
    fn model_writes_its_own_opening_tag() {
        assert_eq!(run(false, &["<th", "ink>hmm</think>ok"]), ("hmm".into(), "ok".into()));
        assert_eq!(run(true, &["<think>\nhmm</think>ok"]), ("\nhmm".into(), "ok".into()));
    }

    #[test]
    fn no_reasoning_without_an_open_block() {
        assert_eq!(run(false, &["  Hello", " there"]), (String::new(), "  Hello there".into()));
        // A truncated reasoning stays reasoning.
        assert_eq!(run(true, &["still thinking </thi"]), ("still thinking </thi".into(), String::new()));
    }
}
