//! Every set, map and chain name the code refers to, defined once. The skeleton template
//! (`nft-templates/skeleton.nft`) declares them; a test checks that each name here is declared
//! there with the kind its constant says, so a renamed set cannot leave code pointing at nothing.

/// The chain `affinity-update`.
pub const AFFINITY_UPDATE: &str = "affinity-update";
/// The set `cluster-cidrs`.
pub const CLUSTER_CIDRS: &str = "cluster-cidrs";
/// The set `cluster-ips`.
pub const CLUSTER_IPS: &str = "cluster-ips";
/// The chain `cluster-ips-check`.
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
/// The chain and set `clusterip`.
pub const CLUSTERIP: &str = "clusterip";
/// The chain and set `clusterip-local`.
pub const CLUSTERIP_LOCAL: &str = "clusterip-local";
/// The chain `endpoints-check`.
pub const ENDPOINTS_CHECK: &str = "endpoints-check";
/// The chain and set `external`.
pub const EXTERNAL: &str = "external";
/// The chain and set `external-local`.
pub const EXTERNAL_LOCAL: &str = "external-local";
/// The chain `filter-forward`.
pub const FILTER_FORWARD: &str = "filter-forward";
/// The chain `filter-input`.
pub const FILTER_INPUT: &str = "filter-input";
/// The chain `filter-output`.
pub const FILTER_OUTPUT: &str = "filter-output";
/// The chain `filter-output-pre-dnat`.
pub const FILTER_OUTPUT_PRE_DNAT: &str = "filter-output-pre-dnat";
/// The chain `filter-prerouting`.
pub const FILTER_PREROUTING: &str = "filter-prerouting";
/// The set `firewall`.
pub const FIREWALL: &str = "firewall";
/// The set `firewall-allow`.
pub const FIREWALL_ALLOW: &str = "firewall-allow";
/// The chain `firewall-check`.
pub const FIREWALL_CHECK: &str = "firewall-check";
/// The set `hairpin`.
pub const HAIRPIN: &str = "hairpin";
/// The map `ip-affinity`.
pub const IP_AFFINITY: &str = "ip-affinity";
/// The map `ip-cluster-backends`.
pub const IP_CLUSTER_BACKENDS: &str = "ip-cluster-backends";
/// The map `ip-local-backends`.
pub const IP_LOCAL_BACKENDS: &str = "ip-local-backends";
/// The set `l4protos`.
pub const L4PROTOS: &str = "l4protos";
/// The chain `mark-for-masquerade`.
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// The chain `masquerading`.
pub const MASQUERADING: &str = "masquerading";
/// The chain `nat-output`.
pub const NAT_OUTPUT: &str = "nat-output";
/// The chain `nat-postrouting`.
pub const NAT_POSTROUTING: &str = "nat-postrouting";
/// The chain `nat-prerouting`.
pub const NAT_PREROUTING: &str = "nat-prerouting";
/// The set `no-endpoint-drop`.
pub const NO_ENDPOINT_DROP: &str = "no-endpoint-drop";
/// The set `no-endpoint-reject`.
pub const NO_ENDPOINT_REJECT: &str = "no-endpoint-reject";
/// The set `nodeport`.
pub const NODEPORT: &str = "nodeport";
/// The set `nodeport-addrs`.
pub const NODEPORT_ADDRS: &str = "nodeport-addrs";
/// The chain `nodeport-cluster`.
pub const NODEPORT_CLUSTER: &str = "nodeport-cluster";
/// The chain `nodeport-endpoints-check`.
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
/// The chain and set `nodeport-local`.
pub const NODEPORT_LOCAL: &str = "nodeport-local";
/// The set `nodeport-no-endpoint-drop`.
pub const NODEPORT_NO_ENDPOINT_DROP: &str = "nodeport-no-endpoint-drop";
/// The set `nodeport-no-endpoint-reject`.
pub const NODEPORT_NO_ENDPOINT_REJECT: &str = "nodeport-no-endpoint-reject";
/// The chain `nodeports`.
pub const NODEPORTS: &str = "nodeports";
/// The map `np-affinity`.
pub const NP_AFFINITY: &str = "np-affinity";
/// The map `np-cluster-backends`.
pub const NP_CLUSTER_BACKENDS: &str = "np-cluster-backends";
/// The map `np-local-backends`.
pub const NP_LOCAL_BACKENDS: &str = "np-local-backends";
/// The chain `pick-ip-cluster`.
pub const PICK_IP_CLUSTER: &str = "pick-ip-cluster";
/// The chain `pick-ip-local`.
pub const PICK_IP_LOCAL: &str = "pick-ip-local";
/// The chain `pick-np-cluster`.
pub const PICK_NP_CLUSTER: &str = "pick-np-cluster";
/// The chain `pick-np-local`.
pub const PICK_NP_LOCAL: &str = "pick-np-local";
/// The set `service-cidrs`.
pub const SERVICE_CIDRS: &str = "service-cidrs";
/// The chain `services`.
pub const SERVICES: &str = "services";

