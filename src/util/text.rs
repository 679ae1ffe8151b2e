//! Text from a peer, made safe to print: it may hold terminal escape
//! sequences, NULs or a megabyte on one line.

/// `s` with control characters escaped (`\u{1b}`, `\0`, `\n`) and cut to
/// about `max` bytes, saying how much was left out.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.char_indices() {
        if out.len() >= max {
            out += &format!("… ({} more bytes)", s.len() - i);
            break;
        }
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escapes_control_characters_and_cuts_long_text() {
        assert_eq!(printable("plain words", 100), "plain words");
        assert_eq!(
            printable("a\u{1b}[31mred\0\n", 100),
            "a\\u{1b}[31mred\\u{0}\\n"
        );
        let long = "x".repeat(1 << 20);
        let p = printable(&long, 10);
        assert_eq!(p, format!("xxxxxxxxxx… ({} more bytes)", (1 << 20) - 10));
    }
}
