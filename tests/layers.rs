//! The dependency rule, checked: every `crate::` path in `src/` must point
//! at a layer below its file's own (ARCHITECTURE.md, "Layers").
//!
//! ```text
//! L0 model, clock          L4 deferral | resolution | webhooks
//! L1 config, metrics,      L5 server
//!    pricing               L6 app
//! L2 store, providers,     sim  -> model only
//!    upstream              demo -> app, sim (and so anything)
//! L3 engine
//! ```
//!
//! Same-layer imports stay inside one module, but for the pairs in
//! `SIDEWAYS`. The three workers of L4 never import each other, except
//! deferral calling the pure `webhooks::target` check at intake.
//!
//! `KNOWN` lists today's violations (file -> module). It may only shrink:
//! the test fails on a violation not in it, and on an entry that no longer
//! occurs, so the list stays exact. This is a stand-in for crate boundaries
//! until a workspace split lets the compiler enforce the rule.

use std::collections::BTreeSet;
use std::path::Path;

/// Module prefix, its layer, and the module it belongs to (the same but for
/// `proxy/`'s files, each counted where it is headed while `proxy/` is
/// dissolved). The longest matching prefix wins.
const LAYERS: &[(&str, Layer, &str)] = &[
    ("model", Layer::Rank(0), "model"),
    ("clock", Layer::Rank(0), "clock"),
    ("config", Layer::Rank(1), "config"),
    ("metrics", Layer::Rank(1), "metrics"),
    ("pricing", Layer::Rank(1), "pricing"),
    ("store", Layer::Rank(2), "store"),
    ("providers", Layer::Rank(2), "providers"),
    ("upstream", Layer::Rank(2), "upstream"),
    ("engine", Layer::Rank(3), "engine"),
    ("deferral", Layer::Rank(4), "deferral"),
    ("resolution", Layer::Rank(4), "resolution"),
    ("webhooks", Layer::Rank(4), "webhooks"),
    ("server", Layer::Rank(5), "server"),
    ("app", Layer::Rank(6), "app"),
    ("sim", Layer::Sim, "sim"),
    ("demo", Layer::Demo, "demo"),
    // Transitional: `proxy/` until its files reach upstream/, deferral/, server/.
    ("proxy::forward", Layer::Rank(2), "upstream"),
    ("proxy::headers", Layer::Rank(2), "upstream"),
    ("proxy::health", Layer::Rank(2), "upstream"),
    ("proxy::classify", Layer::Rank(4), "deferral"),
    ("proxy", Layer::Rank(5), "server"),
];

/// Same-layer imports across modules that the rule allows: (from, to prefix).
const SIDEWAYS: &[(&str, &str)] = &[
    // metrics' families are configured (bucket bounds) and so is pricing.
    ("metrics", "config"),
    ("pricing", "config"),
    // deferral checks a callback URL at intake with webhooks' pure SSRF guard.
    ("deferral", "webhooks::target"),
];

/// Today's violations, (file under src/, module it reaches). Only shrinks.
const KNOWN: &[(&str, &str)] = &[
    ("deferral/engine.rs", "proxy"),
    ("deferral/engine.rs", "resolution"),
    ("deferral/flusher.rs", "resolution"),
    ("deferral/handles.rs", "server"),
    ("deferral/inline.rs", "resolution"),
    ("deferral/intake.rs", "server"),
    ("deferral/refusals.rs", "server"),
    ("metrics.rs", "pricing"),
    ("metrics.rs", "providers"),
    ("metrics.rs", "store"),
    ("proxy/classify.rs", "proxy"),
    ("proxy/classify.rs", "server"),
    ("proxy/forward.rs", "server"),
    ("proxy/mod.rs", "app"),
    ("resolution/badlines.rs", "deferral"),
    ("resolution/deadline.rs", "deferral"),
    ("resolution/fallback.rs", "deferral"),
    ("resolution/fallback.rs", "server"),
    ("resolution/janitor.rs", "deferral"),
    ("resolution/orphans.rs", "deferral"),
    ("resolution/poller.rs", "deferral"),
    ("resolution/reconcile.rs", "deferral"),
    ("resolution/waiters.rs", "deferral"),
    ("server/admin.rs", "app"),
    ("server/mod.rs", "app"),
    ("server/observe.rs", "app"),
    ("server/ops.rs", "app"),
    ("server/requests.rs", "app"),
    ("server/savings.rs", "app"),
    ("sim/anthropic.rs", "providers"),
    ("webhooks/signing.rs", "deferral"),
    ("webhooks/worker.rs", "deferral"),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    Rank(u8),
    /// The simulated provider: may import `model` only.
    Sim,
    /// `carpool demo`: above `app` and `sim`.
    Demo,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    /// The importing file, relative to `src/`.
    file: String,
    /// The table entry the import reached (`server`, `proxy::forward`, ...).
    module: String,
    /// One full path that made it, for the message.
    path: String,
}

