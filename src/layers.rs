//! The architecture as a rule the tests hold. Each top-level module sits on a layer and uses
//! only modules on layers below its own, so the module graph has no cycle and no arrow up.
//! `cargo test --lib layers` reads every `crate::` path in the library's files (outside
//! comments and unit tests) and checks it against [`LAYERS`]; a new module must be given its
//! place here.

/// Bottom first. A module may use the modules of the layers before its own, never its own
/// layer's siblings nor anything after.
pub const LAYERS: &[&[&str]] = &[
    // Vocabulary and plumbing that know nothing of the rest.
    &["sync", "wire", "oci", "ca", "layers"],
    // What a request asks for; the disk; coalescing; containerd's files; accepting connections.
    &["fetch", "store", "coalesce", "containerd", "listener"],
    // The two places bytes come from: registries and peers.
    &["upstream", "peers"],
    // Decisions made with a registry's answers: who may read what, which hosts to intercept.
    &["authorize", "intercept"],
    // The request path's error, over every layer below.
    &["error"],
    // The one chain of sources.
    &["sources"],
    // Blobs (one flight per digest), manifests (tags, coalesced lookups) and listings (tag
    // lists and referrers, passed through).
    &["flight", "manifests", "listings"],
    // The listeners: the registry API, the peer port, the admin port.
    &["server", "metrics"],
    // Settings for all of the above, from flags, environment and file.
    &["config"],
    // `run`: the node, wired.
    &["lib"],
];

/// The binary's modules, beside `main`: they use the library by its public paths, as any
/// client would, so the library's layers do not cover them.
pub const BINARY: &[&str] = &["main", "bundle"];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::LAYERS;

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|layer| layer.contains(&module))
    }

    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level module a file belongs to: `flight` for `src/flight/tail.rs`, `lib` for
    /// `src/lib.rs`.
    fn owner(src: &Path, file: &Path) -> String {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
        first.trim_end_matches(".rs").to_owned()
    }

    /// The code of a file: no comment lines, and nothing from its unit tests on.
    fn code(text: &str) -> String {
        let text = text.split("#[cfg(test)]").next().unwrap();
        text.lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every module a piece of code names with a `crate::` path, grouped `use`s included.
    fn uses(code: &str) -> BTreeSet<String> {
        let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
        let mut found = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            match rest.strip_prefix('{') {
                Some(group) => {
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    found.extend(group.split(',').map(|item| ident(item.trim())));
                }
                None => {
                    found.insert(ident(rest));
                }
            }
        }
        found.retain(|m| !m.is_empty() && m != "self");
        found
    }

    #[test]
    fn the_reader_finds_every_form_of_path() {
        let code = code("use crate::a::B;\n// crate::commented\nfn f() { crate::b::f(); }\nuse crate::{c, d::E};");
        let expected: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        assert_eq!(uses(&code), expected);
    }

    /// What breaks the layering in `files`, given as (owning module, path, text).
    fn violations(files: &[(String, String, String)]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (from, path, text) in files {
            let Some(from_layer) = layer(from) else {
                wrong.push(format!("{from} ({path}) has no place in LAYERS"));
                continue;
            };
            for to in uses(&code(text)).into_iter().filter(|to| to != from) {
                // The crate root's re-exports are the `lib` layer.
                let root = ["run", "Config", "Listeners"].contains(&to.as_str());
                match layer(&to).or_else(|| root.then(|| layer("lib").unwrap())) {
                    Some(to_layer) if to_layer < from_layer => {}
                    Some(_) => wrong.push(format!("{path} uses {to}, which is not below {from}")),
                    None => wrong.push(format!("{path} uses {to}, which has no place in LAYERS")),
                }
            }
        }
        wrong
    }

    #[test]
    fn arrows_up_beside_and_to_nowhere_are_caught() {
        let file = |from: &str, text: &str| (from.to_owned(), format!("src/{from}.rs"), text.to_owned());
        let wrong = violations(&[
            file("store", "use crate::oci::Digest;\nuse crate::flight::Flight;"),
            file("upstream", "use crate::peers::Peers;"),
            file("sources", "use crate::nowhere::X;"),
            file("newcomer", ""),
        ]);
        assert_eq!(
            wrong,
            [
                "src/store.rs uses flight, which is not below store",
                "src/upstream.rs uses peers, which is not below upstream",
                "src/sources.rs uses nowhere, which has no place in LAYERS",
                "newcomer (src/newcomer.rs) has no place in LAYERS",
            ]
        );
    }

    #[test]
    fn no_module_uses_a_layer_above_or_beside_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let files: Vec<_> = all
            .iter()
            .map(|f| (owner(&src, f), f))
            .filter(|(owner, _)| !super::BINARY.contains(&owner.as_str()))
            .map(|(owner, f)| (owner, f.display().to_string(), std::fs::read_to_string(f).unwrap()))
            .collect();
        let wrong = violations(&files);
        assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    }
}
