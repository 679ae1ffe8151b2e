//! Errors as one line for a report or a terminal.

/// An error and its causes on one line, `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += ": ";
        s += &c.to_string();
        cause = c.source();
    }
    s
}
