//! Finds where an entry is written in a model file, for errors found after parsing (an unknown
//! dimension, a shape mismatch). serde's data model drops positions, so this re-scans the source
//! with a small lexer that understands RON's strings and comments and follows a path of keys
//! (`["blocks", "gpt_layer", "body", "qkv"]`), each one level deeper than the last.

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub col: usize,
}

struct Key {
    text: String,
    depth: usize,
    pos: Position,
}

/// Every `key:` in the source (identifiers and string literals followed by a colon), with the
/// nesting depth it sits at.
fn keys(src: &str) -> Vec<Key> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col, mut depth) = (0, 1, 1, 0usize);
    // The most recent identifier or string, waiting to see whether a colon follows.
    let mut pending: Option<(String, Position)> = None;
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize| {
        if chars[*i] == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        let pos = Position { line, col };
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                advance(&mut i, &mut line, &mut col);
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            let mut nest = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    nest += 1;
                    advance(&mut i, &mut line, &mut col);
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    nest -= 1;
                    advance(&mut i, &mut line, &mut col);
                    if nest == 0 {
                        advance(&mut i, &mut line, &mut col);
                        break;
                    }
                }
                advance(&mut i, &mut line, &mut col);
            }
        } else if c == '"' {
            let mut text = String::new();
            advance(&mut i, &mut line, &mut col);
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    advance(&mut i, &mut line, &mut col);
                }
                text.push(chars[i]);
                advance(&mut i, &mut line, &mut col);
            }
            if i < chars.len() {
                advance(&mut i, &mut line, &mut col);
            }
            pending = Some((text, pos));
            continue;
        } else if c.is_alphanumeric() || c == '_' {
            let mut text = String::new();
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                text.push(chars[i]);
                advance(&mut i, &mut line, &mut col);
            }
            pending = Some((text, pos));
            continue;
        } else if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col);
            continue;
        } else {
            match c {
                ':' => {
                    if let Some((text, pos)) = pending.take() {
                        out.push(Key { text, depth, pos });
                    }
                }
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            advance(&mut i, &mut line, &mut col);
        }
        pending = None;
    }
    out
}

/// Where the entry at `path` is written: each key is looked for one nesting level below the
/// previous one, and only inside it. `None` when the path is not in the source.
pub fn locate(src: &str, path: &[&str]) -> Option<Position> {
    let keys = keys(src);
    let mut from = 0;
    // The model's own fields sit at depth 1, inside `Model(`.
    let mut depth = 1;
    let mut found = None;
    for step in path {
        let i = from
            + keys[from..]
                .iter()
                .take_while(|k| k.depth >= depth) // stop on leaving the parent's value
                .position(|k| k.depth == depth && k.text == *step)?;
        found = Some(keys[i].pos);
        depth = keys[i].depth + 1;
        from = i + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"Model(
    // "body": a comment must not count
    blocks: {
        "layer": Block(
            body: {
                "x": Add("a", "b"), /* "x": nor a block comment */
            },
        ),
    },
    body: {
        "x": Add("c", "d"),
    },
)"#;

    #[test]
    fn finds_nested_keys_by_path() {
        assert_eq!(
            locate(SRC, &["blocks", "layer", "body", "x"]),
            Some(Position { line: 6, col: 17 })
        );
        assert_eq!(
            locate(SRC, &["body", "x"]),
            Some(Position { line: 11, col: 9 })
        );
        assert_eq!(locate(SRC, &["body", "y"]), None);
        assert_eq!(locate(SRC, &["blocks", "nope"]), None);
    }
}
