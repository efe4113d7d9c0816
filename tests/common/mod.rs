//! Helpers the end-to-end tests share.

/// The `loss N` figure of a `ferrotron run` report (the first `loss ` in it).
pub fn reported_loss(stdout: &str) -> f64 {
    let at = stdout.find("loss ").expect("a loss is printed") + 5;
    stdout[at..]
        .split(|c: char| c == ',' || c.is_whitespace())
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the loss parses")
}
