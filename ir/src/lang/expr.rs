//! Dimension expressions: `768`, `"hidden"`, `"4 * hidden"`, `"hidden / heads"`. Integers only;
//! `/` must divide exactly, so a configuration that does not fit (hidden 100, heads 12) is an error
//! that names both numbers instead of a silently truncated shape.
//!
//! Expressions are parsed when the model file is read (so a typo gets the file position from the
//! RON parser) and evaluated once the named dimensions, with any `--dim` overrides, are resolved.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A parsed expression together with its source text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimExpr {
    /// The expression as written (`"4 * hidden"`).
    pub text: String,
    ast: Expr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    Num(u64),
    Name(String),
    Bin(Box<Expr>, BinOp, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Why an expression has no value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum EvalError {
    /// A name that is not a declared dimension.
    #[error("unknown dimension `{name}`{}", suggest(.suggestion))]
    UnknownDim {
        name: String,
        suggestion: Option<String>,
    },
    /// `a / b` where `b` does not divide `a`.
    #[error("`{text}`: {lhs} / {rhs} is not a whole number")]
    Inexact { text: String, lhs: u64, rhs: u64 },
    /// Division by zero.
    #[error("`{text}`: division by zero")]
    DivZero { text: String },
    /// A result below zero.
    #[error("`{text}`: {lhs} - {rhs} is negative")]
    Negative { text: String, lhs: u64, rhs: u64 },
    /// A result too large for 64 bits.
    #[error("`{text}` overflows 64 bits")]
    Overflow { text: String },
    /// Dimensions defined in terms of each other.
    #[error("dimensions are defined in a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

pub(crate) fn suggest(s: &Option<String>) -> String {
    s.as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

impl DimExpr {
    /// Parses an expression.
    pub fn parse(text: &str) -> Result<DimExpr, String> {
        let tokens = tokenize(text)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            depth: 0,
        };
        let ast = p.sum()?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(format!("unexpected `{t}` in dimension expression `{text}`"));
        }
        Ok(DimExpr {
            text: text.trim().to_owned(),
            ast,
        })
    }

    /// The expression that is the number `n`.
    pub fn literal(n: u64) -> DimExpr {
        DimExpr {
            text: n.to_string(),
            ast: Expr::Num(n),
        }
    }

    /// Whether the expression is a plain number.
    pub fn is_literal(&self) -> bool {
        matches!(self.ast, Expr::Num(_))
    }

    /// The dimension names the expression mentions.
    pub fn names(&self) -> Vec<&str> {
        fn walk<'a>(e: &'a Expr, out: &mut Vec<&'a str>) {
            match e {
                Expr::Num(_) => {}
                Expr::Name(n) => out.push(n),
                Expr::Bin(a, _, b) => {
                    walk(a, out);
                    walk(b, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.ast, &mut out);
        out
    }

    /// Evaluates the expression, looking names up with `lookup`.
    pub fn eval(
        &self,
        lookup: &mut dyn FnMut(&str) -> Result<u64, EvalError>,
    ) -> Result<u64, EvalError> {
        self.eval_node(&self.ast, lookup)
    }

    fn eval_node(
        &self,
        e: &Expr,
        lookup: &mut dyn FnMut(&str) -> Result<u64, EvalError>,
    ) -> Result<u64, EvalError> {
        let text = || self.text.clone();
        match e {
            Expr::Num(n) => Ok(*n),
            Expr::Name(n) => lookup(n),
            Expr::Bin(a, op, b) => {
                let (a, b) = (self.eval_node(a, lookup)?, self.eval_node(b, lookup)?);
                match op {
                    BinOp::Add => a
                        .checked_add(b)
                        .ok_or_else(|| EvalError::Overflow { text: text() }),
                    BinOp::Mul => a
                        .checked_mul(b)
                        .ok_or_else(|| EvalError::Overflow { text: text() }),
                    BinOp::Sub => a.checked_sub(b).ok_or_else(|| EvalError::Negative {
                        text: text(),
                        lhs: a,
                        rhs: b,
                    }),
                    BinOp::Div if b == 0 => Err(EvalError::DivZero { text: text() }),
                    BinOp::Div if a % b != 0 => Err(EvalError::Inexact {
                        text: text(),
                        lhs: a,
                        rhs: b,
                    }),
                    BinOp::Div => Ok(a / b),
                }
            }
        }
    }
}

impl fmt::Display for DimExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Num(u64),
    Name(String),
    Op(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Num(n) => write!(f, "{n}"),
            Token::Name(n) => f.write_str(n),
            Token::Op(c) => write!(f, "{c}"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_digit() {
            let mut end = i;
            while let Some(&(j, d)) = chars.peek() {
                if !(d.is_ascii_digit() || d == '_') {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            let digits: String = text[i..end].chars().filter(|&d| d != '_').collect();
            let n = digits
                .parse()
                .map_err(|_| format!("number `{}` is too large", &text[i..end]))?;
            out.push(Token::Num(n));
        } else if c.is_alphabetic() || c == '_' {
            let mut end = i;
            while let Some(&(j, d)) = chars.peek() {
                if !(d.is_alphanumeric() || d == '_') {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            out.push(Token::Name(text[i..end].to_owned()));
        } else if "+-*/()".contains(c) {
            out.push(Token::Op(c));
            chars.next();
        } else {
            return Err(format!(
                "unexpected character `{c}` in dimension expression `{text}` \
                 (expressions use integers, dimension names, + - * / and parentheses)"
            ));
        }
    }
    if out.is_empty() {
        return Err("empty dimension expression".into());
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek_op(&self) -> Option<char> {
        match self.tokens.get(self.pos) {
            Some(Token::Op(c)) => Some(*c),
            _ => None,
        }
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut lhs = self.product()?;
        while let Some(c @ ('+' | '-')) = self.peek_op() {
            self.pos += 1;
            let rhs = self.product()?;
            let op = if c == '+' { BinOp::Add } else { BinOp::Sub };
            lhs = Expr::Bin(Box::new(lhs), op, Box::new(rhs));
        }
        Ok(lhs)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut lhs = self.atom()?;
        while let Some(c @ ('*' | '/')) = self.peek_op() {
            self.pos += 1;
            let rhs = self.atom()?;
            let op = if c == '*' { BinOp::Mul } else { BinOp::Div };
            lhs = Expr::Bin(Box::new(lhs), op, Box::new(rhs));
        }
        Ok(lhs)
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        match t {
            Some(Token::Num(n)) => Ok(Expr::Num(n)),
            Some(Token::Name(n)) => Ok(Expr::Name(n)),
            Some(Token::Op('(')) => {
                // Bound the nesting so a hostile file cannot overflow the stack.
                self.depth += 1;
                if self.depth > 64 {
                    return Err("dimension expression nested too deeply".into());
                }
                let e = self.sum()?;
                self.depth -= 1;
                if self.peek_op() != Some(')') {
                    return Err("missing `)` in dimension expression".into());
                }
                self.pos += 1;
                Ok(e)
            }
            Some(t) => Err(format!(
                "expected a number or a dimension name, found `{t}`"
            )),
            None => Err("dimension expression ends too early".into()),
        }
    }
}

/// Read from a RON integer (`768`) or string (`"4 * hidden"`).
impl<'de> Deserialize<'de> for DimExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DimExpr, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DimExpr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a dimension: an integer, a name, or an expression such as \"4 * hidden\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DimExpr, E> {
                Ok(DimExpr::literal(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DimExpr, E> {
                u64::try_from(v)
                    .map(DimExpr::literal)
                    .map_err(|_| E::custom(format!("a dimension cannot be negative ({v})")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DimExpr, E> {
                DimExpr::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for DimExpr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.ast {
            Expr::Num(n) => s.serialize_u64(n),
            _ => s.serialize_str(&self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str) -> Result<u64, EvalError> {
        DimExpr::parse(text).unwrap().eval(&mut |n| match n {
            "hidden" => Ok(768),
            "heads" => Ok(12),
            _ => Err(EvalError::UnknownDim {
                name: n.into(),
                suggestion: None,
            }),
        })
    }

    #[test]
    fn precedence_and_parentheses() {
        assert_eq!(eval("4 * hidden").unwrap(), 3072);
        assert_eq!(eval("hidden / heads").unwrap(), 64);
        assert_eq!(eval("2 + 3 * 4").unwrap(), 14);
        assert_eq!(eval("(2 + 3) * 4").unwrap(), 20);
        assert_eq!(eval("10 - 4 - 3").unwrap(), 3);
        assert_eq!(eval("1_024").unwrap(), 1024);
    }

    #[test]
    fn inexact_division_names_both_numbers() {
        let e = eval("hidden / 5").unwrap_err();
        assert_eq!(e.to_string(), "`hidden / 5`: 768 / 5 is not a whole number");
        assert!(matches!(
            eval("hidden / (heads - 12)"),
            Err(EvalError::DivZero { .. })
        ));
        assert!(matches!(
            eval("heads - hidden"),
            Err(EvalError::Negative { .. })
        ));
        assert!(matches!(
            eval("hidden * 99999999999999999"),
            Err(EvalError::Overflow { .. })
        ));
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "",
            "4 *",
            "(hidden",
            "hidden )",
            "4 ** 2",
            "hidden % 2",
            "3 hidden",
        ] {
            assert!(DimExpr::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
