//! `nftproxy render`: objects file -> the ruleset `run` would program.

use std::process::ExitCode;

use super::args::RenderArgs;
use crate::nft::render;
use crate::pipeline;

pub fn render(args: RenderArgs) -> ExitCode {
    let objs = match super::read_objects(&args.file) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("nftproxy render: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = match args.proxy.proxy_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nftproxy render: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = objs.node_info(args.proxy.hostname_override.as_deref());
    if args.proxy.hostname_override.is_none() {
        cfg.node_name = node.name.clone();
    }
    match pipeline::from_objects(&objs, &cfg, &node) {
        Ok(out) => {
            for p in out.problems {
                eprintln!("skipped: {}: {}", p.object, p.reason);
            }
            print!("{}", render::ruleset(&out.ruleset));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nftproxy render: {e}");
            ExitCode::FAILURE
        }
    }
}
