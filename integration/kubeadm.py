"""kubeadm's kube-proxy configuration file (tests/fixtures/kubeadm-config.conf: what `kubeadm
init` v1.36 writes into ConfigMap kube-system/kube-proxy, key config.conf), with the fields a
test sets changed. The unit tests (src/cmd/kpconfig.rs) parse the same file."""

from __future__ import annotations

import os

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "tests", "fixtures", "kubeadm-config.conf")


def kubeadm_config(changes: dict[str, str]) -> str:
    """changes: {"clusterCIDR": "10.0.0.0/8", "conntrack.maxPerCore": "0", ...}: the line of each
    top-level or section.field key gets the new value (written as given)."""
    lines = open(FIXTURE).read().split("\n")
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        indent = "  " if section else ""
        inside = not section
        for i, line in enumerate(lines):
            if section and not line.startswith(" "):
                inside = line == f"{section}:"
                continue
            if inside and line.startswith(f"{indent}{name}:") and \
                    not line.startswith(f"{indent} "):
                lines[i] = f"{indent}{name}: {value}"
                break
        else:
            raise KeyError(f"{key} is not in {FIXTURE}")
    return "\n".join(lines)
