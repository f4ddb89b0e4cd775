//! Logging set-up: text for people, or JSON with Kubernetes' structured-logging keys
//! (component-base `logs/json`: `ts` in seconds since the epoch, `caller`, `msg`, `v` on info
//! lines, `err` on error lines, then the line's own keys), so log pipelines built for
//! kube-proxy's `--logging-format=json` read nftproxy's lines too.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::args::LogFormat;

/// Start logging to stderr. `verbosity` applies to nftproxy's own lines only (0 warnings, 1
/// info, 2 debug, 3+ trace): dependencies log warnings and errors whatever it is, so `-v 4`
/// does not bury the agent's lines under HTTP and TLS debug output. RUST_LOG, when set,
/// replaces the filter (e.g. RUST_LOG=nftproxy=debug,kube=debug).
pub fn init(format: LogFormat, verbosity: u8) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,nftproxy={level}")));
    // Colours only for a person at a terminal: `kubectl logs` shows escape codes verbatim.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.event_format(KubeJson).init(),
        LogFormat::Text => builder.init(),
    }
}

/// One JSON object per line, in component-base's key order.
pub struct KubeJson;

#[derive(Default)]
struct Fields {
    msg: String,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.put(f, serde_json::Value::from(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.put(f, serde_json::Value::from(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.put(f, serde_json::Value::from(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.put(f, serde_json::Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.put(f, serde_json::Value::from(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.put(f, serde_json::Value::from(format!("{v:?}")));
    }
}

impl Fields {
    fn put(&mut self, f: &Field, v: serde_json::Value) {
        if f.name() == "message" {
            self.msg = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            let v = match (f.name(), v) {
                (key @ ("object" | "service" | "node"), serde_json::Value::String(s)) => {
                    object_ref(key, &s)
                }
                (_, v) => v,
            };
            self.rest.insert(f.name().to_string(), v);
        }
    }
}

/// An object reference as klog's `KObj` writes it in JSON: `{"name", "namespace"}` (namespace
/// left out when empty; our `object` values also carry the kind: "Service ns/name").
fn object_ref(key: &str, s: &str) -> serde_json::Value {
    let (kind, rest) = match (key, s.split_once(' ')) {
        ("object", Some((k, r))) => (Some(k), r),
        _ => (None, s),
    };
    let mut m = serde_json::Map::new();
    if let Some(k) = kind {
        m.insert("kind".into(), k.into());
    }
    match rest.split_once('/') {
        Some((ns, name)) if key != "node" => {
            m.insert("name".into(), name.into());
            m.insert("namespace".into(), ns.into());
        }
        _ => {
            m.insert("name".into(), rest.into());
        }
    }
    serde_json::Value::Object(m)
}

/// klog verbosity of a level: info 0, debug 4, trace 5 (warnings are info lines in klog).
fn klog_v(l: &Level) -> u8 {
    match *l {
        Level::TRACE => 5,
        Level::DEBUG => 4,
        _ => 0,
    }
}

impl<S, N> FormatEvent<S, N> for KubeJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // Keys in component-base's order (a JSON map would sort them).
        let mut line: Vec<(String, serde_json::Value)> = vec![("ts".into(), ts.into())];
        if let (Some(file), Some(n)) = (meta.file(), meta.line()) {
            let mut parts: Vec<&str> = file.rsplit('/').take(2).collect();
            parts.reverse();
            line.push(("caller".into(), format!("{}:{n}", parts.join("/")).into()));
        }
        line.push(("msg".into(), std::mem::take(&mut fields.msg).into()));
        if *meta.level() == Level::ERROR {
            let err = fields.rest.remove("error").unwrap_or_else(|| "".into());
            line.push(("err".into(), err));
        } else {
            line.push(("v".into(), klog_v(meta.level()).into()));
            if *meta.level() == Level::WARN {
                line.push(("level".into(), "warning".into()));
            }
        }
        line.extend(fields.rest);
        let body: Vec<String> = line
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
            .collect();
        writeln!(w, "{{{}}}", body.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            crate::lock::lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_kubernetes_keys() {
        let buf = Buf::default();
        let b2 = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || b2.clone())
            .with_max_level(Level::DEBUG)
            .event_format(KubeJson)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(kind = "partial", ops = 2, "synced");
            tracing::warn!(
                object = "Service ns/web",
                node = "node-a",
                "skipped bad input"
            );
            tracing::error!(error = "boom", "sync failed");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(crate::lock::lock(&buf.0).clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        let first = lines[0].as_object().unwrap();
        // component-base's key order on the line itself.
        let raw = text.lines().next().unwrap();
        let at = |k: &str| raw.find(&format!("\"{k}\":")).unwrap();
        assert!(raw.starts_with("{\"ts\":"), "{raw}");
        assert!(
            at("caller") < at("msg") && at("msg") < at("v") && at("v") < at("kind"),
            "{raw}"
        );
        assert_eq!(first["msg"], "synced");
        assert_eq!(
            (first["kind"].as_str(), first["ops"].as_i64()),
            (Some("partial"), Some(2))
        );
        assert!(first["ts"].as_f64().unwrap() > 1.7e9);
        assert!(first["caller"].as_str().unwrap().contains("logs.rs:"));
        // Object references as klog writes them.
        assert_eq!(
            lines[1]["object"],
            serde_json::json!({"kind": "Service", "namespace": "ns", "name": "web"})
        );
        assert_eq!(lines[1]["node"], serde_json::json!({"name": "node-a"}));
        assert_eq!(lines[2]["err"], "boom");
        assert!(lines[2].get("v").is_none());
        assert_eq!(lines[3]["v"], 4);
    }
}
