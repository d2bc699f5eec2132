//! `${VAR}` and `${VAR:-default}` expansion, done on the text before YAML parsing so that
//! values from the environment are validated exactly like values written in the file, and line
//! numbers in errors still point at the file. `$$` writes a literal `$`. Lines whose first
//! non-blank character is `#` are comments and left alone.

/// An expansion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `${VAR}` with `VAR` unset and no default.
    #[error(
        "environment variable {name} is not set and has no default (write ${{{name}:-default}})"
    )]
    Unset {
        /// Variable name.
        name: String,
        /// 1-based line.
        line: usize,
    },
    /// `${` without a closing `}` or with an invalid name.
    #[error("malformed variable reference {text:?} (expected ${{NAME}} or ${{NAME:-default}})")]
    Malformed {
        /// The offending text.
        text: String,
        /// 1-based line.
        line: usize,
    },
}

impl EnvError {
    /// The 1-based line of the reference.
    pub fn line(&self) -> usize {
        match self {
            EnvError::Unset { line, .. } | EnvError::Malformed { line, .. } => *line,
        }
    }
}

/// Expands references in `text`, looking variables up with `get`.
pub fn expand(text: &str, get: impl Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        expand_line(line, i + 1, &get, &mut out)?;
    }
    Ok(out)
}

fn expand_line(
    line: &str,
    lineno: usize,
    get: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), EnvError> {
    let mut rest = line;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let malformed = || EnvError::Malformed {
                text: format!("${{{}", body.trim_end()),
                line: lineno,
            };
            let end = body.find('}').ok_or_else(malformed)?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(malformed());
            }
            match (get(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(EnvError::Unset {
                        name: name.to_string(),
                        line: lineno,
                    });
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "RATE_LIMIT_TRAINING_EXECUTE" => Some("5/minute".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn set_variable_replaces_the_default() {
        let out = expand("- ${RATE_LIMIT_TRAINING_EXECUTE:-10/minute}\n", env).unwrap();
        assert_eq!(out, "- 5/minute\n");
    }

    #[test]
    fn unset_or_empty_variable_takes_the_default() {
        assert_eq!(expand("a: ${NOPE:-true}", env).unwrap(), "a: true");
        assert_eq!(expand("a: ${EMPTY:-x}", env).unwrap(), "a: x");
    }

    #[test]
    fn unset_variable_without_default_names_it_and_its_line() {
        let err = expand("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(
            err,
            EnvError::Unset {
                name: "NOPE".into(),
                line: 2
            }
        );
    }

    #[test]
    fn comments_and_dollars_are_left_alone() {
        let text = "# uses ${NOPE}\na: $$5 and $x\n";
        assert_eq!(expand(text, env).unwrap(), "# uses ${NOPE}\na: $5 and $x\n");
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(matches!(
            expand("a: ${1X}", env),
            Err(EnvError::Malformed { .. })
        ));
        assert!(matches!(
            expand("a: ${OPEN", env),
            Err(EnvError::Malformed { .. })
        ));
    }
}
