use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use nftproxy::config::{Cli, Command, LogFormat, ProxyConfig};
use nftproxy::nft::ir::Family;
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
        Command::Run(args) => {
            init_tracing(args.log_format, args.verbosity);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("nftproxy: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(nftproxy::agent::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("nftproxy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup(args) => {
            let mut tables = vec![(Family::Ip, "nftproxy"), (Family::Ip6, "nftproxy")];
            if args.kube_proxy {
                tables.extend([(Family::Ip, "kube-proxy"), (Family::Ip6, "kube-proxy")]);
            }
            match nftproxy::apply::netlink::delete_tables(&tables) {
                Ok(n) => {
                    println!("deleted {n} table(s)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nftproxy cleanup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat, verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // RUST_LOG, when set, refines the verbosity flag (e.g. RUST_LOG=nftproxy=debug,kube=warn).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},kube=warn,hyper=warn,tower=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
