//! Errors: kernel errnos classified, and what the lowering reports.

use super::*;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

pub(super) fn io_error(what: &str, e: NlError) -> ApplyError {
    ApplyError::Io {
        what: what.to_string(),
        source: e,
    }
}

/// Why an IR object could not be put into netlink form, or a kernel object read back into IR.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// The wrapper refused a value (a name too long, a message over its bound).
    #[error(transparent)]
    Nl(#[from] NlError),
    /// The IR holds something the lowering cannot express (a value that does not fit its
    /// field, an unsupported construct).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The kernel holds something this version cannot read back into the IR.
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// Wrapper errors of a request: kernel errnos are classified, everything else is socket trouble.
pub(super) fn nl_error(what: &str, e: NlError) -> ApplyError {
    match e {
        NlError::Kernel(k) => errno_error(what.to_string(), &k),
        NlError::BadName(_) | NlError::TooLong { .. } => ApplyError::Invalid {
            what: what.to_string(),
            detail: e.to_string(),
        },
        other => io_error(what, other),
    }
}

pub(super) fn errno_error(what: String, e: &KernelError) -> ApplyError {
    let detail = e.to_string();
    match e.errno {
        libc::ENOENT => ApplyError::NotFound { what },
        libc::EEXIST => ApplyError::Exists { what },
        libc::EBUSY => ApplyError::Busy { what },
        libc::EPERM | libc::EOPNOTSUPP | libc::EAFNOSUPPORT => {
            ApplyError::Unsupported { what, detail }
        }
        libc::ENOBUFS | libc::EINTR | libc::EAGAIN | libc::ENOMEM => ApplyError::Io {
            what,
            source: NlError::Kernel(e.clone()),
        },
        _ => ApplyError::Invalid { what, detail },
    }
}

/// Map the first kernel error of a batch to the op that caused it.
pub(super) fn classify(
    e: &KernelError,
    batch: &Batch,
    tx: &Transaction,
    table: &str,
    elem_origin: &HashMap<u32, Vec<Option<usize>>>,
) -> ApplyError {
    let what = match batch.record(e.seq) {
        Some(rec) => match tx.ops.get(rec.tag) {
            Some(op) => {
                let mut what = describe(op, table);
                if let Some(el) = failed_element(e, batch, rec, op, elem_origin) {
                    what.push_str(&format!(" (element {el})"));
                }
                what
            }
            None => format!("message {} of the batch", e.seq),
        },
        // Errors found at commit time (e.g. table validation) are reported against BEGIN.
        None if e.seq == batch.begin_seq() => "commit of the transaction".to_string(),
        None => format!("message {} of the batch", e.seq),
    };
    errno_error(what, e)
}

/// With extended acks, the kernel points at the element attribute that failed; find which IR
/// element that came from.
pub(super) fn failed_element(
    e: &KernelError,
    batch: &Batch,
    rec: &nl::MsgRecord,
    op: &Op,
    elem_origin: &HashMap<u32, Vec<Option<usize>>>,
) -> Option<String> {
    let elements = match op {
        Op::AddElements { elements, .. } | Op::DeleteElements { elements, .. } => elements,
        _ => return None,
    };
    let off = e.bad_attr_offset? as usize;
    let msg = batch.message_bytes(rec);
    // NFTA_SET_ELEM_LIST_ELEMENTS = 3
    let (_, list_off, _) = nl::message_attrs(msg)
        .into_iter()
        .find(|(ty, _, _)| *ty == 3)?;
    let idx = nl::nested_attrs(msg, list_off)
        .iter()
        .position(|(_, start, payload)| off >= *start && off < start + 4 + payload.len())?;
    let origin = (*elem_origin.get(&e.seq)?.get(idx)?)?;
    elements.iter().nth(origin).map(fmt_element)
}

/// Short description of an op for error messages, e.g. `delete chain ip nftproxy foo`.
pub fn describe(op: &Op, table: &str) -> String {
    let t = |f: &Family| format!("{} {}", f.keyword(), table);
    match op {
        Op::AddTable(f) => format!("add table {}", t(f)),
        Op::DeleteTable(f) => format!("delete table {}", t(f)),
        Op::AddChain { family, name, .. } => format!("add chain {} {name}", t(family)),
        Op::FlushChain { family, name } => format!("flush chain {} {name}", t(family)),
        Op::DeleteChain { family, name } => format!("delete chain {} {name}", t(family)),
        Op::AddRule { family, chain, .. } => format!("add rule to chain {} {chain}", t(family)),
        Op::AddSet { family, name, def } => {
            format!(
                "add {} {} {name}",
                if def.data.is_some() { "map" } else { "set" },
                t(family)
            )
        }
        Op::DeleteSet { family, name } => format!("delete set {} {name}", t(family)),
        Op::FlushSet { family, name } => format!("flush set {} {name}", t(family)),
        Op::AddElements { family, set, .. } => format!("add element to set {} {set}", t(family)),
        Op::DeleteElements { family, set, .. } => {
            format!("delete element from set {} {set}", t(family))
        }
    }
}

pub(super) fn fmt_value(v: &Value) -> String {
    match v {
        Value::Addr(a) => a.to_string(),
        Value::Prefix(p) => p.to_string(),
        Value::Proto(p) => p.keyword().to_string(),
        Value::Port(p) => p.to_string(),
        Value::Slot(s) => s.to_string(),
        Value::Ifname(n) => format!("{n:?}"),
    }
}

pub(super) fn fmt_values(vs: &[Value]) -> String {
    vs.iter().map(fmt_value).collect::<Vec<_>>().join(" . ")
}

pub(super) fn fmt_element(e: &Element) -> String {
    match e.value() {
        Some(v) => format!("{} : {}", fmt_values(e.key()), fmt_values(v)),
        None => fmt_values(e.key()),
    }
}
