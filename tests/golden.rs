//! Scenario goldens: objects -> compile -> full plan -> fake apply -> dump, compared (normalised)
//! with tests/scenarios/NAME.nft. `BLESS=1 cargo test --test golden` rewrites the goldens.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use nftproxy::apply::fake::FakeApplier;
use nftproxy::apply::Applier;
use nftproxy::nft::{plan, render};

#[test]
fn scenarios_match_goldens() {
    let dir = common::root().join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let bless = std::env::var("BLESS").as_deref() == Ok("1");
    let mut failures = Vec::new();
    for path in files {
        let rs = common::compile_file(&path, "");
        let mut fake = FakeApplier::new();
        fake.apply(&plan::full(&rs)).expect("fake apply");
        let dump = fake.dump();
        assert_eq!(
            render::normalise(&dump),
            render::normalise(&render::ruleset(&rs)),
            "fake state equals the desired ruleset"
        );
        let golden = path.with_extension("nft");
        if bless {
            std::fs::write(&golden, &dump).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if render::normalise(&want) != render::normalise(&dump) {
            failures.push(format!(
                "{} (golden - / got +):\n{}",
                golden.display(),
                render::diff(&want, &dump)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nRun with BLESS=1 to accept.",
        failures.join("\n")
    );
}