/// The set `local-ifaces`.
pub const LOCAL_IFACES: &str = "local-ifaces";

/// Every name with the kinds it is declared as in the skeleton.
pub const ALL: &[(&str, &[&str])] = &[
    (LOCAL_IFACES, &["set"]),
    (AFFINITY_UPDATE, &["chain"]),
    (CLUSTER_CIDRS, &["set"]),
    (CLUSTER_IPS, &["set"]),
    (CLUSTER_IPS_CHECK, &["chain"]),
    (CLUSTERIP, &["chain", "set"]),
    (CLUSTERIP_LOCAL, &["chain", "set"]),
    (ENDPOINTS_CHECK, &["chain"]),
    (EXTERNAL, &["chain", "set"]),
    (EXTERNAL_LOCAL, &["chain", "set"]),
    (FILTER_FORWARD, &["chain"]),
    (FILTER_INPUT, &["chain"]),
    (FILTER_OUTPUT, &["chain"]),
    (FILTER_OUTPUT_PRE_DNAT, &["chain"]),
    (FILTER_PREROUTING, &["chain"]),
    (FIREWALL, &["set"]),
    (FIREWALL_ALLOW, &["set"]),
    (FIREWALL_CHECK, &["chain"]),
    (HAIRPIN, &["set"]),
    (IP_AFFINITY, &["map"]),
    (IP_CLUSTER_BACKENDS, &["map"]),
    (IP_LOCAL_BACKENDS, &["map"]),
    (L4PROTOS, &["set"]),
    (MARK_FOR_MASQUERADE, &["chain"]),
    (MASQUERADING, &["chain"]),
    (NAT_OUTPUT, &["chain"]),
    (NAT_POSTROUTING, &["chain"]),
    (NAT_PREROUTING, &["chain"]),
    (NO_ENDPOINT_DROP, &["set"]),
    (NO_ENDPOINT_REJECT, &["set"]),
    (NODEPORT, &["set"]),
    (NODEPORT_ADDRS, &["set"]),
    (NODEPORT_CLUSTER, &["chain"]),
    (NODEPORT_ENDPOINTS_CHECK, &["chain"]),
    (NODEPORT_LOCAL, &["chain", "set"]),
    (NODEPORT_NO_ENDPOINT_DROP, &["set"]),
    (NODEPORT_NO_ENDPOINT_REJECT, &["set"]),
    (NODEPORTS, &["chain"]),
    (NP_AFFINITY, &["map"]),
    (NP_CLUSTER_BACKENDS, &["map"]),
    (NP_LOCAL_BACKENDS, &["map"]),
    (PICK_IP_CLUSTER, &["chain"]),
    (PICK_IP_LOCAL, &["chain"]),
    (PICK_NP_CLUSTER, &["chain"]),
    (PICK_NP_LOCAL, &["chain"]),
    (SERVICE_CIDRS, &["set"]),
    (SERVICES, &["chain"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Each name is declared in the skeleton as exactly the kinds listed, and the skeleton
    /// declares nothing this module does not name.
    #[test]
    fn names_match_the_skeleton() {
        let text = crate::nft::template::SKELETON;
        let mut declared: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if let (Some(kind @ ("set" | "map" | "chain")), Some(name)) = (w.next(), w.next()) {
                declared.entry(name).or_default().push(kind);
            }
        }
        for v in declared.values_mut() {
            v.sort();
            v.dedup();
        }
        let named: std::collections::BTreeMap<&str, Vec<&str>> =
            ALL.iter().map(|(n, k)| (*n, k.to_vec())).collect();
        assert_eq!(named, declared);
    }
}
