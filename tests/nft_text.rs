//! The text renderer's output is what nft itself makes of it: load it with `nft -f` in a fresh
//! network namespace and compare nft's listing with the rendered text (normalised).
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use nftproxy::net::Family;
use nftproxy::nft::render;

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn rendered_scenarios_load_and_list_back_identically() {
    common::require_root();
    let dir = common::root().join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let rs = common::compile_file(&path, "");
        let text = render::ruleset(&rs);
        let families: Vec<Family> = rs.tables.keys().copied().collect();
        let listed = common::in_netns(move || {
            common::nft(&["-f", "-"], Some(&text));
            let mut out = String::new();
            for f in families {
                out.push_str(&common::nft(
                    &["list", "table", f.keyword(), "nftproxy"],
                    None,
                ));
            }
            (out, text)
        });
        assert!(
            render::normalise(&listed.0) == render::normalise(&listed.1),
            "{}: listed (-) vs rendered (+):\n{}",
            path.display(),
            render::diff(&listed.0, &listed.1)
        );
    }
}
