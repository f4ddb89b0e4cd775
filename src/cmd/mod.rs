//! The commands: wiring only. Each reads its inputs, calls the pipeline and the edges, and prints.

use std::io::Read;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::k8s::objects::Objects;
use args::{Cli, Command, RunArgs};

pub mod args;
pub mod cleanup;
pub mod diff;
pub mod explain;
pub mod kpconfig;
pub mod logs;
pub mod render;
pub mod run;

/// The program: parse the command line (kube-proxy's, with no subcommand, means `run`) and
/// dispatch.
pub fn main(argv: Vec<std::ffi::OsString>) -> ExitCode {
    let argv = args::with_default_command(argv);
    let matches = Cli::command().get_matches_from(argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Render(a) => render::render(a),
        Command::Run(a) => start(a, &matches),
        Command::Diff(a) => diff::diff(a),
        Command::Cleanup(a) => cleanup::cleanup(a.kube_proxy),
        Command::Explain(a) => explain::explain(a),
        Command::Services(a) => explain::services(a),
        Command::Report(a) => explain::report(a),
    }
}

/// `nftproxy run` (also kube-proxy's command line, with no subcommand): apply the configuration
/// file under the flags, set up logging and the OOM score, then run the agent until SIGTERM.
fn start(mut args: RunArgs, matches: &clap::ArgMatches) -> ExitCode {
    let mut ignored = Vec::new();
    if let Some(path) = args.config.clone() {
        let path = path.display().to_string();
        let sub = matches.subcommand_matches("run");
        let from_cli = |id: &str| {
            sub.and_then(|m| m.value_source(id)).is_some_and(|s| {
                matches!(
                    s,
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            })
        };
        let applied = kpconfig::KubeProxyConfiguration::read(&path)
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
        return cleanup::cleanup(false);
    }
    logs::init(args.log_format, args.verbosity);
    for i in &ignored {
        tracing::info!(field = %i, "configuration file: not used");
    }
    for f in args.unused_flags() {
        tracing::info!(flag = %f, "accepted for kube-proxy compatibility, not used");
    }
    if let Some(path) = args.write_config_to.clone() {
        return write_config(&args, &path);
    }
    if args.init_only {
        // kube-proxy's --init-only: the privileged part of the start, then exit.
        if let Err(e) = run::preflight() {
            eprintln!("nftproxy: {e}");
            return ExitCode::FAILURE;
        }
        return match run::conntrack_sysctls(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nftproxy: {e}");
                ExitCode::FAILURE
            }
        };
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
    match rt.block_on(run::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("nftproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// kube-proxy's `--write-config-to`: the effective configuration as a KubeProxyConfiguration.
fn write_config(args: &RunArgs, path: &std::path::Path) -> ExitCode {
    let cfg = match args.proxy.proxy_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nftproxy: {e}");
            return ExitCode::from(2);
        }
    };
    let conf = args.configz(&cfg)["kubeproxy.config.k8s.io"].clone();
    let written = serde_yaml::to_string(&conf)
        .map_err(|e| e.to_string())
        .and_then(|text| std::fs::write(path, text).map_err(|e| e.to_string()));
    match written {
        Ok(()) => {
            tracing::info!(file = %path.display(), "wrote the configuration");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nftproxy: --write-config-to {}: {e}", path.display());
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

/// The objects this node's agent would see, listed once from the API (`diff`, and `explain`,
/// `services`, `report` without an agent socket).
pub(crate) fn list_from_api(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
    node: &str,
) -> Result<Objects, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let (client, _) = crate::k8s::client::client(kubeconfig, master, None, None)
            .await
            .map_err(|e| e.to_string())?;
        diff::list_objects(client, node)
            .await
            .map_err(|e| format!("listing from the API: {e}"))
    })
}

/// Read objects from a file or standard input (`-`).
pub(crate) fn read_objects(file: &str) -> Result<Objects, String> {
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
