//! Parser for `nft-templates/skeleton.nft`: the static skeleton as readable nft text, turned into
//! IR at start-up. It understands exactly the constructs of [`super::ir`], written for the ip
//! family (the ip6 table is derived from it).

use super::ir::Action;
use super::ir::{BaseChain, ChainType, Decl, Field, FieldType, Hook, Match, Rule, SetDef, Value};
use crate::net::Proto;

/// The skeleton text compiled into the binary.
pub const SKELETON: &str = include_str!("../../nft-templates/skeleton.nft");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("skeleton line {line}: {msg}")]
pub struct TemplateError {
    pub line: usize,
    pub msg: String,
}

/// A condition on a template rule (`# when COND`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub name: String,
    pub negate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRule {
    pub rule: Rule,
    pub when: Vec<Cond>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateChain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<TemplateRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSet {
    pub name: String,
    pub def: SetDef,
    pub elements: Vec<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    pub sets: Vec<TemplateSet>,
    pub chains: Vec<TemplateChain>,
}

/// Parse skeleton text.
pub fn parse(text: &str) -> Result<Template, TemplateError> {
    let mut t = Template::default();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((n, raw)) = lines.next() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |msg: &str| TemplateError {
            line: n,
            msg: msg.to_string(),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [kind @ ("set" | "map"), name, "{"] => {
                let mut def = SetDef::plain(Decl::Type(vec![]));
                let mut elements = Vec::new();
                for (n, raw) in lines.by_ref() {
                    let err = |msg: &str| TemplateError {
                        line: n,
                        msg: msg.to_string(),
                    };
                    let line = raw.trim();
                    if line == "}" {
                        break;
                    }
                    let w: Vec<&str> = line.split_whitespace().collect();
                    match w.as_slice() {
                        ["type", rest @ ..] => {
                            let (k, d) = split_colon(rest);
                            def.key = Decl::Type(parse_types(k).map_err(|m| err(&m))?);
                            if let Some(d) = d {
                                def.data = Some(Decl::Type(parse_types(d).map_err(|m| err(&m))?));
                            }
                        }
                        ["typeof", rest @ ..] => {
                            let (k, d) = split_colon(rest);
                            def.key =
                                Decl::Typeof(parse_key(&mut Tokens::new(k)).map_err(|m| err(&m))?);
                            if let Some(d) = d {
                                def.data = Some(Decl::Typeof(
                                    parse_key(&mut Tokens::new(d)).map_err(|m| err(&m))?,
                                ));
                            }
                        }
                        ["flags", flags] => {
                            for f in flags.split(',') {
                                match f {
                                    "interval" => def.flags.interval = true,
                                    "timeout" => def.flags.timeout = true,
                                    other => return Err(err(&format!("unknown flag {other}"))),
                                }
                            }
                        }
                        ["counter"] => def.flags.counter = true,
                        ["size", sz] => def.size = Some(sz.parse().map_err(|_| err("bad size"))?),
                        ["elements", "=", "{", rest @ ..] => {
                            def.constant = true;
                            let body = rest.join(" ");
                            let body = body.trim_end_matches('}');
                            for e in body.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                                let proto = parse_proto(e).ok_or_else(|| {
                                    err(&format!(
                                        "constant element {e:?}: only protocols are supported"
                                    ))
                                })?;
                                elements.push(vec![Value::Proto(proto)]);
                            }
                        }
                        _ => return Err(err(&format!("unexpected line in {kind} {name}: {line}"))),
                    }
                }
                if (*kind == "map") != def.data.is_some() {
                    return Err(err("a map needs data, a set must not have it"));
                }
                t.sets.push(TemplateSet {
                    name: name.to_string(),
                    def,
                    elements,
                });
            }
            ["chain", name, "{"] => {
                let mut chain = TemplateChain {
                    name: name.to_string(),
                    base: None,
                    rules: Vec::new(),
                };
                for (n, raw) in lines.by_ref() {
                    let err = |msg: String| TemplateError { line: n, msg };
                    let line = raw.trim();
                    if line == "}" {
                        break;
                    }
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    if line.starts_with("type ") {
                        chain.base = Some(parse_base(line).map_err(err)?);
                        continue;
                    }
                    let (rule_text, when) = match line.split_once('#') {
                        Some((r, c)) => (r.trim(), parse_when(c.trim()).map_err(err)?),
                        None => (line, Vec::new()),
                    };
                    let words: Vec<&str> = rule_text.split_whitespace().collect();
                    let rule = parse_rule(&words).map_err(err)?;
                    chain.rules.push(TemplateRule { rule, when });
                }
                t.chains.push(chain);
            }
            _ => return Err(err(&format!("unexpected line: {line}"))),
        }
    }
    Ok(t)
}

