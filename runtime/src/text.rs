//! The one set of rules for a text that a service stores from its input (a name, an address,
//! a description): bounded, not empty where required, and free of control characters and of
//! the Unicode overrides that make a text display other than it reads. The orchestrator's
//! inputs and the Product service's model both check their texts here.

/// Whether `c` may not appear in a stored text.
pub fn forbidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// What is wrong with `value` as a one-line text of at most `max` characters, if anything.
pub fn check(value: &str, max: usize, may_be_empty: bool) -> Result<(), String> {
    check_with(value, max, may_be_empty, forbidden)
}

/// The same for a text of several lines (a description): line feeds and tabs are allowed.
pub fn check_multiline(value: &str, max: usize, may_be_empty: bool) -> Result<(), String> {
    check_with(value, max, may_be_empty, |c| {
        forbidden(c) && !matches!(c, '\n' | '\t')
    })
}

fn check_with(
    value: &str,
    max: usize,
    may_be_empty: bool,
    forbidden: impl Fn(char) -> bool,
) -> Result<(), String> {
    if value.trim().is_empty() && !may_be_empty {
        return Err("must not be empty".into());
    }
    if let Some(c) = value.chars().find(|&c| forbidden(c)) {
        return Err(format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        ));
    }
    let n = value.chars().count();
    if n > max {
        return Err(format!("must be at most {max} characters, got {n}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_and_several() {
        assert!(check("Ada", 10, false).is_ok());
        assert!(check("", 10, false).is_err());
        assert!(check("  ", 10, false).is_err());
        assert!(check("", 10, true).is_ok());
        assert!(check("a\nb", 10, false).is_err());
        assert!(check("a\u{202E}b", 10, false).is_err());
        assert!(check("abcd", 3, false).is_err());
        assert!(check_multiline("a\nb\tc", 10, false).is_ok());
        assert!(check_multiline("a\u{0}b", 10, false).is_err());
        assert!(check_multiline("a\u{2066}b", 10, false).is_err());
    }
}
