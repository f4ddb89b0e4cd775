//! `nftproxy cleanup`: remove what nftproxy (and, with `--kube-proxy`, kube-proxy) left in the
//! kernel.

use std::process::ExitCode;

use crate::net::Family;

/// Delete nftproxy's tables (and kube-proxy's with `kube_proxy`).
pub fn cleanup(kube_proxy: bool) -> ExitCode {
    let mut tables = vec![(Family::Ip, "nftproxy"), (Family::Ip6, "nftproxy")];
    if kube_proxy {
        tables.extend([(Family::Ip, "kube-proxy"), (Family::Ip6, "kube-proxy")]);
    }
    match crate::apply::netlink::delete_tables(&tables) {
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