fn split_colon<'a>(w: &'a [&'a str]) -> (&'a [&'a str], Option<&'a [&'a str]>) {
    match w.iter().position(|x| *x == ":") {
        Some(i) => (&w[..i], Some(&w[i + 1..])),
        None => (w, None),
    }
}

fn parse_types(w: &[&str]) -> Result<Vec<FieldType>, String> {
    w.iter()
        .filter(|x| **x != ".")
        .map(|x| match *x {
            "ipv4_addr" => Ok(FieldType::Ipv4Addr),
            "ipv6_addr" => Ok(FieldType::Ipv6Addr),
            "inet_proto" => Ok(FieldType::InetProto),
            "inet_service" => Ok(FieldType::InetService),
            "ifname" => Ok(FieldType::Ifname),
            other => Err(format!("unknown type {other}")),
        })
        .collect()
}

pub fn parse_proto(s: &str) -> Option<Proto> {
    Proto::ALL.into_iter().find(|p| p.keyword() == s)
}

fn parse_when(c: &str) -> Result<Vec<Cond>, String> {
    let Some(rest) = c.strip_prefix("when ") else {
        return Ok(Vec::new()); // an ordinary comment
    };
    rest.split(',')
        .map(str::trim)
        .map(|c| {
            let (negate, name) = match c.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, c),
            };
            match name {
                "masquerade-all" | "cluster-cidr" | "local-iface" => Ok(Cond {
                    name: name.to_string(),
                    negate,
                }),
                other => Err(format!("unknown condition {other}")),
            }
        })
        .collect()
}

fn parse_base(line: &str) -> Result<BaseChain, String> {
    // type nat hook prerouting priority -100; policy accept;
    let w: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|s| !s.is_empty())
        .collect();
    match w.as_slice() {
        ["type", kind, "hook", hook, "priority", prio, "policy", "accept"] => Ok(BaseChain {
            kind: match *kind {
                "filter" => ChainType::Filter,
                "nat" => ChainType::Nat,
                other => return Err(format!("unknown chain type {other}")),
            },
            hook: match *hook {
                "prerouting" => Hook::Prerouting,
                "input" => Hook::Input,
                "forward" => Hook::Forward,
                "output" => Hook::Output,
                "postrouting" => Hook::Postrouting,
                other => return Err(format!("unknown hook {other}")),
            },
            priority: prio
                .parse()
                .map_err(|_| format!("priority must be numeric: {prio}"))?,
        }),
        _ => Err(format!("bad base chain line: {line}")),
    }
}

/// A cursor over the words of one rule.
pub struct Tokens<'a> {
    w: &'a [&'a str],
    i: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(w: &'a [&'a str]) -> Self {
        Tokens { w, i: 0 }
    }
    fn peek(&self, k: usize) -> Option<&'a str> {
        self.w.get(self.i + k).copied()
    }
    fn next(&mut self) -> Option<&'a str> {
        let t = self.peek(0);
        self.i += 1;
        t
    }
    fn expect(&mut self, want: &str) -> Result<(), String> {
        match self.next() {
            Some(t) if t == want => Ok(()),
            other => Err(format!("expected {want:?}, found {other:?}")),
        }
    }
    fn done(&self) -> bool {
        self.i >= self.w.len()
    }
}

