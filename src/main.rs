use std::io::Read;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use nftproxy::config::{Cli, Command, LogFormat, ProxyConfig};
use nftproxy::nft::ir::Family;
use nftproxy::nft::render;
use nftproxy::objects::Objects;
use nftproxy::render_cmd;

fn main() -> ExitCode {
    let argv = nftproxy::config::with_default_command(std::env::args_os().collect());
    let matches = Cli::command().get_matches_from(argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Render(args) => {
            let objs = match read_objects(&args.file) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("nftproxy render: {e}");
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
        Command::Run(mut args) => {
            let mut ignored = Vec::new();
            if let Some(path) = args.config.clone() {
                let path = path.display().to_string();
                let sub = matches.subcommand_matches("run");
                let from_cli = |id: &str| {
                    sub.and_then(|m| m.value_source(id)).is_some_and(|s| {
                        matches!(
                            s,
                            clap::parser::ValueSource::CommandLine
                                | clap::parser::ValueSource::EnvVariable
                        )
                    })
                };
                let applied = nftproxy::kpconfig::KubeProxyConfiguration::read(&path)
                    .and_then(|c| c.settings(&path))
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        ignored = f.ignored.clone();
                        args.apply_file(&f, &from_cli).map_err(|e| e.to_string())
                    });
                if let Err(e) = applied {
                    eprintln!("nftproxy: --config {e}");
                    return ExitCode::from(2);
                }
            }
            if args.cleanup {
                return cleanup(false);
            }
            init_tracing(args.log_format, args.verbosity);
            for i in &ignored {
                tracing::info!(field = %i, "configuration file: not used");
            }
            set_oom_score_adj(args.oom_score_adj);
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
        Command::Diff(args) => diff(args),
        Command::Cleanup(args) => cleanup(args.kube_proxy),
    }
}

/// Delete nftproxy's tables (and kube-proxy's with `kube_proxy`).
fn cleanup(kube_proxy: bool) -> ExitCode {
    let mut tables = vec![(Family::Ip, "nftproxy"), (Family::Ip6, "nftproxy")];
    if kube_proxy {
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

/// kube-proxy lowers its OOM score so the kernel kills workloads before the node's proxy
/// (cmd/kube-proxy/app/server_linux.go, `OOMScoreAdj` default -999). Best effort: lowering it
/// needs CAP_SYS_RESOURCE.
fn set_oom_score_adj(v: i32) {
    match std::fs::write("/proc/self/oom_score_adj", v.to_string()) {
        Ok(()) => tracing::debug!(oom_score_adj = v, "set the OOM score adjustment"),
        Err(e) => {
            tracing::info!(oom_score_adj = v, error = %e, "cannot set the OOM score adjustment (needs CAP_SYS_RESOURCE to lower it)")
        }
    }
}

/// Read objects from a file or standard input (`-`).
fn read_objects(file: &str) -> Result<Objects, String> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("reading stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?
    };
    Objects::parse(&text).map_err(|e| format!("{file}: {e}"))
}

/// `nftproxy diff`: exit 0 when the kernel holds what `run` would program, 1 when not, 2 when
/// the comparison could not be made.
fn diff(args: nftproxy::config::DiffArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("nftproxy diff: {e}");
        ExitCode::from(2)
    };
    let mut cfg = match ProxyConfig::from_args(&args.proxy) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let objs = match &args.file {
        Some(f) => match read_objects(f) {
            Ok(o) => o,
            Err(e) => return fail(e),
        },
        None => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            let listed = rt.block_on(async {
                let (client, _) =
                    nftproxy::agent::client(args.kubeconfig.as_deref(), args.master.as_deref())
                        .await
                        .map_err(|e| e.to_string())?;
                nftproxy::diff_cmd::list_objects(client, &cfg.node_name)
                    .await
                    .map_err(|e| format!("listing from the API: {e}"))
            });
            match listed {
                Ok(o) => o,
                Err(e) => return fail(e),
            }
        }
    };
    // From a file, like `render`: the named node, else the file's only Node.
    let node = match &args.file {
        Some(_) => render_cmd::pick_node(&objs, args.proxy.hostname_override.as_deref()),
        None => render_cmd::pick_node(&objs, Some(&cfg.node_name)),
    };
    cfg.node_name = node.name.clone();
    let (desired, state, problems) = match render_cmd::desired_of(&objs, &cfg, &node) {
        Ok(x) => x,
        Err(e) => return fail(e.to_string()),
    };
    for p in problems {
        eprintln!("skipped: {}: {}", p.object, p.reason);
    }
    let mut applier = match nftproxy::apply::netlink::NetlinkApplier::new() {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let (kernel, extra) = match nftproxy::diff_cmd::read_kernel(&mut applier, &desired) {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    let report = nftproxy::diff_cmd::compare(&desired, &kernel, &extra, &state);
    if report.is_empty() {
        println!("no differences: the kernel holds what nftproxy would program");
        ExitCode::SUCCESS
    } else {
        print!("{}", report.text());
        ExitCode::from(1)
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
    // Colours only for a person at a terminal: `kubectl logs` shows escape codes verbatim.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