/// The table entry (prefix and layer) a module path falls under.
fn layer_of(path: &[String]) -> Option<Entry> {
    let joined = path.join("::");
    LAYERS
        .iter()
        .filter(|(prefix, _, _)| under(&joined, prefix))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|&(prefix, layer, group)| Entry {
            prefix,
            layer,
            group,
        })
}

/// Whether `path` is `prefix` or inside it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}::"))
}

#[derive(Clone, Copy)]
struct Entry {
    prefix: &'static str,
    layer: Layer,
    group: &'static str,
}

/// Whether a file under `from` may name `to` (both table entries).
fn allowed(from: Entry, to: Entry, path: &[String]) -> bool {
    let joined = path.join("::");
    match (from.layer, to.layer) {
        _ if from.group == to.group => true,
        (Layer::Demo, _) => true,
        (Layer::Sim, _) => to.group == "model",
        (_, Layer::Sim) | (_, Layer::Demo) => false,
        (Layer::Rank(a), Layer::Rank(b)) if b < a => true,
        (Layer::Rank(a), Layer::Rank(b)) if a == b => SIDEWAYS
            .iter()
            .any(|(f, t)| from.group == *f && under(&joined, t)),
        _ => false,
    }
}

/// The module path of a file under `src/` (`deferral/engine.rs` ->
/// `deferral::engine`, `config/mod.rs` -> `config`).
fn module_of(file: &str) -> Vec<String> {
    let trimmed = file.strip_suffix(".rs").unwrap_or(file);
    let mut parts: Vec<String> = trimmed.split('/').map(str::to_owned).collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts
}

/// The source with comments, string and char literals blanked out, so only
/// code is searched.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| (p.is_alphanumeric() || *p == '_') && *p != 'b')
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &skipped in &chars[i..j.min(chars.len())] {
                out.push(blank(skipped));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A char literal ('x' or '\n', '\''); a lifetime has no closing quote.
            let mut j = i + 1;
            if chars.get(j) == Some(&'\\') {
                j += 2;
            } else {
                j += 1;
            }
            while j < chars.len() && chars[j] != '\'' {
                j += 1;
            }
            for _ in i..=j.min(chars.len() - 1) {
                out.push(' ');
            }
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every module path a `crate::` occurrence names: `crate::a::b::C` gives
/// `a::b::C`; `use crate::{a, b::{c, d}}` gives `a`, `b::c`, `b::d`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let needle: Vec<char> = "crate".chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + needle.len() <= chars.len() {
        let at_word = chars[i..i + needle.len()] == needle[..]
            && !(i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == '$'));
        if at_word {
            let mut j = i + needle.len();
            skip_space(&chars, &mut j);
            if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                j += 2;
                tree(&chars, &mut j, Vec::new(), &mut found);
                i = j;
                continue;
            }
        }
        i += 1;
    }
    found
}

fn skip_space(chars: &[char], j: &mut usize) {
    while chars.get(*j).is_some_and(|c| c.is_whitespace()) {
        *j += 1;
    }
}

/// One use tree at `j`, with the segments before it in `prefix`.
fn tree(chars: &[char], j: &mut usize, prefix: Vec<String>, found: &mut Vec<Vec<String>>) {
    skip_space(chars, j);
    if chars.get(*j) == Some(&'{') {
        *j += 1;
        loop {
            skip_space(chars, j);
            match chars.get(*j) {
                None => return,
                Some('}') => {
                    *j += 1;
                    return;
                }
                Some(',') => *j += 1,
                Some(_) => {
                    let before = *j;
                    tree(chars, j, prefix.clone(), found);
                    if *j == before {
                        *j += 1;
                    }
                }
            }
        }
    }
    let start = *j;
    while chars.get(*j).is_some_and(|c| is_ident(*c)) {
        *j += 1;
    }
    let segment: String = chars[start..*j].iter().collect();
    if segment.is_empty() || segment == "self" {
        if !prefix.is_empty() {
            found.push(prefix);
        }
        if chars.get(*j) == Some(&'*') {
            *j += 1;
        }
        return;
    }
    let mut path = prefix;
    path.push(segment);
    let mut k = *j;
    skip_space(chars, &mut k);
    if chars.get(k) == Some(&':') && chars.get(k + 1) == Some(&':') {
        *j = k + 2;
        tree(chars, j, path, found);
    } else {
        found.push(path);
    }
}