fn parse_field(t: &mut Tokens<'_>) -> Result<Field, String> {
    let first = t.next();
    if first == Some("iifname") {
        return Ok(Field::Iifname);
    }
    let f = match (first, t.next()) {
        (Some("ip" | "ip6"), Some("saddr")) => Field::Saddr,
        (Some("ip" | "ip6"), Some("daddr")) => Field::Daddr,
        (Some("meta"), Some("l4proto")) => Field::L4proto,
        (Some("th"), Some("dport")) => Field::ThDport,
        (Some("ct"), Some("original")) => match t.next() {
            Some("proto-dst") => Field::CtOrigProtoDst,
            Some("ip" | "ip6") => match t.next() {
                Some("saddr") => Field::CtOrigSaddr,
                Some("daddr") => Field::CtOrigDaddr,
                other => return Err(format!("unknown ct original field {other:?}")),
            },
            other => return Err(format!("unknown ct original field {other:?}")),
        },
        (Some("numgen"), Some("random")) => {
            t.expect("mod")?;
            let n = t.next().ok_or("numgen without modulus")?;
            Field::Numgen(n.parse().map_err(|_| format!("bad modulus {n}"))?)
        }
        (a, b) => return Err(format!("unknown field {a:?} {b:?}")),
    };
    Ok(f)
}

/// `field ( . field )*`
pub fn parse_key(t: &mut Tokens<'_>) -> Result<Vec<Field>, String> {
    let mut key = vec![parse_field(t)?];
    while t.peek(0) == Some(".") {
        t.next();
        key.push(parse_field(t)?);
    }
    Ok(key)
}

fn parse_hex(s: Option<&str>) -> Result<u32, String> {
    let s = s.ok_or("missing number")?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| format!("bad hex {s}"))
}

fn parse_duration(s: &str) -> Result<u32, String> {
    let mut total = 0u32;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u32 = num.parse().map_err(|_| format!("bad duration {s}"))?;
        num.clear();
        total += n * match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(format!("bad duration {s}")),
        };
    }
    if !num.is_empty() {
        return Err(format!("bad duration {s}"));
    }
    Ok(total)
}

