//! Architecture invariants of the node crate, checked on its source: the modules' imports form no
//! circle, and the runtime knows nothing of what subscribes to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules it names (`crate::x`), from every file of the module.
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut visit = |module: String, text: String| {
        let uses = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `crate::Config` and other re-exports at the root are their module's.
            let name = match name.as_str() {
                "Config" => "config".to_string(),
                "Node" | "NodeError" => "runtime".to_string(),
                _ => name,
            };
            if !name.is_empty() && name != module && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                uses.insert(name);
            }
        }
    };
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut text = String::new();
            for f in std::fs::read_dir(&path).unwrap() {
                text.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
            }
            visit(name, text);
        } else if name != "lib" && name != "main" {
            visit(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    graph
}

/// A circle in `graph`, if it has one (depth-first search).
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn walk(
        at: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|m| m == at) {
            let mut circle = path[i..].to_vec();
            circle.push(at.to_string());
            return Some(circle);
        }
        if done.contains(at) {
            return None;
        }
        path.push(at.to_string());
        for next in graph.get(at).into_iter().flatten() {
            if let Some(c) = walk(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(at.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| walk(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_node_modules_import_each_other_in_one_direction_only() {
    let graph = module_imports();
    assert!(graph.contains_key("runtime") && graph.contains_key("http"), "{graph:?}");
    assert_eq!(find_circle(&graph), None, "import circle among node modules: {graph:?}");
}

#[test]
fn the_runtime_knows_nothing_of_its_subscribers_or_of_http() {
    let graph = module_imports();
    let runtime = &graph["runtime"];
    for subscriber in ["mesh", "inference", "http"] {
        assert!(!runtime.contains(subscriber), "runtime imports {subscriber}: it should publish commits, not call it");
    }
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_circle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_circle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
