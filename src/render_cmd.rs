//! `nftproxy render`: objects file -> the ruleset `run` would program.

use crate::config::ProxyConfig;
use crate::model::Problem;
use crate::nft::compile::{self, CompileError};
use crate::nft::ir::Ruleset;
use crate::objects::Objects;
use crate::proxy::ProxyState;
use crate::snapshot::{self, NodeInfo};

/// The node `render` works for: the named one, else the only Node in the file.
pub fn pick_node(objs: &Objects, name: Option<&str>) -> NodeInfo {
    let found = match name {
        Some(n) => objs
            .nodes
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some(n)),
        None if objs.nodes.len() == 1 => objs.nodes.first(),
        None => None,
    };
    match found {
        Some(n) => NodeInfo::from_node(n),
        None => NodeInfo {
            name: name.unwrap_or_default().to_string(),
            ..Default::default()
        },
    }
}

/// Compile a set of objects as `run` would.
pub fn compile_objects(
    objs: &Objects,
    cfg: &ProxyConfig,
    node: &NodeInfo,
) -> Result<(Ruleset, Vec<Problem>), CompileError> {
    desired_of(objs, cfg, node).map(|(rs, _, problems)| (rs, problems))
}

/// The ruleset and the proxy state it was compiled from.
pub fn desired_of(
    objs: &Objects,
    cfg: &ProxyConfig,
    node: &NodeInfo,
) -> Result<(Ruleset, ProxyState, Vec<Problem>), CompileError> {
    let mut problems = Vec::new();
    let cidrs = snapshot::service_cidrs(&objs.service_cidrs, &mut problems);
    let state = snapshot::proxy_state(&objs.services, &objs.slices, &cidrs, node, &mut problems);
    let (rs, mut conflicts) = compile::compile_checked(&state, &cfg.compile_config(node))?;
    problems.append(&mut conflicts);
    Ok((rs, state, problems))
}
