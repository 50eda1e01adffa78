//! Token ids to text, one token at a time, for streaming: never emits half a UTF-8 character, and
//! holds back just enough text that a stop string split across tokens never leaks out.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Prompt tokens decoded along with the output, so that the first output token's text is right
/// (byte-level BPE spaces and merges depend on what comes before).
const PROMPT_CONTEXT: usize = 6;

pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    /// Start of the window that is re-decoded each time.
    prefix_offset: usize,
    /// End of the text already returned.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..];
        Detokenizer { tokenizer, tokens: tail.to_vec(), prefix_offset: 0, read_offset: tail.len(), skip_special_tokens }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> String {
        self.tokens.push(token);
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens).unwrap_or_default();
        let before = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let now = decode(&self.tokens[self.prefix_offset..]);
        if now.len() <= before.len() || now.ends_with('\u{fffd}') || !now.is_char_boundary(before.len()) {
            return String::new();
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        now[before.len()..].to_string()
    }
}

/// Finds stop strings in streamed text.
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    hold: usize,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        let hold = stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        StopStrings { stops, held: String::new(), hold }
    }

    /// Adds new text; returns the text safe to emit and whether a stop string ended the output
    /// (the stop string and anything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let mut cut = self.held.len().saturating_sub(self.hold);
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held-back text, once the output ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pushes_never_leaks() {
        let mut s = StopStrings::new(vec!["STOP".into(), "\n\n".into()]);
        let mut out = String::new();
        for piece in ["Hello ", "wor", "ld S", "TO", "P and more"] {
            let (text, stopped) = s.push(piece);
            out.push_str(&text);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "Hello world ");
    }

    #[test]
    fn without_a_stop_all_text_comes_out_after_flush() {
        let mut s = StopStrings::new(vec!["zzz".into()]);
        let (a, _) = s.push("日本語");
        let (b, _) = s.push("z");
        assert_eq!(a + &b + &s.flush(), "日本語z");
        let mut none = StopStrings::new(vec![]);
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
    }
}
