use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use nftproxy::config::{Cli, Command, ProxyConfig};
use nftproxy::nft::render;
use nftproxy::objects::Objects;
use nftproxy::render_cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Render(args) => {
            let text = if args.file == "-" {
                let mut s = String::new();
                if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                    eprintln!("nftproxy render: reading stdin: {e}");
                    return ExitCode::FAILURE;
                }
                s
            } else {
                match std::fs::read_to_string(&args.file) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("nftproxy render: {}: {e}", args.file);
                        return ExitCode::FAILURE;
                    }
                }
            };
            let objs = match Objects::parse(&text) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("nftproxy render: {}: {e}", args.file);
                    return ExitCode::FAILURE;
                }
            };
            let mut cfg = match ProxyConfig::from_args(&args.proxy) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nftproxy render: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let node = render_cmd::pick_node(&objs, args.proxy.hostname_override.as_deref());
            if args.proxy.hostname_override.is_none() {
                cfg.node_name = node.name.clone();
            }
            match render_cmd::compile_objects(&objs, &cfg, &node) {
                Ok((rs, problems)) => {
                    for p in problems {
                        eprintln!("skipped: {}: {}", p.object, p.reason);
                    }
                    print!("{}", render::ruleset(&rs));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nftproxy render: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(_) | Command::Cleanup(_) => {
            eprintln!("not yet wired");
            ExitCode::FAILURE
        }
    }
}
