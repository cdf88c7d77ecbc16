//! One problem in a config file, and where in the file it points.
//!
//! The walk over the document knows byte spans; validation only knows which key a value came
//! from. Both end up here, and `locate` turns either into `line:column` for the message, so a
//! validation error points at the value it is about without the validator handling spans.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// Where a problem points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// A byte range of the file, known while walking the document.
    Span(Range<usize>),
    /// A TOML key path like `frontend.0.backend.1.address`, resolved through `Spans`.
    Path(String),
    /// Nothing in the file (like "no frontends" in an empty file).
    Nowhere,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: At,
    /// The key path for a human and what is wrong: `frontend "web": retries: ...`.
    pub text: String,
}

/// The byte span of every key, value and table the walk saw, by TOML path.
#[derive(Debug, Default)]
pub struct Spans(pub HashMap<String, Range<usize>>);

impl Spans {
    /// The span of `path`, or of the nearest table that holds it: a missing key points at the
    /// header of the table it is missing from.
    pub fn find(&self, mut path: &str) -> Option<Range<usize>> {
        loop {
            if let Some(s) = self.0.get(path) {
                return Some(s.clone());
            }
            path = &path[..path.rfind('.')?];
        }
    }
}

/// Turns byte offsets into 1-based line and column (columns count characters, as editors do).
pub struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    pub fn new(text: &'a str) -> Lines<'a> {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines { text, starts }
    }

    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        // A span never starts inside a character, but stay safe if one did.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }
}

/// Is `path`, or a table that holds it, in `set` (`frontend.0.name` is inside `frontend.0`)?
/// Looks up each prefix, so the cost is the path's depth, not the size of the set.
pub fn is_within_any(path: &str, set: &HashSet<String>) -> bool {
    let mut p = path;
    loop {
        if set.contains(p) {
            return true;
        }
        match p.rfind('.') {
            Some(i) => p = &p[..i],
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let l = Lines::new("a = 1\nnäme = 2\n");
        assert_eq!(l.position(0), (1, 1));
        assert_eq!(l.position(4), (1, 5));
        assert_eq!(l.position(6), (2, 1));
        // "ä" is two bytes: the '=' after "näme " is the 6th character.
        assert_eq!(l.position(12), (2, 6));
        assert_eq!(l.position(999), (3, 1));
    }

    #[test]
    fn a_missing_key_points_at_its_table() {
        let mut s = Spans::default();
        s.0.insert("frontend.0".into(), 10..22);
        assert_eq!(s.find("frontend.0.name"), Some(10..22));
        assert_eq!(s.find("global.io"), None);
        let set = HashSet::from(["frontend.0".to_string(), "frontend.1".to_string()]);
        assert!(is_within_any("frontend.0.name", &set));
        assert!(is_within_any("frontend.1", &set));
        assert!(!is_within_any("frontend.10", &set));
        assert!(!is_within_any("frontend", &set));
    }
}
