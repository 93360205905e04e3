//! The import graph between the top-level modules of the `svc-lb` crate, and the check that it
//! has no cycle (issue 10: the module map in `svc-lb/src/lib.rs` promises layers; a cycle is
//! how layers silently rot).
//!
//! A light tokenizer instead of a full Rust parser (`syn`) on purpose: the check only needs the
//! `crate::…` paths, and it must not add a heavy dependency to xtask. Comments, strings and
//! char literals are skipped so a path in a doc comment or a message is not an edge. Test code
//! counts too: a test that reaches up the layers is a cycle all the same.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, bail};

/// Edges `from → {to}` between top-level modules, read from every `.rs` file under `src`.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads the graph of the crate whose sources are in `src` (`lib.rs` and `main.rs` are the
/// roots, not modules).
pub fn read_graph(src: &Path) -> Result<Graph> {
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect_rs(src, &mut files)?;
    let tops: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    for file in &files {
        let Some(top) = top_module(src, file) else {
            continue;
        };
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let edges = graph.entry(top.clone()).or_default();
        for to in crate_paths(&text) {
            if to != top && tops.contains(&to) {
                edges.insert(to);
            }
        }
    }
    Ok(graph)
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// `src/a.rs` and `src/a/…` belong to module `a`; `lib.rs`, `main.rs` and `bin/` to none.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_string())
}

/// Source text without comments, string and char literals (replaced by spaces).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !is_ident(b[i - 1])) =>
            {
                // Raw string r"…" / r#"…"#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"'
                        && b[j + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&c| c == b'#')
                            .count()
                            == hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                i = j;
                out.push(' ');
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push(' ');
            }
            // A char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a without a closing quote).
            b'\'' => {
                let rest = &b[i + 1..];
                let len = if rest.first() == Some(&b'\\') {
                    rest.iter().skip(1).position(|&c| c == b'\'').map(|p| p + 2)
                } else if rest.get(1) == Some(&b'\'') {
                    Some(1)
                } else {
                    // Multi-byte UTF-8 char literal.
                    std::str::from_utf8(rest)
                        .ok()
                        .or_else(|| std::str::from_utf8(&rest[..rest.len().min(4)]).ok())
                        .and_then(|s| s.chars().next())
                        .filter(|c| c.len_utf8() > 1 && rest.get(c.len_utf8()) == Some(&b'\''))
                        .map(char::len_utf8)
                };
                match len {
                    Some(n) => {
                        i += n + 2;
                        out.push(' ');
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            c => {
                // Copy one whole UTF-8 character.
                let n = utf8_len(c);
                out.push_str(&text[i..i + n]);
                i += n;
            }
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The first segment of every `crate::…` path, including each branch of `crate::{a, b::c}`.
pub fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = code_only(text);
    let b = code.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate") {
        let at = i + pos;
        i = at + 5;
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$')
            || b.get(i).is_some_and(|&c| is_ident(c))
        {
            continue;
        }
        let rest = code[i..].trim_start();
        let Some(rest) = rest.strip_prefix("::") else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at depth-0 commas; each branch starts with the module name.
            let mut depth = 0;
            let mut start = 0;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        push_first(&group[start..k], &mut out);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_first(&group[start..k], &mut out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            push_first(rest, &mut out);
        }
    }
    out
}

fn push_first(branch: &str, out: &mut BTreeSet<String>) {
    let name: String = branch
        .trim_start()
        .chars()
        .take_while(|&c| c.is_ascii_alphanumeric() || c == '_')
        .collect();
    if !name.is_empty() && name != "self" {
        out.insert(name);
    }
}

/// One cycle of the graph if there is one, as `a → b → … → a`.
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            let mut stack = Vec::new();
            if let Some(c) = visit(node, graph, &mut marks, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Fails with the cycle spelled out when the crate's top-level modules import each other in a
/// circle.
pub fn check_acyclic(src: &Path) -> Result<Graph> {
    let graph = read_graph(src)?;
    if let Some(cycle) = find_cycle(&graph) {
        bail!(
            "import cycle between top-level modules of {}: {} (the module map at the top of \
             lib.rs says which layer may import which)",
            src.display(),
            cycle.join(" → ")
        );
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_finds_groups_inline_paths_and_skips_comments_and_strings() {
        let text = r##"
            use crate::{a::X, b, c::{d, e::F}, self};
            use crate::g;
            // crate::commented
            /* crate::blocked /* nested */ crate::still */
            let s = "crate::quoted";
            let r = r#"crate::raw"#;
            let c = '"'; let lt: &'static str = "";
            fn f() -> crate::h::T { crate :: i::j() }
            let not_a_path = my_crate::k;
        "##;
        let found: Vec<_> = crate_paths(text).into_iter().collect();
        assert_eq!(found, ["a", "b", "c", "g", "h", "i"]);
    }

    #[test]
    fn find_cycle_reports_the_loop() {
        let mut g = Graph::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default().insert("a".into());
        g.entry("d".into()).or_default().insert("a".into());
        assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
        g.get_mut("c").unwrap().clear();
        assert_eq!(find_cycle(&g), None);
    }

    #[test]
    fn reads_a_crate_tree() {
        let dir = std::env::temp_dir().join(format!("xtask-modgraph-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("b")).unwrap();
        fs::write(dir.join("lib.rs"), "pub mod a; pub mod b; use crate::a;").unwrap();
        fs::write(dir.join("a.rs"), "use crate::b::x;").unwrap();
        fs::write(dir.join("b/mod.rs"), "pub mod x;").unwrap();
        fs::write(dir.join("b/x.rs"), "use crate::b::y; use crate::a;").unwrap();
        let g = read_graph(&dir).unwrap();
        assert_eq!(g["a"].iter().collect::<Vec<_>>(), ["b"]);
        assert_eq!(g["b"].iter().collect::<Vec<_>>(), ["a"]);
        assert!(check_acyclic(&dir).is_err());
        fs::write(dir.join("b/x.rs"), "use crate::b::y;").unwrap();
        assert!(check_acyclic(&dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
