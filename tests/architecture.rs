//! Enforces ARCHITECTURE.md's layer rules on the source text of `src/`: which top-level module
//! may name which (`ALLOWED`, lowest layer first), who may name the kernel applier, that the pure
//! layers never name nftables, that the main crate holds no `unsafe`, that the table lists every
//! top-level module, and that the modules' import graph has no cycle.
//!
//! Only non-test code counts: each file up to its first `#[cfg(test)]` line; files named
//! `tests.rs` or `*_tests.rs` and `src/pipeline/gen.rs` are skipped. References are the paths
//! `crate::NAME` and `crate::{NAME, ...}` left once comments and the contents of string and char
//! literals are removed. `super::` paths are not followed: none leaves its top-level module.
//! Keep test-only code after the `#[cfg(test)]` line: anything below it is not checked.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every top-level module, for the two that wire (and test) them all.
#[rustfmt::skip]
const EVERY: &[&str] = &[
    "net", "lock", "model", "proxy", "k8s", "nft", "trace", "pipeline", "explain", "apply",
    "conntrack", "sync", "observe", "cmd", "testutil",
];

/// The layer table, lowest first: each top-level module of `src/` and the modules it may name
/// besides itself. ARCHITECTURE.md shows the same table: change both together.
#[rustfmt::skip]
const ALLOWED: &[(&str, &[&str])] = &[
    ("net",       &[]),
    ("lock",      &[]),
    ("model",     &["net"]),
    ("proxy",     &["net", "model"]),
    ("k8s",       &["net", "lock", "model"]),
    ("nft",       &["net", "model", "proxy"]),
    ("trace",     &["net", "nft"]),
    ("pipeline",  &["net", "model", "proxy", "k8s", "nft"]),
    ("explain",   &["net", "model", "proxy", "k8s", "nft", "trace", "pipeline"]),
    ("apply",     &["net", "nft"]),
    ("conntrack", &["net", "proxy"]),
    ("sync",      &["net", "lock", "model", "proxy", "pipeline", "nft", "apply", "conntrack"]),
    // observe only reads the sync loop's Reports: it never names apply.
    ("observe",   &["net", "lock", "model", "proxy", "k8s", "nft", "pipeline", "explain", "sync", "conntrack"]),
    ("cmd",       EVERY),
    ("testutil",  EVERY),
];

/// One file of a top-level module: its path from the crate root (`src/k8s/watch.rs`), its
/// module (`k8s`) and its code up to the first `#[cfg(test)]`, comments and literals removed.
struct Source {
    path: String,
    module: String,
    code: String,
}

/// (path from the crate root, text) of every `.rs` file under `src/`, sorted by path.
fn files() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    walk(&root.join("src"), &mut paths);
    paths.sort();
    let read = |p: PathBuf| {
        let path = p.strip_prefix(root).unwrap().display().to_string();
        (path, fs::read_to_string(p).unwrap())
    };
    paths.into_iter().map(read).collect()
}

