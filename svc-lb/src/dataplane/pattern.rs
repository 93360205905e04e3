//! Which interfaces get the datapath: `--iface` values are exact names (`cni0`) or shell-style
//! glob patterns (`lxc*`, `veth?`, `eth[0-3]`). Exact names must exist when the agent starts (a
//! typo must not go unnoticed); patterns may match nothing yet, because pod interfaces come and
//! go while the agent runs.

use super::DataplaneError;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// The parsed `--iface` values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceSelector {
    names: Vec<String>,
    patterns: Vec<String>,
}

/// Whether an `--iface` value is a glob pattern rather than a name. Interface names may contain
/// almost any byte, but `*`, `?` and `[` do not occur in real ones.
pub fn is_pattern(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

impl IfaceSelector {
    /// Splits `specs` into names and patterns, rejecting values no interface could ever match.
    pub fn parse(specs: &[String]) -> Result<IfaceSelector, DataplaneError> {
        let mut sel = IfaceSelector::default();
        for spec in specs {
            let invalid = |reason: &str| DataplaneError::InvalidIface {
                spec: spec.clone(),
                reason: reason.to_string(),
            };
            if spec.is_empty() {
                return Err(invalid("empty"));
            }
            if spec.contains(['/', ' ', '\0']) {
                return Err(invalid("interface names cannot contain '/', ' ' or NUL"));
            }
            if is_pattern(spec) {
                validate_classes(spec).map_err(&invalid)?;
                if !sel.patterns.contains(spec) {
                    sel.patterns.push(spec.clone());
                }
            } else {
                if spec.len() > IFNAME_MAX {
                    return Err(invalid("longer than 15 bytes (IFNAMSIZ)"));
                }
                if !sel.names.contains(spec) {
                    sel.names.push(spec.clone());
                }
            }
        }
        Ok(sel)
    }

    /// Exact names (must exist at start).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether interface `name` gets the datapath.
    pub fn matches(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name) || self.patterns.iter().any(|p| glob_match(p, name))
    }
}

/// Every `[` opens a class that is closed later; an empty class can match nothing.
fn validate_classes(pattern: &str) -> Result<(), &'static str> {
    let p = pattern.as_bytes();
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'[' {
            match class_end(p, i) {
                Some(end) => i = end,
                None => return Err("unclosed '[' in pattern"),
            }
        }
        i += 1;
    }
    Ok(())
}

/// Index of the `]` closing the class that opens at `open`. A `]` right after `[` or `[!`/`[^`
/// is a member, as in the shell.
fn class_end(p: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if matches!(p.get(i), Some(b'!' | b'^')) {
        i += 1;
    }
    if p.get(i) == Some(&b']') {
        i += 1;
    }
    while i < p.len() {
        if p[i] == b']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether byte `c` is in the class `p[open..=end]`.
fn class_matches(p: &[u8], open: usize, end: usize, c: u8) -> bool {
    let mut i = open + 1;
    let negated = matches!(p[i], b'!' | b'^');
    if negated {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    while i < end && (first || p[i] != b']') {
        first = false;
        if i + 2 < end && p[i + 1] == b'-' {
            if (p[i]..=p[i + 2]).contains(&c) {
                found = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                found = true;
            }
            i += 1;
        }
    }
    found != negated
}

/// Shell-style glob match of the whole `name`: `*` any run of bytes, `?` one byte, `[abc]`,
/// `[a-z]`, `[!a]`/`[^a]` one byte of (not of) the class. Anything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, name index it swallowed to).
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, ni));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => match class_end(p, pi) {
                Some(end) if class_matches(p, pi, end, n[ni]) => Some(end + 1),
                Some(_) => None,
                None => (n[ni] == b'[').then_some(pi + 1),
            },
            Some(&c) => (c == n[ni]).then_some(pi + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                ni += 1;
            }
            // Backtrack: let the last `*` swallow one more byte.
            (None, Some((sp, sn))) => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let cases = [
            ("eth*", "eth0", true),
            ("eth*", "eth", true),
            ("eth*", "veth0", false),
            ("*", "anything", true),
            ("lxc*", "lxc12ab34", true),
            ("lxc*", "lx", false),
            ("veth?", "veth1", true),
            ("veth?", "veth12", false),
            ("eth[0-3]", "eth2", true),
            ("eth[0-3]", "eth4", false),
            ("eth[!0-3]", "eth4", true),
            ("eth[^0]", "eth0", false),
            ("n-p[13]", "n-p3", true),
            ("n-p[13]", "n-p2", false),
            ("*-p*", "n-p1", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b", "abab", true),
            ("[]]x", "]x", true),
            ("cni0", "cni0", true),
            ("cni0", "cni01", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p:?} vs {n:?}");
        }
    }

    #[test]
    fn selector_splits_names_and_patterns() {
        let sel = IfaceSelector::parse(&[
            "eth0".into(),
            "lxc*".into(),
            "eth0".into(),
            "n-p[0-9]".into(),
        ])
        .unwrap();
        assert_eq!(sel.names(), ["eth0"]);
        assert_eq!(sel.patterns(), ["lxc*", "n-p[0-9]"]);
        assert!(sel.matches("eth0"));
        assert!(sel.matches("lxcabc"));
        assert!(sel.matches("n-p7"));
        assert!(!sel.matches("eth1"));
        assert!(!sel.matches("n-c"));
    }

    #[test]
    fn selector_rejects_impossible_values() {
        for bad in ["", "eth[0", "a/b", "averyveryverylongname0"] {
            let err = IfaceSelector::parse(&[bad.to_string()]).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("--iface {bad:?}")),
                "{err}"
            );
        }
        // A long pattern is fine: it may still match short names.
        IfaceSelector::parse(&["averyveryverylongname*".into()]).unwrap();
    }
}
