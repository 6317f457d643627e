//! No import cycle between the crate's top-level modules (docs/architecture.md).
//!
//! Data flows one way: definition (`spec`) -> images -> fabric and machines
//! -> lanes -> checks -> artifacts, with `error` at the bottom. The compiler
//! accepts cycles between modules, and the structure view cannot see them,
//! so this test reads the sources: every `crate::x` path in `src/` (in `use`
//! lines, `use crate::{a, b::c}` groups over several lines, inline paths
//! such as `crate::x::f()`, and `super::` chains that climb to the crate
//! root) is an edge from the file's top-level module to `x`. Comments,
//! string literals and `#[cfg(test)]` items are skipped: unit tests may
//! reach anywhere. lib.rs and main.rs are the roots, not modules.
//!
//! It needs nothing but the sources (no script, no network).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// module -> module it refers to -> where first (`path:line`).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// The tokens of Rust source that matter for paths, each with its line;
/// comments, strings and character literals are dropped.
fn tokens(text: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    // Skips a "..." string whose opening quote is at `i`; returns the index after it.
    let skip_string = |mut i: usize, line: &mut usize| {
        i += 1;
        while i < c.len() && c[i] != '"' {
            if c[i] == '\\' {
                i += 1;
            }
            if i < c.len() && c[i] == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied().unwrap_or(' ');
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(i, &mut line);
        } else if ch == '\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
            if next == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let at = c.get(i).copied().unwrap_or(' ');
            // Raw strings r"..", r#".."#, and byte/C strings b"..", br#".."#, c"..".
            if matches!(word.as_str(), "r" | "br" | "cr") && (at == '"' || at == '#') {
                let mut hashes = 0;
                while i < c.len() && c[i] == '#' {
                    hashes += 1;
                    i += 1;
                }
                if c.get(i) == Some(&'"') {
                    i += 1;
                    loop {
                        if i >= c.len() {
                            break;
                        }
                        if c[i] == '\n' {
                            line += 1;
                        }
                        if c[i] == '"'
                            && c[i + 1..]
                                .iter()
                                .take(hashes)
                                .filter(|&&h| h == '#')
                                .count()
                                == hashes
                        {
                            i += 1 + hashes;
                            break;
                        }
                        i += 1;
                    }
                    continue;
                }
                // `r#ident`: a raw identifier.
                let start = i;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                out.push((Tok::Ident(c[start..i].iter().collect()), line));
            } else if matches!(word.as_str(), "b" | "c") && at == '"' {
                i = skip_string(i, &mut line);
            } else if word == "b" && at == '\'' {
                // b'x': the char literal that follows is skipped next round.
            } else {
                out.push((Tok::Ident(word), line));
            }
        } else if ch == ':' && next == ':' {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn punct(t: Option<&(Tok, usize)>, p: char) -> bool {
    matches!(t, Some((Tok::Punct(q), _)) if *q == p)
}

/// Index after the item starting at `i` (which a `#[cfg(test)]` marked):
/// its other attributes, then up to its `;` or the end of its first `{}` block.
fn skip_item(toks: &[(Tok, usize)], mut i: usize) -> usize {
    while punct(toks.get(i), '#') && punct(toks.get(i + 1), '[') {
        i = skip_balanced(toks, i + 1);
    }
    let is_use = ident(toks.get(i)) == Some("use")
        || (ident(toks.get(i)) == Some("pub") && ident(toks.get(i + 1)) == Some("use"));
    let mut depth = 0i32;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']') => depth -= 1,
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 && !is_use {
                    return i + 1;
                }
            }
            Tok::Punct(';') if depth == 0 => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Index after the bracketed group that opens at `i`.
fn skip_balanced(toks: &[(Tok, usize)], mut i: usize) -> usize {
    let mut depth = 0i32;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The crate-level names the source of a file refers to, with their lines.
/// `depth` is how deep the file's module is (src/a.rs and src/a/mod.rs: 1,
/// src/a/b.rs: 2), so that `super::` chains reaching the root count too.
fn crate_refs(text: &str, depth: usize) -> Vec<(String, usize)> {
    let toks = tokens(text);
    let mut out = Vec::new();
    // Brace depths at which inline `mod x { ... }` blocks opened.
    let (mut braces, mut inline_mods) = (0usize, Vec::<usize>::new());
    let mut i = 0;
    while i < toks.len() {
        // `#![cfg(test)]`: the whole file is a unit test.
        if punct(toks.get(i), '#') && punct(toks.get(i + 1), '!') && is_cfg_test(&toks[i + 2..]) {
            return Vec::new();
        }
        if punct(toks.get(i), '#') && is_cfg_test(&toks[i + 1..]) {
            i = skip_item(&toks, i);
            continue;
        }
        let prev_is_path = i > 0 && toks[i - 1].0 == Tok::Path;
        match &toks[i].0 {
            Tok::Punct('{') => braces += 1,
            Tok::Punct('}') => {
                braces = braces.saturating_sub(1);
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
            }
            Tok::Ident(m) if m == "mod" && punct(toks.get(i + 2), '{') => {
                inline_mods.push(braces);
            }
            Tok::Ident(k) if (k == "crate" || k == "super") && !prev_is_path => {
                // Climb: `crate::` is the root; each `super::` one level up.
                let mut j = i;
                let at_root = if k == "crate" {
                    j += 1;
                    true
                } else {
                    let mut ups = 0;
                    while ident(toks.get(j)) == Some("super")
                        && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Path)
                    {
                        ups += 1;
                        j += 2;
                    }
                    j -= 1;
                    ups == depth + inline_mods.len()
                };
                if at_root && toks.get(j).map(|t| &t.0) == Some(&Tok::Path) {
                    let line = toks[j].1;
                    j += 1;
                    if let Some(name) = ident(toks.get(j)) {
                        out.push((name.to_string(), line));
                    } else if punct(toks.get(j), '{') {
                        // `crate::{a, b::c, d::{e, f}}`: the first name of each element.
                        let end = skip_balanced(&toks, j);
                        let mut level = 0;
                        for k in j..end {
                            match &toks[k].0 {
                                Tok::Punct('{') => level += 1,
                                Tok::Punct('}') => level -= 1,
                                Tok::Ident(name)
                                    if level == 1
                                        && name != "self"
                                        && (punct(toks.get(k - 1), '{')
                                            || punct(toks.get(k - 1), ',')) =>
                                {
                                    out.push((name.clone(), toks[k].1));
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Whether `toks` start with `[cfg(test)]`.
fn is_cfg_test(toks: &[(Tok, usize)]) -> bool {
    let want = [
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    toks.len() >= want.len() && toks.iter().zip(&want).all(|(t, w)| &t.0 == w)
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The graph between the top-level modules of the crate whose sources are
/// in `src`: a module is the first path component under `src/` (`a.rs` or
/// `a/`), lib.rs and main.rs are the roots and not modules.
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let module_of = |p: &Path| {
        let rel = p.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        first.strip_suffix(".rs").unwrap_or(&first).to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    for file in &files {
        let from = module_of(file);
        if !modules.contains(&from) {
            continue;
        }
        let rel = file.strip_prefix(src).expect("under src");
        let parts = rel.components().count();
        let depth = if file.file_name().is_some_and(|n| n == "mod.rs") {
            parts - 1
        } else {
            parts
        };
        let text =
            fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for (to, line) in crate_refs(&text, depth) {
            if to != from && modules.contains(&to) {
                graph
                    .get_mut(&from)
                    .expect("a module")
                    .entry(to)
                    .or_insert_with(|| format!("{}:{line}", file.display()));
            }
        }
    }
    graph
}

/// A cycle of `graph` if it has one, as `[a, b, ..., a]`.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        m: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|p| p == m).expect("on the path");
                let mut cycle = path[from..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(m.to_string(), Mark::Open);
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(graph, next, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut marks, &mut Vec::new()))
}

/// The cycle with the place that makes each of its edges.
fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut s = format!(
        "import cycle between top-level modules: {}\n",
        cycle.join(" -> ")
    );
    for w in cycle.windows(2) {
        let _ = writeln!(s, "  {} -> {}: {}", w[0], w[1], graph[&w[0]][&w[1]]);
    }
    s
}

/// The graph of `src`, or the description of its cycle.
fn acyclic_graph(src: &Path) -> Result<Graph, String> {
    let graph = module_graph(src);
    match find_cycle(&graph) {
        Some(cycle) => Err(describe(&graph, &cycle)),
        None => Ok(graph),
    }
}

#[test]
fn the_crate_has_no_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = acyclic_graph(&src).unwrap_or_else(|cycle| panic!("{cycle}"));
    // Not vacuous: the scanner saw the crate and the edges everyone knows.
    assert!(
        graph.len() > 20,
        "only {} modules found in {}",
        graph.len(),
        src.display()
    );
    for (from, to) in [
        ("cluster", "state"),
        ("state", "spec"),
        ("state", "error"),
        ("lane", "spec"),
    ] {
        assert!(
            graph[from].contains_key(to),
            "expected an edge {from} -> {to}"
        );
    }
}

fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (path, text) in files {
        let p = dir.path().join(path);
        fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        fs::write(p, text).expect("write fixture");
    }
    dir
}

#[test]
fn a_cycle_is_found_and_named_with_its_places() {
    let dir = fixture(&[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "b.rs",
            "pub struct B;\npub fn f() -> crate::a::A {\n    crate::a::A\n}\n",
        ),
    ]);
    let graph = module_graph(dir.path());
    let cycle = find_cycle(&graph).expect("a and b import each other");
    assert_eq!(cycle, ["a", "b", "a"]);
    let text = describe(&graph, &cycle);
    assert!(text.contains("a -> b -> a"), "{text}");
    assert!(text.contains("a.rs:1") && text.contains("b.rs:2"), "{text}");
    // The check the crate test makes fails on it, with that text.
    assert_eq!(acyclic_graph(dir.path()).unwrap_err(), text);
}

#[test]
fn groups_inline_paths_and_super_chains_are_edges() {
    let dir = fixture(&[
        ("lib.rs", "pub mod a;\n"),
        (
            "a/mod.rs",
            "mod inner;\nuse crate::{\n    b,\n    c::{self, X},\n    self as me,\n};\n",
        ),
        (
            "a/inner.rs",
            "fn f() { super::super::d::g(); super::local(); }\n",
        ),
        ("b.rs", "pub fn g() -> u8 { crate :: e :: h() }\n"),
        ("c.rs", "mod nested {\n    use super::super::f::Y;\n}\n"),
        ("d.rs", ""),
        ("e.rs", ""),
        ("f.rs", ""),
    ]);
    let graph = module_graph(dir.path());
    let edges = |m: &str| graph[m].keys().cloned().collect::<Vec<_>>();
    assert_eq!(edges("a"), ["b", "c", "d"]);
    assert_eq!(edges("b"), ["e"]);
    assert_eq!(edges("c"), ["f"]);
    assert!(find_cycle(&graph).is_none());
}

#[test]
fn comments_strings_and_unit_tests_are_not_edges() {
    let dir = fixture(&[
        ("a.rs", "pub struct A;\n"),
        (
            "b.rs",
            r##"// crate::a in a comment
/* crate::a /* nested */ crate::a */
const S: &str = "crate::a::A";
const R: &str = r#"crate::a "quoted" "#;
fn lifetime<'a>(x: &'a str) -> char { let _ = x; '"' }
#[cfg(test)]
use crate::a::A;
#[cfg(test)]
mod tests {
    use crate::{a};
    fn f() -> crate::a::A { crate::a::A }
}
"##,
        ),
    ]);
    let graph = module_graph(dir.path());
    assert!(graph["b"].is_empty(), "{:?}", graph["b"]);
    // And the same file with one real path after all that is one edge, on its line.
    let b = fs::read_to_string(dir.path().join("b.rs")).expect("read");
    fs::write(
        dir.path().join("b.rs"),
        format!("{b}pub type T = crate::a::A;\n"),
    )
    .expect("write");
    let graph = module_graph(dir.path());
    let place = format!(
        "{}:{}",
        dir.path().join("b.rs").display(),
        b.lines().count() + 1
    );
    assert_eq!(graph["b"].get("a"), Some(&place));
}