/// The non-test code of every module file (lib.rs and main.rs belong to no module).
fn sources() -> Vec<Source> {
    let mut sources = Vec::new();
    for (path, text) in files() {
        let name = path.rsplit('/').next().unwrap();
        let test_only = name == "tests.rs" || name.ends_with("_tests.rs");
        if test_only
            || ["src/lib.rs", "src/main.rs", "src/pipeline/gen.rs"].contains(&path.as_str())
        {
            continue;
        }
        let first = path["src/".len()..].split('/').next().unwrap();
        let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
        let cut: usize = text
            .split_inclusive('\n')
            .take_while(|line| !line.trim_start().starts_with("#[cfg(test)]"))
            .map(str::len)
            .sum();
        let code = strip(&text[..cut]);
        sources.push(Source { path, module, code });
    }
    sources
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// `text` without comments, and with every string, byte string, raw string and char literal
/// reduced to `""`, so that nothing in a comment or a literal reads as code. Lifetimes stay.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize, s: &[char]| c[i..].starts_with(s);
    let (mut out, mut i) = (String::new(), 0);
    while i < c.len() {
        if at(i, &['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(i, &['/', '*']) {
            let mut depth = 0; // block comments nest
            while i < c.len() {
                let (open, close) = (at(i, &['/', '*']), at(i, &['*', '/']));
                depth += i32::from(open) - i32::from(close);
                i += if open || close { 2 } else { 1 };
                if depth == 0 {
                    break;
                }
            }
            out.push(' ');
        } else if let Some(end) = literal_end(&c, i) {
            out.push_str("\"\"");
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// If a literal (`"…"`, `b"…"`, `r#"…"#`, `br"…"`, `'x'`, `b'\n'`) starts at `c[i]`, the index
/// just after it. A quote not closed two characters on (`'a`) opens a lifetime or a label.
fn literal_end(c: &[char], i: usize) -> Option<usize> {
    if i > 0 && is_ident(c[i - 1]) && c[i].is_alphabetic() {
        return None; // the `r` of `for`, the `b` of `sub`
    }
    let j = if c[i] == 'b' { i + 1 } else { i };
    if c.get(j) == Some(&'r') {
        let hashes = c[j + 1..].iter().take_while(|&&h| h == '#').count();
        if c.get(j + 1 + hashes) != Some(&'"') {
            return None; // an identifier, or a raw identifier such as `r#type`
        }
        let closes = |k: &usize| {
            c[*k] == '"'
                && c.get(k + 1..k + 1 + hashes)
                    .is_some_and(|h| h.iter().all(|&x| x == '#'))
        };
        let end = (j + 2 + hashes..c.len()).find(closes);
        return Some(end.map_or(c.len(), |k| k + 1 + hashes));
    }
    match c.get(j) {
        Some('"') => {
            let mut k = j + 1;
            while k < c.len() && c[k] != '"' {
                k += if c[k] == '\\' { 2 } else { 1 };
            }
            Some(c.len().min(k + 1))
        }
        Some('\'') if c.get(j + 1) == Some(&'\\') => {
            (j + 3..c.len()).find(|&k| c[k] == '\'').map(|k| k + 1)
        }
        Some('\'') if c.get(j + 2) == Some(&'\'') => Some(j + 3),
        _ => None,
    }
}

/// Where `word` occurs in `code` without being glued to an identifier on either side.
fn find_token<'a>(code: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(word)
        .map(|(at, _)| at)
        .filter(move |&at| {
            let before = code[..at].chars().next_back();
            let after = code[at + word.len()..].chars().next();
            let glued_before = word.starts_with(is_ident) && before.is_some_and(is_ident);
            let glued_after = word.ends_with(is_ident) && after.is_some_and(is_ident);
            !glued_before && !glued_after
        })
}

/// The top-level modules `code` names as `crate::NAME` or in `crate::{NAME, NAME::…, …}`.
fn references(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut add = |item: &str| {
        let item = item.trim_start();
        let name = &item[..item.find(|ch: char| !is_ident(ch)).unwrap_or(item.len())];
        if !name.is_empty() && name != "self" {
            names.insert(name.to_string());
        }
    };
    for at in find_token(code, "crate::") {
        let rest = code[at + "crate::".len()..].trim_start();
        let Some(group) = rest.strip_prefix('{') else {
            add(rest);
            continue;
        };
        let (mut depth, mut start) = (0, 0);
        for (k, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' if depth > 0 => depth -= 1,
                ',' | '}' if depth == 0 => {
                    add(&group[start..k]);
                    start = k + 1;
                    if ch == '}' {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Fails with one line per violation when there are any.
fn assert_none(rule: &str, violations: &[String]) {
    let list = violations.join("\n");
    assert!(list.is_empty(), "{rule}:\n{list}");
}

#[test]
fn modules_reference_only_lower_layers() {
    let mut violations = Vec::new();
    for Source { path, module, code } in sources() {
        let may: &[&str] = match ALLOWED.iter().find(|(m, _)| *m == module) {
            Some((_, names)) => names,
            None => &[],
        };
        let list = if may.is_empty() {
            "none".to_string()
        } else {
            may.join(", ")
        };
        for name in references(&code) {
            if name != module && !may.contains(&name.as_str()) {
                violations.push(format!(
                    "{path}: module {module} imports crate::{name} (allowed: {list})"
                ));
            }
        }
    }
    assert_none(
        "a module names a higher layer (ALLOWED, ARCHITECTURE.md)",
        &violations,
    );
}

#[test]
fn only_sync_cmd_and_apply_name_the_applier() {
    let mut violations = Vec::new();
    for Source { path, module, code } in sources() {
        for word in ["apply::netlink", "NetlinkApplier"] {
            if !["apply", "sync", "cmd"].contains(&module.as_str()) && code.contains(word) {
                let why = "only sync (the kernel writer), cmd and apply may";
                violations.push(format!("{path}: module {module} names {word}: {why}"));
            }
        }
        if !["apply", "sync", "cmd", "testutil"].contains(&module.as_str())
            && code.contains("Applier")
        {
            violations.push(format!(
                "{path}: module {module} names an Applier: only apply, sync, cmd and testutil may"
            ));
        }
    }
    assert_none("only sync writes the kernel", &violations);
}

#[test]
fn pure_layers_never_name_nftables() {
    let violations: Vec<String> = sources()
        .into_iter()
        .filter(|s| ["net", "model", "proxy", "k8s"].contains(&s.module.as_str()))
        .filter(|s| find_token(&s.code, "nft::").next().is_some())
        .map(|s| format!("{}: module {} mentions nft::", s.path, s.module))
        .collect();
    assert_none(
        "net, model, proxy and k8s know nothing of nftables",
        &violations,
    );
}

#[test]
fn no_unsafe_in_the_main_crate() {
    let violations: Vec<String> = files()
        .into_iter()
        .filter(|(_, text)| find_token(&strip(text), "unsafe").next().is_some())
        .map(|(path, _)| format!("{path}: unsafe"))
        .collect();
    assert_none(
        "the main crate forbids unsafe_code: every unsafe line is in crates/nftproxy-nl",
        &violations,
    );
}

#[test]
fn the_table_lists_every_top_level_module() {
    let mut on_disk = BTreeSet::new();
    for entry in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".rs");
        if path.is_dir() {
            on_disk.insert(name);
        } else if let Some(stem) = stem.filter(|s| !["lib", "main"].contains(s)) {
            on_disk.insert(stem.to_string());
        }
    }
    let rows: BTreeSet<String> = ALLOWED.iter().map(|(m, _)| m.to_string()).collect();
    let missing: Vec<String> = on_disk
        .difference(&rows)
        .map(|m| format!("src/{m}"))
        .collect();
    assert_none(
        "modules without a row in ALLOWED (and ARCHITECTURE.md)",
        &missing,
    );
    let named = ALLOWED
        .iter()
        .flat_map(|(m, names)| names.iter().chain([m]));
    let named: BTreeSet<String> = named.map(|m| m.to_string()).collect();
    let gone: Vec<String> = named.difference(&on_disk).cloned().collect();
    assert_none("ALLOWED names modules that are not under src/", &gone);
}

/// A cycle in `graph` as the path that closes it (`a -> b -> a`), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        done.insert(path.pop().unwrap());
        None
    }
    let (mut path, mut done) = (Vec::new(), BTreeSet::new());
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut path, &mut done))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let wiring = ["cmd", "testutil"];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for Source { module, code, .. } in sources() {
        if wiring.contains(&module.as_str()) {
            continue;
        }
        let names = references(&code).into_iter();
        let edges = names.filter(|name| *name != module && !wiring.contains(&name.as_str()));
        graph.entry(module.clone()).or_default().extend(edges);
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the top-level modules import each other in a cycle: {}",
            cycle.join(" -> ")
        );
    }
}
