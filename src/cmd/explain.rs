//! `nftproxy explain`, `services` and `report`: ask the running agent (its debug socket), or
//! compute offline from a file (`-f`, like `render`), or, with neither, from the API's objects
//! and the tables this node's kernel holds. All three go through `crate::explain`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use http_body_util::BodyExt;

use super::args::{ExplainArgs, OutputFormat, ReportArgs, ServicesArgs, SourceArgs};
use crate::explain::{self, Explanation, Flow, ReportRow, ServiceLine, ServicesQuery, View};
use crate::k8s::objects::Objects;
use crate::model::{NodeInfo, ServiceName};
use crate::net::Family;
use crate::nft::ir::Ruleset;
use crate::pipeline::config::ProxyConfig;
use crate::proxy::ProxyState;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// GET over the agent's unix socket: (status, body).
async fn get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    let where_ = || format!("agent socket {}", socket.display());
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{}: {e}", where_()))?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{}: {e}", where_()))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("{}: {e}", where_()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{}: {e}", where_()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn live<T: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> Result<T, String> {
    let (status, body) = runtime()?.block_on(get(socket, path))?;
    if status != 200 {
        return Err(format!("agent answered {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("agent's answer: {e}"))
}

/// Everything offline and fallback answers need, owned.
struct Owned {
    objs: Objects,
    node: NodeInfo,
    cfg: ProxyConfig,
    ruleset: Ruleset,
    state: ProxyState,
    /// Where the answer comes from, said once on stderr.
    source: String,
}

impl Owned {
    fn view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        let slices = explain::SlicesByService::new(&self.objs.slices);
        let endpoints =
            |svc: &ServiceName, fam: Family| slices.endpoints(&self.node.name, svc, fam);
        let primary = |ep: std::net::IpAddr| {
            self.node.primary(if ep.is_ipv4() {
                Family::Ip
            } else {
                Family::Ip6
            })
        };
        f(&View {
            ruleset: &self.ruleset,
            state: &self.state,
            node: &self.node,
            cfg: &self.cfg,
            local_addrs: &self.node.internal_ips,
            endpoints: &endpoints,
            masquerade_source: &primary,
            counters: None,
        })
    }
}

/// Offline (`-f`) or from the API and this node's kernel.
fn compute(src: &SourceArgs) -> Result<Owned, String> {
    let mut cfg = src.proxy.proxy_config().map_err(|e| e.to_string())?;
    let (objs, from_file) = match &src.file {
        Some(f) => (super::read_objects(f)?, true),
        None => (
            super::list_from_api(
                src.kubeconfig.as_deref(),
                src.master.as_deref(),
                &cfg.node_name,
            )?,
            false,
        ),
    };
    let node = if from_file {
        objs.node_info(src.proxy.hostname_override.as_deref())
    } else {
        objs.node_info(Some(&cfg.node_name))
    };
    cfg.node_name = node.name.clone();
    let fs = crate::pipeline::from_objects(&objs, &cfg, &node).map_err(|e| e.to_string())?;
    let (ruleset, source) = if from_file {
        (
            fs.ruleset,
            format!(
                "offline: what `run` would program on node {} for {}",
                node.name,
                src.file.as_deref().unwrap_or("-")
            ),
        )
    } else {
        (
            kernel_ruleset(&fs.ruleset)?,
            format!(
                "no agent socket at {}: the API's objects and the sets in this node's kernel",
                src.socket.display()
            ),
        )
    };
    Ok(Owned {
        objs,
        node,
        cfg,
        ruleset,
        state: fs.state,
        source,
    })
}

/// The desired skeleton with the elements this node's kernel holds in its sets.
fn kernel_ruleset(desired: &Ruleset) -> Result<Ruleset, String> {
    let mut a = crate::apply::netlink::NetlinkApplier::new().map_err(|e| e.to_string())?;
    let (kernel, _) = super::diff::read_kernel(&mut a, desired).map_err(|e| e.to_string())?;
    let mut out = desired.clone();
    for (f, t) in out.tables.iter_mut() {
        match kernel.get(f) {
            Some(Some(k)) => {
                for (set, els) in &k.elements {
                    t.elements
                        .insert(set.clone(), els.iter().cloned().collect());
                }
            }
            _ => return Err(format!("this node has no {} nftproxy table", f.keyword())),
        }
    }
    Ok(out)
}

/// The answer from the agent when its socket is there (and no file was given), else computed.
fn answer<T: serde::de::DeserializeOwned>(
    src: &SourceArgs,
    path: &str,
    compute_it: impl FnOnce(&View<'_>) -> T,
) -> Result<T, String> {
    if src.file.is_none() && src.socket.exists() {
        return live(&src.socket, path);
    }
    let o = compute(src)?;
    eprintln!("({})", o.source);
    Ok(o.view(compute_it))
}

fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let set: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        .collect();
    serde_urlencoded::to_string(set).unwrap_or_default()
}

fn print_structured<T: serde::Serialize>(v: &T, yaml: bool) -> Result<(), String> {
    let text = if yaml {
        serde_yaml::to_string(v).map_err(|e| e.to_string())?
    } else {
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())? + "\n"
    };
    print!("{text}");
    Ok(())
}

fn done(cmd: &str, r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nftproxy {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}

/// The explanation as an operator reads it.
pub fn explanation_text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} on node {}", e.flow, e.node);
    let verdict = match e.verdict {
        explain::Verdict::Forward => format!("forwarded to {}", e.endpoints.join(", ")),
        explain::Verdict::Drop => "dropped".into(),
        explain::Verdict::Reject => "rejected".into(),
        explain::Verdict::NotAService => "not a Service: left alone".into(),
    };
    let _ = writeln!(
        out,
        "verdict:   {verdict}{}",
        e.service
            .as_ref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default()
    );
    if e.verdict == explain::Verdict::Forward {
        let seen = match &e.source_seen_by_endpoint {
            Some(s) => s.clone(),
            None => e
                .sources_by_endpoint
                .iter()
                .map(|(ep, s)| format!("{s} at {ep}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = writeln!(
            out,
            "client IP: the endpoint sees {seen}{}",
            if e.masquerade { " (masqueraded)" } else { "" }
        );
    }
    let _ = writeln!(out, "why:");
    for (i, s) in e.steps.iter().enumerate() {
        let _ = writeln!(out, "  {:>2}. {}", i + 1, s.text.trim_start());
        if let Some(n) = &s.nft {
            let _ = writeln!(out, "      nft:   {n}");
        }
        if let Some(f) = &s.field {
            let _ = writeln!(out, "      field: {f}");
        }
    }
    if let Some(a) = &e.advice {
        let _ = writeln!(out, "advice: {a}");
    }
    out
}

pub fn explain(args: ExplainArgs) -> ExitCode {
    let flow = match Flow::parse(&args.from, &args.to, args.via.as_deref()) {
        Ok(f) => f,
        Err(e) => return done("explain", Err(e.to_string())),
    };
    let path = format!(
        "/debug/explain?{}",
        query(&[
            ("from", Some(&args.from)),
            ("to", Some(&args.to)),
            ("via", args.via.as_deref())
        ])
    );
    let r = answer(&args.src, &path, |v| explain::explain(v, &flow)).and_then(|e| {
        if args.json {
            print_structured(&e, false)
        } else {
            print!("{}", explanation_text(&e));
            Ok(())
        }
    });
    done("explain", r)
}

fn services_text(lines: &[ServiceLine], wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = vec![];
    let mut head = vec![
        "NAMESPACE",
        "NAME",
        "PORT",
        "ENTRY POINTS",
        "POLICY",
        "ENDPOINTS",
        "CLIENT IP FROM OUTSIDE",
    ];
    if wide {
        head.extend([
            "AFFINITY",
            "SOURCE RANGES",
            "HEALTH CHECK",
            "DROPPED/REJECTED",
            "CHOSEN (CLUSTER | LOCAL)",
            "PROBLEMS",
        ]);
    }
    rows.push(head.iter().map(|s| s.to_string()).collect());
    for l in lines {
        let mut entries = vec![format!("ClusterIP {}", l.cluster_ip)];
        if let Some(np) = l.node_port {
            entries.push(format!(
                "NodePort {np} on {}",
                l.node_port_addresses.join(",")
            ));
        }
        if !l.load_balancer_ips.is_empty() {
            entries.push(format!("LB {}", l.load_balancer_ips.join(",")));
        }
        if !l.external_ips.is_empty() {
            entries.push(format!("externalIP {}", l.external_ips.join(",")));
        }
        let e = &l.endpoints;
        let mut row = vec![
            l.namespace.clone(),
            l.name.clone(),
            format!("{} {}", l.port, l.family),
            entries.join("; "),
            format!(
                "ext {} / int {}",
                l.external_traffic_policy, l.internal_traffic_policy
            ),
            format!(
                "{} local, {} remote, {} terminating, {} not ready",
                e.local, e.remote, e.terminating, e.not_ready
            ),
            l.client_ip_from_outside.clone(),
        ];
        if wide {
            row.push(
                l.session_affinity_seconds
                    .map(|s| format!("ClientIP {s}s"))
                    .unwrap_or_else(|| "-".into()),
            );
            row.push(if l.source_ranges.is_empty() {
                "-".into()
            } else {
                l.source_ranges.join(",")
            });
            row.push(match (&l.health_check_node_port, &l.health_check) {
                (Some(p), Some(h)) => format!(":{p} {h}"),
                _ => "-".into(),
            });
            row.push(match (l.dropped, l.rejected) {
                (Some(d), Some(r)) => format!("{d}/{r}"),
                _ => "-".into(),
            });
            row.push(format!(
                "{} | {}",
                l.cluster_endpoints.join(","),
                l.local_endpoints.join(",")
            ));
            row.push(if l.problems.is_empty() {
                "-".into()
            } else {
                l.problems.join("; ")
            });
        }
        rows.push(row);
    }
    table(&rows)
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

pub fn services(args: ServicesArgs) -> ExitCode {
    let q = ServicesQuery {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
        problems: args.problems,
    };
    let problems = args.problems.then_some("true");
    let path = format!(
        "/debug/services?{}",
        query(&[
            ("namespace", args.namespace.as_deref()),
            ("name", args.name.as_deref()),
            ("problems", problems)
        ])
    );
    let r = answer(&args.src, &path, |v| explain::services(v, &q)).and_then(|lines| {
        match args.output {
            Some(OutputFormat::Json) => print_structured(&lines, false),
            Some(OutputFormat::Yaml) => print_structured(&lines, true),
            Some(OutputFormat::Wide) => {
                print!("{}", services_text(&lines, true));
                Ok(())
            }
            None => {
                print!("{}", services_text(&lines, false));
                Ok(())
            }
        }
    });
    done("services", r)
}

fn report_text(rows: &[ReportRow]) -> String {
    let mut out = String::new();
    let mut last = "";
    let mut flags = Vec::new();
    for r in rows {
        if r.service != last {
            let _ = writeln!(out, "{}", r.service);
            last = &r.service;
        }
        let _ = writeln!(out, "  {:<44} client IP {}", r.path, r.client_ip);
        if let Some(f) = &r.flag {
            flags.push(format!("{} ({}): {f}", r.service, r.path));
        }
    }
    if !flags.is_empty() {
        let _ = writeln!(out, "\nLook at:");
        for f in flags {
            let _ = writeln!(out, "  - {f}");
        }
    }
    out
}

pub fn report(args: ReportArgs) -> ExitCode {
    let r =
        answer(&args.src, "/debug/report", explain::report).and_then(|rows| match args.output {
            Some(OutputFormat::Json) => print_structured(&rows, false),
            Some(OutputFormat::Yaml) => print_structured(&rows, true),
            _ => {
                print!("{}", report_text(&rows));
                Ok(())
            }
        });
    done("report", r)
}