/// The violations in one file's source.
fn violations_in(file: &str, source: &str) -> Vec<Violation> {
    let Some(from) = layer_of(&module_of(file)) else {
        return Vec::new();
    };
    let mut out = BTreeSet::new();
    for path in crate_paths(&code_only(source)) {
        let Some(to) = layer_of(&path) else {
            continue;
        };
        if !allowed(from, to, &path) {
            out.insert(Violation {
                file: file.to_owned(),
                module: to.prefix.to_owned(),
                path: path.join("::"),
            });
        }
    }
    // One per (file, module): the first path names it.
    let mut seen = BTreeSet::new();
    out.into_iter()
        .filter(|v| seen.insert((v.file.clone(), v.module.clone())))
        .collect()
}

fn rust_files(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );

    let mut found = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(src.join(file))
            .unwrap_or_else(|e| panic!("reading src/{file}: {e}"));
        found.extend(violations_in(file, &source));
    }

    let known: BTreeSet<(&str, &str)> = KNOWN.iter().copied().collect();
    let new: Vec<String> = found
        .iter()
        .filter(|v| !known.contains(&(v.file.as_str(), v.module.as_str())))
        .map(|v| {
            format!(
                "  src/{} -> crate::{}  (new: (\"{}\", \"{}\"); fix it, do not add it to KNOWN)",
                v.file, v.path, v.file, v.module
            )
        })
        .collect();
    let occurring: BTreeSet<(&str, &str)> = found
        .iter()
        .map(|v| (v.file.as_str(), v.module.as_str()))
        .collect();
    let gone: Vec<String> = KNOWN
        .iter()
        .filter(|k| !occurring.contains(k))
        .map(|(file, module)| {
            format!("  (\"{file}\", \"{module}\") no longer occurs: remove it from KNOWN")
        })
        .collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "imports against the layer order:\n{}\n{}\n",
        new.join("\n"),
        gone.join("\n")
    );
}

#[test]
fn catches_a_planted_upward_import() {
    let planted = r#"
        //! use crate::app::App; in a doc comment is not an import.
        use std::sync::Arc;
        use crate::{
            config::Config,
            server::{error::ApiError, auth},
        };
        fn f() -> &'static str {
            let _ = 'x';
            let _ = crate::deferral::intake::defer;
            "crate::app::run"
        }
    "#;
    let got: Vec<(String, String)> = violations_in("model.rs", planted)
        .into_iter()
        .map(|v| (v.module, v.path))
        .collect();
    assert_eq!(
        got,
        vec![
            ("config".to_owned(), "config::Config".to_owned()),
            ("deferral".to_owned(), "deferral::intake::defer".to_owned()),
            ("server".to_owned(), "server::auth".to_owned()),
        ]
    );
}

#[test]
fn workers_do_not_import_each_other() {
    let source = "use crate::resolution::waiters::Waiters;\n\
                  use crate::webhooks::target::check_at_intake;\n\
                  use crate::webhooks::worker::run;\n\
                  use crate::store::Store;\n";
    let got: Vec<String> = violations_in("deferral/intake.rs", source)
        .into_iter()
        .map(|v| v.path)
        .collect();
    assert_eq!(
        got,
        vec!["resolution::waiters::Waiters", "webhooks::worker::run"]
    );
}

#[test]
fn sim_reaches_model_only_and_demo_anything() {
    let source = "use crate::model::Dialect;\nuse crate::providers::anthropic;\n";
    let sim: Vec<String> = violations_in("sim/jobs.rs", source)
        .into_iter()
        .map(|v| v.path)
        .collect();
    assert_eq!(sim, vec!["providers::anthropic"]);
    let demo = "use crate::app;\nuse crate::sim::Sim;\nuse crate::config::Config;\n";
    assert!(violations_in("demo/mod.rs", demo).is_empty());
    assert_eq!(violations_in("app.rs", "use crate::sim::Sim;\n").len(), 1);
}