/// Parse one rule in canonical text.
pub fn parse_rule(words: &[&str]) -> Result<Rule, String> {
    let mut t = Tokens::new(words);
    let mut matches = Vec::new();
    loop {
        let action = match (t.peek(0), t.peek(1)) {
            (None, _) => return Err("rule without action".into()),
            (Some("ct"), Some("state")) => {
                t.next();
                t.next();
                t.expect("new")?;
                matches.push(Match::CtStateNew);
                continue;
            }
            (Some("ct"), Some("status")) => {
                t.next();
                t.next();
                t.expect("dnat")?;
                matches.push(Match::CtStatusDnat);
                continue;
            }
            (Some("fib"), Some(dir)) => {
                t.next();
                t.next();
                t.expect("type")?;
                t.expect("local")?;
                matches.push(match dir {
                    "daddr" => Match::FibDaddrLocal,
                    "saddr" => Match::FibSaddrLocal,
                    other => return Err(format!("unknown fib {other}")),
                });
                continue;
            }
            (Some("meta"), Some("l4proto")) if t.peek(2).and_then(parse_proto).is_some() => {
                t.next();
                t.next();
                let p = t.next().and_then(parse_proto).ok_or("protocol expected")?;
                matches.push(Match::L4protoIs(p));
                continue;
            }
            (Some("meta"), Some("mark")) => {
                t.next();
                t.next();
                match t.next() {
                    Some("&") => {
                        let bits = parse_hex(t.next())?;
                        t.expect("==")?;
                        if parse_hex(t.next())? != 0 {
                            return Err("only `== 0` mark tests are supported".into());
                        }
                        matches.push(Match::MarkUnset(bits));
                        continue;
                    }
                    Some("set") => {
                        t.expect("meta")?;
                        t.expect("mark")?;
                        match t.next() {
                            Some("|") => Action::MarkOr(parse_hex(t.next())?),
                            Some("^") => Action::MarkXor(parse_hex(t.next())?),
                            other => return Err(format!("unsupported mark operation {other:?}")),
                        }
                    }
                    other => return Err(format!("unsupported meta mark use {other:?}")),
                }
            }
            (Some(verb @ ("jump" | "goto")), Some(target)) => {
                t.next();
                t.next();
                if verb == "jump" {
                    Action::Jump(target.to_string())
                } else {
                    Action::Goto(target.to_string())
                }
            }
            (Some("return"), _) => {
                t.next();
                Action::Return
            }
            (Some("drop"), _) => {
                t.next();
                Action::Drop
            }
            (Some("reject"), _) => {
                t.next();
                Action::Reject
            }
            (Some("masquerade"), _) => {
                t.next();
                t.expect("fully-random")?;
                Action::Masquerade
            }
            (Some("dnat"), _) => {
                t.next();
                match t.next() {
                    Some("ip" | "ip6") => {}
                    other => return Err(format!("dnat needs a family, found {other:?}")),
                }
                t.expect("to")?;
                let key = parse_key(&mut t)?;
                t.expect("map")?;
                let map = t
                    .next()
                    .and_then(|m| m.strip_prefix('@'))
                    .ok_or("dnat map needs @name")?;
                Action::DnatMap {
                    key,
                    map: map.to_string(),
                }
            }
            (Some("update"), Some(set)) => {
                t.next();
                t.next();
                let set = set
                    .strip_prefix('@')
                    .ok_or("update needs @set")?
                    .to_string();
                t.expect("{")?;
                let key = parse_key(&mut t)?;
                t.expect("timeout")?;
                let timeout_secs = parse_duration(t.next().ok_or("missing timeout")?)?;
                t.expect(":")?;
                let value = parse_key(&mut t)?;
                t.expect("}")?;
                Action::UpdateTimeout {
                    set,
                    key,
                    timeout_secs,
                    value,
                }
            }
            _ => {
                let key = parse_key(&mut t)?;
                let negate = t.peek(0) == Some("!=");
                if negate {
                    t.next();
                }
                let set = t
                    .next()
                    .and_then(|s| s.strip_prefix('@'))
                    .ok_or("expected @set after a key")?;
                matches.push(Match::Lookup {
                    key,
                    set: set.to_string(),
                    negate,
                });
                continue;
            }
        };
        if !t.done() {
            return Err(format!("words after the action: {:?}", &words[t.i..]));
        }
        return Ok(Rule { matches, action });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_parses() {
        let t = parse(SKELETON).expect("skeleton");
        assert!(t
            .sets
            .iter()
            .any(|s| s.name == "l4protos" && s.elements.len() == 3));
        let cl = t.chains.iter().find(|c| c.name == "clusterip").unwrap();
        assert_eq!(cl.rules.len(), 4);
        assert_eq!(
            cl.rules[1].when,
            vec![
                Cond {
                    name: "cluster-cidr".into(),
                    negate: false
                },
                Cond {
                    name: "masquerade-all".into(),
                    negate: true
                }
            ]
        );
        let nat = t.chains.iter().find(|c| c.name == "nat-output").unwrap();
        assert_eq!(
            nat.base,
            Some(BaseChain {
                kind: ChainType::Nat,
                hook: Hook::Output,
                priority: -100
            })
        );
    }

    #[test]
    fn rules_parse() {
        let r = parse_rule(&"ct original ip daddr . meta l4proto . ct original proto-dst @a-t3 meta l4proto @l4protos update @ip-affinity { ct original ip saddr . ct original ip daddr timeout 3h20s : ip daddr . th dport }".split_whitespace().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.matches.len(), 2);
        assert!(matches!(
            r.action,
            Action::UpdateTimeout {
                timeout_secs: 10820,
                ..
            }
        ));
        let r = parse_rule(&"ip daddr . meta l4proto . th dport @n3 meta l4proto @l4protos dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @b".split_whitespace().collect::<Vec<_>>()).unwrap();
        assert_eq!(
            r.action,
            Action::DnatMap {
                key: vec![
                    Field::Daddr,
                    Field::L4proto,
                    Field::ThDport,
                    Field::Numgen(3)
                ],
                map: "b".into()
            }
        );
        for bad in [
            "ip daddr @x",
            "jump a b",
            "meta mark & 0x1 == 0x1 drop",
            "dnat to ip daddr map @m",
            "foo bar",
        ] {
            assert!(
                parse_rule(&bad.split_whitespace().collect::<Vec<_>>()).is_err(),
                "{bad}"
            );
        }
    }
}
