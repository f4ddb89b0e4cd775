#!/usr/bin/env python3
"""Stand-in Kubernetes API server for nftproxy integration tests and benchmarks.

Standard library only (Python >= 3.10). It speaks the list/watch JSON dialect
that kube-rs / kube-runtime (and client-go) expect, over plain HTTP/1.1:

* resources: core/v1 services, endpoints, nodes, events;
  discovery.k8s.io/v1 endpointslices; networking.k8s.io/v1 servicecidrs
  (``--no-servicecidrs`` turns them into 404s, like an old cluster);
  events.k8s.io/v1 events.
* list with ``limit``/``continue`` pagination, ``labelSelector``,
  ``fieldSelector``; ``resourceVersion``/``resourceVersionMatch`` tolerated.
* watch (``watch=1|true``) as a chunked stream of newline-terminated
  ``{"type":..., "object":...}`` events, replayed from an in-memory event log;
  410 Expired ERROR events for compacted positions, periodic BOOKMARKs,
  ``timeoutSeconds``, ``sendInitialEvents`` streaming lists (``--no-streaming-lists``
  refuses them with 422 Invalid, as kube-apiserver does with the WatchList gate off).
* get / create (POST) / replace (PUT) / patch (merge, strategic-merge treated
  as merge, apply, json-patch) / delete of single objects.
* one global, monotonically increasing resourceVersion (like etcd).
* a control API under ``/control/`` for tests (apply, delete, compact, pause,
  resume, close-watches, events, requests, state).

Start:  python3 integration/apiserver/apiserver.py --listen 127.0.0.1:0
The first stdout line is ``LISTENING <host>:<port>``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import copy
import contextlib
import datetime
import gc
import ipaddress
import json
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# --------------------------------------------------------------------------
# JSON helpers

_ENC = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(obj) -> bytes:
    return _ENC.encode(obj).encode("utf-8")


_rand = random.Random()


def new_uid() -> str:
    h = "%032x" % _rand.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_gc_lock = threading.Lock()
_gc_depth = 0


@contextlib.contextmanager
def no_gc():
    """Suspend the cyclic GC during bulk work.

    Building 100k objects otherwise triggers repeated full collections over an
    ever larger heap (5x slower). Stored objects are acyclic, so afterwards they
    are moved out of the collector's sight with gc.freeze()."""
    global _gc_depth
    with _gc_lock:
        _gc_depth += 1
        gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0:
                gc.freeze()
                gc.enable()


class ApiError(Exception):
    """An error answered with a metav1.Status body."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        return status_obj(self.code, self.reason, self.message, self.details)


def status_obj(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    st = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        st["details"] = details
    return st


def not_found(rt: "ResourceType", name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.plural}{rt.group_suffix} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


# --------------------------------------------------------------------------
# Selectors

_LABEL_KEY_RE = re.compile(
    r"^([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_label_selector(s: str | None):
    """Returns a list of (key, op, values) requirements, or None for 'everything'.

    ops: 'in', 'notin', 'exists', '!exists', 'gt', 'lt'."""
    if s is None or not s.strip():
        return None
    reqs = []
    for raw in _split_top_level(s):
        p = raw.strip()
        if not p:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: empty requirement in {s!r}")
        m = _SET_RE.match(p)
        if m:
            key, op, vals = m.group(1), m.group(2), m.group(3)
            values = frozenset(v.strip() for v in vals.split(","))
            reqs.append((key, op, values))
        elif p.startswith("!"):
            reqs.append((p[1:].strip(), "!exists", None))
        elif "!=" in p:
            k, v = p.split("!=", 1)
            reqs.append((k.strip(), "notin", frozenset([v.strip()])))
        elif "==" in p:
            k, v = p.split("==", 1)
            reqs.append((k.strip(), "in", frozenset([v.strip()])))
        elif "=" in p:
            k, v = p.split("=", 1)
            reqs.append((k.strip(), "in", frozenset([v.strip()])))
        elif ">" in p or "<" in p:
            op = "gt" if ">" in p else "lt"
            k, v = p.split(">" if op == "gt" else "<", 1)
            try:
                n = int(v.strip())
            except ValueError:
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {p!r}")
            reqs.append((k.strip(), op, n))
        else:
            reqs.append((p, "exists", None))
    for key, _, _ in reqs:
        if not _LABEL_KEY_RE.match(key):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: invalid label key {key!r}")
    return reqs


def labels_match(reqs, labels: dict) -> bool:
    for key, op, vals in reqs:
        if op == "!exists":
            if key in labels:
                return False
        elif op == "exists":
            if key not in labels:
                return False
        elif op == "in":
            if labels.get(key) not in vals:
                return False
        elif op == "notin":
            if key in labels and labels[key] in vals:
                return False
        else:  # gt / lt
            v = labels.get(key)
            try:
                n = int(v)
            except (TypeError, ValueError):
                return False
            if (op == "gt" and not n > vals) or (op == "lt" and not n < vals):
                return False
    return True


def parse_field_selector(s: str | None):
    """Returns a list of (path tuple, negate, value), or None."""
    if s is None or not s.strip():
        return None
    reqs = []
    for raw in s.split(","):
        p = raw.strip()
        if not p:
            continue
        if "!=" in p:
            k, v, neg = *p.split("!=", 1), True
        elif "==" in p:
            k, v, neg = *p.split("==", 1), False
        elif "=" in p:
            k, v, neg = *p.split("=", 1), False
        else:
            raise ApiError(400, "BadRequest", f"invalid selector: {s!r}; can't understand {p!r}")
        reqs.append((tuple(k.strip().split(".")), neg, v.strip()))
    return reqs or None


def field_value(obj: dict, path: tuple) -> str:
    cur = obj
    for part in path:
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
        if cur is None:
            return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


# --------------------------------------------------------------------------
# Store

class Entry:
    """An immutable snapshot of one stored object.

    obj/body carry no kind/apiVersion (like items of a typed List); watch
    events and single GETs prepend them from the ResourceType."""

    __slots__ = ("ns", "name", "obj", "body", "labels", "rv")

    def __init__(self, ns: str, name: str, obj: dict, rv: int):
        self.ns = ns
        self.name = name
        self.obj = obj
        self.body = dumps(obj)
        self.labels = obj["metadata"].get("labels") or {}
        self.rv = rv


class ResourceType:
    def __init__(self, group: str, version: str, kind: str, plural: str, namespaced: bool):
        self.group = group
        self.version = version
        self.api_version = f"{group}/{version}" if group else version
        self.kind = kind
        self.plural = plural
        self.namespaced = namespaced
        self.group_suffix = f".{group}" if group else ""
        self.counter_key = plural + self.group_suffix
        self.list_kind = kind + "List"
        self.prefix = dumps({"kind": kind, "apiVersion": self.api_version})[:-1] + b","
        self.objects: dict[tuple[str, str], Entry] = {}
        self._sorted: list | None = None
        # event log: list of (rv, type, entry, prev_entry_or_None), rv strictly increasing
        self.log: list = []
        # every event of this resource with rv > log_start is in the log
        self.log_start = 0

    def sorted_keys(self) -> list:
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        return self._sorted

    def full_json(self, body: bytes) -> bytes:
        """Object JSON with kind/apiVersion (body always starts with '{"metadata"')."""
        return self.prefix + body[1:]

    def bookmark(self, rv: int, initial_end: bool = False) -> bytes:
        ann = b',"annotations":{"k8s.io/initial-events-end":"true"}' if initial_end else b""
        return (b'{"type":"BOOKMARK","object":' + self.prefix +
                b'"metadata":{"resourceVersion":"%d"%s}}}\n' % (rv, ann))


RESOURCE_TYPES = [
    # group, version, kind, plural, namespaced
    ("", "v1", "Service", "services", True),
    ("", "v1", "Endpoints", "endpoints", True),
    ("", "v1", "Node", "nodes", False),
    ("", "v1", "Event", "events", True),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True),
    ("networking.k8s.io", "v1", "ServiceCIDR", "servicecidrs", False),
    ("events.k8s.io", "v1", "Event", "events", True),
]


class Store:
    def __init__(self, *, servicecidrs: bool = True, log_size: int = 200_000,
                 defaulting: bool = True, service_cidr: str = "10.96.0.0/12",
                 node_port_range: str = "30000-32767"):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.rv = 1
        self.epoch = 0  # bumped to close every open watch stream
        self.paused = False
        self.pause_mode = "reset"
        self._pause_timer: threading.Timer | None = None
        self.log_size = max(1, log_size)
        self.defaulting = defaulting
        self.types: dict[tuple[str, str], ResourceType] = {}
        self.by_kind: dict[tuple[str, str], ResourceType] = {}
        for group, version, kind, plural, namespaced in RESOURCE_TYPES:
            if plural == "servicecidrs" and not servicecidrs:
                continue
            rt = ResourceType(group, version, kind, plural, namespaced)
            self.types[(group, plural)] = rt
            self.by_kind[(rt.api_version, kind)] = rt
        self.counts_lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.open_watches = 0
        # Service allocators (used only when defaulting)
        net = ipaddress.ip_network(service_cidr, strict=False)
        self._ip_base = int(net.network_address)
        self._ip_size = net.num_addresses
        self._ip_v6 = net.version == 6
        self._ip_next = 10
        self._ip_used: set[str] = set()
        lo, hi = (int(x) for x in node_port_range.split("-"))
        self._np_lo, self._np_hi, self._np_next = lo, hi, lo
        self._np_used: set[int] = set()

    # ---- counters -------------------------------------------------------
    def count(self, key: str, verb: str):
        with self.counts_lock:
            self.counts[key][verb] += 1

    def counts_snapshot(self, reset: bool = False) -> dict:
        with self.counts_lock:
            snap = {k: dict(v) for k, v in self.counts.items()}
            if reset:
                self.counts.clear()
        return snap

    # ---- lookup ---------------------------------------------------------
    def type_for(self, api_version: str | None, kind: str | None) -> ResourceType:
        if not kind:
            raise ApiError(400, "BadRequest", "object has no kind")
        if api_version:
            rt = self.by_kind.get((api_version, kind))
        else:  # convenience for control requests: first match by kind (core wins)
            rt = next((t for (av, k), t in self.by_kind.items() if k == kind), None)
        if rt is None:
            raise ApiError(404, "NotFound", f"no matches for kind {kind!r} in version {api_version!r}")
        return rt

    # ---- allocation (lock held) ------------------------------------------
    def _alloc_ip(self) -> str:
        for _ in range(self._ip_size):
            off = self._ip_next
            self._ip_next = self._ip_next + 1 if self._ip_next + 1 < self._ip_size - 1 else 10
            n = self._ip_base + off
            ip = str(ipaddress.IPv6Address(n)) if self._ip_v6 else socket.inet_ntoa(n.to_bytes(4, "big"))
            if ip not in self._ip_used:
                return ip
        raise ApiError(500, "InternalError", "service IP range exhausted")

    def _alloc_node_port(self) -> int:
        for _ in range(self._np_hi - self._np_lo + 1):
            p = self._np_next
            self._np_next = p + 1 if p < self._np_hi else self._np_lo
            if p not in self._np_used:
                self._np_used.add(p)
                return p
        raise ApiError(422, "Invalid", "node port range exhausted")

    def _default_service(self, spec: dict, old_spec: dict | None):
        stype = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if stype == "ExternalName":
            return
        ports = spec.get("ports") or []
        for p in ports:
            p.setdefault("protocol", "TCP")
            if "targetPort" not in p and "port" in p:
                p["targetPort"] = p["port"]
        cip = spec.get("clusterIP")
        if not cip:
            cip = (old_spec or {}).get("clusterIP") or self._alloc_ip()
            spec["clusterIP"] = cip
        if not spec.get("clusterIPs"):
            spec["clusterIPs"] = [cip]
        for ip in spec["clusterIPs"]:
            if ip != "None":
                self._ip_used.add(ip)
        if "ipFamilies" not in spec:
            spec["ipFamilies"] = ["IPv6" if ":" in cip or (cip == "None" and self._ip_v6) else "IPv4"]
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if stype in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            old_np = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                      for p in (old_spec or {}).get("ports") or []}
            for p in ports:
                if not p.get("nodePort"):
                    p["nodePort"] = old_np.get((p.get("port"), p["protocol"])) or self._alloc_node_port()
                self._np_used.add(p["nodePort"])
            if stype == "LoadBalancer":
                spec.setdefault("allocateLoadBalancerNodePorts", True)
                if spec["externalTrafficPolicy"] == "Local" and not spec.get("healthCheckNodePort"):
                    spec["healthCheckNodePort"] = ((old_spec or {}).get("healthCheckNodePort")
                                                   or self._alloc_node_port())
                if spec.get("healthCheckNodePort"):
                    self._np_used.add(spec["healthCheckNodePort"])

    def _release_service(self, obj: dict):
        spec = obj.get("spec") or {}
        for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]:
            self._ip_used.discard(ip)
        for p in spec.get("ports") or []:
            self._np_used.discard(p.get("nodePort"))
        self._np_used.discard(spec.get("healthCheckNodePort"))

    # ---- writes (lock held) ------------------------------------------------
    def _append_log(self, rt: ResourceType, etype: str, entry: Entry, prev: Entry | None):
        rt.log.append((entry.rv, etype, entry, prev))
        if len(rt.log) > self.log_size + self.log_size // 4:
            drop = len(rt.log) - self.log_size
            rt.log_start = rt.log[drop - 1][0]
            del rt.log[:drop]

    def prepare(self, rt: ResourceType, obj, ns_hint: str | None) -> tuple[dict, str, str]:
        """Validates an incoming object; returns (obj without typemeta, ns, name)."""
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "object must be a JSON object")
        obj = dict(obj)
        av = obj.pop("apiVersion", None)
        kind = obj.pop("kind", None)
        if (av and av != rt.api_version) or (kind and kind != rt.kind):
            raise ApiError(400, "BadRequest",
                           f"the API version/kind in the data ({av}/{kind}) does not match the "
                           f"expected ({rt.api_version}/{rt.kind})")
        md = obj.get("metadata")
        md = dict(md) if isinstance(md, dict) else {}
        if rt.namespaced:
            ns = md.get("namespace") or ns_hint or "default"
            if ns_hint and ns != ns_hint:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                                                  "match the namespace sent on the request")
            md["namespace"] = ns
        else:
            ns = ""
            md.pop("namespace", None)
        name = md.get("name")
        if not name:
            gen = md.get("generateName")
            if not gen:
                raise ApiError(422, "Invalid", f"{rt.kind}: metadata.name: Required value: name or "
                                               f"generateName is required")
            name = gen + uuid.uuid4().hex[:5]
            md["name"] = name
        labels = md.get("labels")
        if labels is not None and not isinstance(labels, dict):
            raise ApiError(400, "BadRequest", "metadata.labels must be an object")
        for k in ("selfLink", "managedFields"):
            md.pop(k, None)
        new = {"metadata": md}
        for k, v in obj.items():
            if k != "metadata":
                new[k] = v
        return new, ns, name

    def put(self, rt: ResourceType, obj, ns_hint: str | None, mode: str, ts: str,
            check_rv: bool = False) -> tuple[Entry, str]:
        """mode: 'create' | 'update' | 'apply' (create-or-replace).

        Returns (entry, 'created'|'updated'|'unchanged')."""
        new, ns, name = self.prepare(rt, obj, ns_hint)
        key = (ns, name)
        old = rt.objects.get(key)
        if mode == "create" and old is not None:
            raise ApiError(409, "AlreadyExists", f'{rt.plural}{rt.group_suffix} "{name}" already exists',
                           {"name": name, "group": rt.group, "kind": rt.plural})
        if mode == "update" and old is None:
            raise not_found(rt, name)
        md = new["metadata"]
        if check_rv and old is not None and md.get("resourceVersion") \
                and md["resourceVersion"] != str(old.rv):
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {rt.plural}{rt.group_suffix} "{name}": '
                           f"the object has been modified; please apply your changes to the latest "
                           f"version and try again", {"name": name, "group": rt.group, "kind": rt.plural})
        if self.defaulting and rt.kind == "Service" and not rt.group:
            spec = new.get("spec")
            if not isinstance(spec, dict):
                spec = new["spec"] = {}
            self._default_service(spec, old.obj.get("spec") if old else None)
        if old is not None:
            omd = old.obj["metadata"]
            md["uid"] = omd.get("uid")
            md["creationTimestamp"] = omd.get("creationTimestamp")
            md["resourceVersion"] = omd.get("resourceVersion")
            gen = omd.get("generation", 1)
            if new.get("spec") != old.obj.get("spec"):
                gen += 1
            md["generation"] = gen
            if new == old.obj:
                return old, "unchanged"
        else:
            md["uid"] = new_uid()
            md["creationTimestamp"] = ts
            md["generation"] = 1
        self.rv += 1
        md["resourceVersion"] = str(self.rv)
        entry = Entry(ns, name, new, self.rv)
        rt.objects[key] = entry
        if old is None:
            rt._sorted = None
        self._append_log(rt, "ADDED" if old is None else "MODIFIED", entry, old)
        return entry, "created" if old is None else "updated"

    def delete(self, rt: ResourceType, ns: str, name: str) -> Entry:
        old = rt.objects.pop((ns, name), None)
        if old is None:
            raise not_found(rt, name)
        rt._sorted = None
        self.rv += 1
        obj = dict(old.obj)
        obj["metadata"] = dict(obj["metadata"], resourceVersion=str(self.rv))
        entry = Entry(ns, name, obj, self.rv)
        self._append_log(rt, "DELETED", entry, old)
        if rt.kind == "Service" and not rt.group:
            self._release_service(old.obj)
        return entry

    def compact(self):
        self.rv += 1
        for rt in self.types.values():
            rt.log = []
            rt.log_start = self.rv
        self.epoch += 1
        self.cond.notify_all()

    # ---- control-level helpers ----------------------------------------------
    def apply_many(self, objs: list) -> dict:
        ts = now_rfc3339()
        res = {"created": 0, "updated": 0, "unchanged": 0, "errors": []}
        with self.lock:
            for i, o in enumerate(objs):
                try:
                    if not isinstance(o, dict):
                        raise ApiError(400, "BadRequest", "object must be a JSON object")
                    rt = self.type_for(o.get("apiVersion"), o.get("kind"))
                    _, what = self.put(rt, o, None, "apply", ts)
                    res[what] += 1
                except ApiError as e:
                    res["errors"].append({"index": i, "code": e.code, "message": e.message})
            res["resourceVersion"] = str(self.rv)
            self.cond.notify_all()
        return res

    def delete_many(self, specs: list) -> dict:
        res = {"deleted": 0, "notFound": 0, "errors": []}
        with self.lock:
            for i, s in enumerate(specs):
                try:
                    if not isinstance(s, dict):
                        raise ApiError(400, "BadRequest", "delete spec must be a JSON object")
                    md = s.get("metadata") or {}
                    rt = self.type_for(s.get("apiVersion"), s.get("kind"))
                    ns = s.get("namespace", md.get("namespace"))
                    name = s.get("name", md.get("name"))
                    if s.get("all"):
                        keys = [k for k in rt.objects if ns is None or k[0] == ns]
                        for k in keys:
                            self.delete(rt, *k)
                        res["deleted"] += len(keys)
                        continue
                    if not name:
                        raise ApiError(400, "BadRequest", "delete spec needs name (or all: true)")
                    ns = (ns or "default") if rt.namespaced else ""
                    try:
                        self.delete(rt, ns, name)
                        res["deleted"] += 1
                    except ApiError as e:
                        if e.code != 404:
                            raise
                        res["notFound"] += 1
                except ApiError as e:
                    res["errors"].append({"index": i, "code": e.code, "message": e.message})
            res["resourceVersion"] = str(self.rv)
            self.cond.notify_all()
        return res

    def set_paused(self, paused: bool, mode: str = "reset", seconds: float | None = None):
        with self.lock:
            if self._pause_timer is not None:
                self._pause_timer.cancel()
                self._pause_timer = None
            self.paused = paused
            self.pause_mode = mode
            if paused and seconds:
                t = threading.Timer(seconds, self.set_paused, args=(False,))
                t.daemon = True
                self._pause_timer = t
                t.start()
            self.cond.notify_all()


def load_objects_file(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    try:
        doc = json.loads(data)
        docs = [doc]
    except ValueError:
        try:
            import yaml  # optional; not required for JSON files
        except ImportError:
            raise SystemExit(f"{path}: not JSON, and PyYAML is not installed for YAML")
        docs = [d for d in yaml.safe_load_all(data) if d is not None]
    return [o for d in docs for o in flatten_objects(d)]


def flatten_objects(doc) -> list:
    if isinstance(doc, list):
        return [o for d in doc for o in flatten_objects(d)]
    if isinstance(doc, dict) and isinstance(doc.get("items"), list) and (
            "metadata" not in doc or str(doc.get("kind", "")).endswith("List")):
        return [o for d in doc["items"] for o in flatten_objects(d)]
    return [doc]


# --------------------------------------------------------------------------
# JSON merge patch (RFC 7386) and JSON patch (RFC 6902)

def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _ptr(path: str) -> list:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc, ops):
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be an array")
    for op in ops:
        parts = _ptr(op.get("path", ""))
        if not parts:
            raise ApiError(422, "Invalid", "json patch on the whole document is not supported")
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.get(p)
            if parent is None:
                raise ApiError(422, "Invalid", f"json patch path {op.get('path')!r} not found")
        last = parts[-1]
        kind = op.get("op")
        try:
            if kind in ("add", "replace"):
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(op["value"])
                    elif kind == "add":
                        parent.insert(int(last), op["value"])
                    else:
                        parent[int(last)] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            elif kind == "test":
                cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if cur != op.get("value"):
                    raise ApiError(422, "Invalid", f"json patch test failed at {op.get('path')!r}")
            else:
                raise ApiError(422, "Invalid", f"unsupported json patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"json patch path {op.get('path')!r} not found")
    return doc


# --------------------------------------------------------------------------
# HTTP

def _encode_continue(rv: int, key: tuple) -> str:
    raw = dumps({"rv": rv, "k": list(key)})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(tok: str) -> tuple[int, tuple]:
    try:
        raw = base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))
        d = json.loads(raw)
        return int(d["rv"]), (str(d["k"][0]), str(d["k"][1]))
    except Exception:
        raise ApiError(400, "BadRequest", "continue key is not valid")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nftproxy-test-apiserver/1.0"
    sys_version = ""
    server: "ApiServer"

    # ---- plumbing -------------------------------------------------------
    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("apiserver: %s %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline()
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(n))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _json_body(self, raw: bytes):
        if not raw.strip():
            raise ApiError(400, "BadRequest", "request body is empty")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {e}")

    def _send(self, code: int, body: bytes, ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_obj(self, code: int, obj):
        self._send(code, dumps(obj))

    def _send_error(self, e: ApiError):
        self._send_obj(e.code, e.status())

    def _abort(self):
        """Reset the TCP connection (the API server 'vanished')."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _client_gone(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if r:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
        return False

    def _dispatch(self, method: str):
        store = self.server.store
        try:
            u = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
            body = self._read_body()
            if u.path.startswith("/control/") or u.path == "/control":
                return self._control(method, u.path, q, body)
            if store.paused:
                return self._reject_paused()
            self._api(method, u.path, q, body)
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # keep serving; report as 500
            if self.server.verbose:
                import traceback
                traceback.print_exc()
            try:
                self._send_error(ApiError(500, "InternalError", f"{type(e).__name__}: {e}"))
            except OSError:
                self.close_connection = True

    def _reject_paused(self):
        if self.server.store.pause_mode == "503":
            self.close_connection = True
            self._send_error(ApiError(503, "ServiceUnavailable", "the server is currently unable to "
                                                                 "handle the request (paused)"))
        else:
            self._abort()

    # ---- control API ----------------------------------------------------------
    def _control(self, method: str, path: str, q: dict, raw: bytes):
        store = self.server.store
        op = path[len("/control/"):].strip("/")
        if op == "apply" and method == "POST":
            with no_gc():
                objs = flatten_objects(self._json_body(raw))
                del raw
                res = store.apply_many(objs)
                del objs
            return self._send_obj(422 if res["errors"] else 200, res)
        if op == "delete" and method == "POST":
            doc = self._json_body(raw)
            specs = doc if isinstance(doc, list) else (
                doc["items"] if isinstance(doc, dict) and isinstance(doc.get("items"), list) else [doc])
            res = store.delete_many(specs)
            return self._send_obj(422 if res["errors"] else 200, res)
        if op == "compact" and method == "POST":
            with store.lock:
                store.compact()
                rv = store.rv
            return self._send_obj(200, {"resourceVersion": str(rv)})
        if op == "close-watches" and method == "POST":
            with store.lock:
                store.epoch += 1
                store.cond.notify_all()
            return self._send_obj(200, {})
        if op == "pause" and method == "POST":
            opts = json.loads(raw) if raw.strip() else {}
            mode = str(opts.get("mode", q.get("mode", "reset")))
            if mode not in ("reset", "503"):
                raise ApiError(400, "BadRequest", "mode must be 'reset' or '503'")
            secs = opts.get("seconds", q.get("seconds"))
            store.set_paused(True, mode, float(secs) if secs else None)
            return self._send_obj(200, {"paused": True, "mode": mode})
        if op == "resume" and method == "POST":
            store.set_paused(False)
            return self._send_obj(200, {"paused": False})
        if op == "events" and method == "GET":
            with store.lock:
                items = []
                for rt in store.types.values():
                    if rt.kind == "Event":
                        items.extend((e.rv, rt.full_json(e.body)) for e in rt.objects.values())
                rv = store.rv
            items.sort(key=lambda t: t[0])
            return self._send(200, b'{"kind":"List","apiVersion":"v1","metadata":{"resourceVersion":"%d"},'
                                   b'"items":[%s]}' % (rv, b",".join(b for _, b in items)))
        if op == "requests" and method == "GET":
            return self._send_obj(200, store.counts_snapshot(reset=q.get("reset") in ("1", "true")))
        if op == "requests/reset" and method == "POST":
            return self._send_obj(200, store.counts_snapshot(reset=True))
        if op == "state" and method == "GET":
            with store.lock:
                st = {
                    "resourceVersion": str(store.rv),
                    "paused": store.paused,
                    "pauseMode": store.pause_mode,
                    "openWatches": store.open_watches,
                    "objects": {rt.counter_key: len(rt.objects) for rt in store.types.values()},
                    "log": {rt.counter_key: {"size": len(rt.log), "start": str(rt.log_start)}
                            for rt in store.types.values()},
                }
            return self._send_obj(200, st)
        raise ApiError(404, "NotFound", f"unknown control endpoint {method} {path}")

    # ---- Kubernetes API ---------------------------------------------------------
    def _api(self, method: str, path: str, q: dict, raw: bytes):
        store = self.server.store
        segs = [s for s in path.split("/") if s]
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(200, b"ok", "text/plain")
        if path == "/version":
            return self._send_obj(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0-nftproxy-test",
                                        "platform": "linux/amd64"})
        if not segs or segs[0] not in ("api", "apis"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if segs[0] == "api":
            if len(segs) == 1:
                return self._send_obj(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": []})
            group, version, rest = "", segs[1], segs[2:]
        else:
            if len(segs) == 1:
                return self._send_obj(200, self._group_list())
            if len(segs) == 2:
                groups = [g for g in self._group_list()["groups"] if g["name"] == segs[1]]
                if not groups:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send_obj(200, dict(groups[0], kind="APIGroup", apiVersion="v1"))
            group, version, rest = segs[1], segs[2], segs[3:]
        gv_types = [rt for rt in store.types.values() if rt.group == group and rt.version == version]
        if not gv_types:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return self._send_obj(200, {
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": gv_types[0].api_version,
                "resources": [{"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                               "kind": rt.kind,
                               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                              for rt in gv_types]})
        legacy_watch = False
        if rest[0] == "watch":
            legacy_watch, rest = True, rest[1:]
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = store.types.get((group, rest[0]))
        if rt is None or (ns is not None and not rt.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is not None and rt.namespaced and ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        nskey = ns if rt.namespaced else ""

        if method == "GET":
            is_watch = legacy_watch or q.get("watch", "").lower() in ("1", "true")
            if is_watch:
                store.count(rt.counter_key, "watch")
                return self._watch(rt, ns, name, q)
            if name is None:
                store.count(rt.counter_key, "list")
                return self._list(rt, ns, q)
            store.count(rt.counter_key, "get")
            with store.lock:
                e = rt.objects.get((nskey, name))
            if e is None:
                raise not_found(rt, name)
            return self._send(200, rt.full_json(e.body))
        if legacy_watch:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                    "requested resource")
        ts = now_rfc3339()
        if method == "POST" and name is None:
            if rt.namespaced and ns is None:
                raise ApiError(405, "MethodNotAllowed", "create requires a namespaced path")
            store.count(rt.counter_key, "create")
            obj = self._json_body(raw)
            with store.lock:
                e, _ = store.put(rt, obj, ns, "create", ts)
                store.cond.notify_all()
            return self._send(201, rt.full_json(e.body))
        if name is None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                    "requested resource")
        if method == "PUT":
            store.count(rt.counter_key, "update")
            obj = self._json_body(raw)
            if not isinstance(obj, dict):
                raise ApiError(400, "BadRequest", "object must be a JSON object")
            if (obj.get("metadata") or {}).get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            with store.lock:
                if sub == "status":
                    old = rt.objects.get((nskey, name))
                    if old is None:
                        raise not_found(rt, name)
                    obj = dict(copy.deepcopy(old.obj), status=obj.get("status"),
                               metadata=dict(old.obj["metadata"],
                                             resourceVersion=(obj.get("metadata") or {}).get("resourceVersion")))
                e, _ = store.put(rt, obj, ns, "update", ts, check_rv=True)
                store.cond.notify_all()
            return self._send(200, rt.full_json(e.body))
        if method == "PATCH":
            store.count(rt.counter_key, "patch")
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
            patch = self._json_body(raw)
            with store.lock:
                old = rt.objects.get((nskey, name))
                if ctype == "application/apply-patch+yaml":
                    if not isinstance(patch, dict):
                        raise ApiError(400, "BadRequest", "apply patch must be an object")
                    base = old.obj if old is not None else {}
                    patch = dict(patch)
                    patch["metadata"] = dict(patch.get("metadata") or {}, name=name)
                    new = merge_patch(base, patch)
                    mode = "apply"
                else:
                    if old is None:
                        raise not_found(rt, name)
                    if ctype == "application/json-patch+json":
                        new = json_patch(old.obj, patch)
                    elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                                   "application/json", ""):
                        if not isinstance(patch, dict):
                            raise ApiError(400, "BadRequest", "merge patch must be an object")
                        new = merge_patch(old.obj, patch)
                    else:
                        raise ApiError(415, "UnsupportedMediaType",
                                       "the body of the request was in an unknown format - accepted "
                                       "media types include: application/json-patch+json, "
                                       "application/merge-patch+json, application/apply-patch+yaml")
                    mode = "update"
                if sub == "status" and old is not None:
                    new = dict(copy.deepcopy(old.obj), status=new.get("status"))
                new.pop("kind", None)
                new.pop("apiVersion", None)
                md = new.get("metadata")
                if not isinstance(md, dict):
                    md = new["metadata"] = {}
                md["name"] = name
                if rt.namespaced:
                    md["namespace"] = ns
                e, _ = store.put(rt, new, ns, mode, ts)
                store.cond.notify_all()
            return self._send(200, rt.full_json(e.body))
        if method == "DELETE":
            store.count(rt.counter_key, "delete")
            with store.lock:
                e = store.delete(rt, nskey, name)
                store.cond.notify_all()
            return self._send(200, rt.full_json(e.body))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                "requested resource")

    def _group_list(self) -> dict:
        groups = {}
        for rt in self.server.store.types.values():
            if rt.group:
                gv = {"groupVersion": rt.api_version, "version": rt.version}
                groups.setdefault(rt.group, {"name": rt.group, "versions": [gv], "preferredVersion": gv})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": list(groups.values())}

    @staticmethod
    def _matcher(ns, name, lsel, fsel):
        if ns is None and name is None and lsel is None and fsel is None:
            return None

        def match(e: Entry) -> bool:
            if ns is not None and e.ns != ns:
                return False
            if name is not None and e.name != name:
                return False
            if lsel is not None and not labels_match(lsel, e.labels):
                return False
            if fsel is not None:
                for path, neg, val in fsel:
                    if (field_value(e.obj, path) == val) == neg:
                        return False
            return True
        return match

    @staticmethod
    def _name_from_fsel(fsel):
        """metadata.name=X / metadata.namespace=Y fast paths: (name, ns)."""
        name = ns = None
        for path, neg, val in fsel or ():
            if not neg and path == ("metadata", "name"):
                name = val
            if not neg and path == ("metadata", "namespace"):
                ns = val
        return name, ns

    def _list(self, rt: ResourceType, ns, q: dict):
        store = self.server.store
        lsel = parse_label_selector(q.get("labelSelector"))
        fsel = parse_field_selector(q.get("fieldSelector"))
        try:
            limit = int(q.get("limit") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "limit must be an integer")
        tok = q.get("continue") or None
        fname, fns = self._name_from_fsel(fsel)
        if ns is None and fns is not None and rt.namespaced:
            ns = fns
        # the namespace is handled by the sorted key range, not the matcher
        match = self._matcher(None, None, lsel, fsel)
        bodies: list[bytes] = []
        cont = None
        remaining = None
        with store.lock:
            if tok is not None:
                list_rv, last_key = _decode_continue(tok)
                if list_rv < rt.log_start:
                    raise ApiError(410, "Expired", "The provided continue parameter is too old to display a "
                                                   "consistent list result. You can start a new list without "
                                                   "the continue parameter.")
            else:
                list_rv, last_key = store.rv, None
            objs = rt.objects
            if fname is not None and not tok:
                # direct lookup, e.g. nodes?fieldSelector=metadata.name=NODE
                if not rt.namespaced:
                    cands = [("", fname)] if ("", fname) in objs else []
                elif ns is not None:
                    cands = [(ns, fname)] if (ns, fname) in objs else []
                else:
                    cands = sorted(k for k in objs if k[1] == fname)
                bodies = [objs[k].body for k in cands if match is None or match(objs[k])]
            else:
                keys = rt.sorted_keys()
                if ns is not None and rt.namespaced:
                    lo = bisect.bisect_left(keys, (ns, ""))
                    hi = bisect.bisect_left(keys, (ns + "\x00", ""))
                else:
                    lo, hi = 0, len(keys)
                if last_key is not None:
                    lo = max(lo, bisect.bisect_right(keys, last_key))
                if match is None:
                    end = min(hi, lo + limit) if limit > 0 else hi
                    bodies = [objs[k].body for k in keys[lo:end]]
                    if end < hi:
                        cont = _encode_continue(list_rv, keys[end - 1])
                        remaining = hi - end
                else:
                    i = lo
                    last = None
                    while i < hi:
                        k = keys[i]
                        i += 1
                        e = objs[k]
                        if match(e):
                            bodies.append(e.body)
                            last = k
                            if limit > 0 and len(bodies) >= limit:
                                break
                    if limit > 0 and len(bodies) >= limit:
                        while i < hi:
                            if match(objs[keys[i]]):
                                cont = _encode_continue(list_rv, last)
                                break
                            i += 1
        meta = b'"resourceVersion":"%d"' % list_rv
        if cont is not None:
            meta += b',"continue":"%s"' % cont.encode()
            if remaining is not None:
                meta += b',"remainingItemCount":%d' % remaining
        out = b"".join([b'{"kind":"', rt.list_kind.encode(), b'","apiVersion":"', rt.api_version.encode(),
                        b'","metadata":{', meta, b'},"items":[', b",".join(bodies), b"]}"])
        self._send(200, out)

    # ---- watch -------------------------------------------------------------------
    def _chunk(self, data: bytes):
        if data:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")

    def _event_lines(self, rt: ResourceType, batch, match) -> list[bytes]:
        out = []
        pre = rt.prefix
        for rv, etype, entry, prev in batch:
            if match is None:
                out.append(b'{"type":"%s","object":%s%s}\n' % (etype.encode(), pre, entry.body[1:]))
                continue
            cur = match(entry)
            if etype == "MODIFIED":
                was = prev is not None and match(prev)
                if cur and not was:
                    etype = "ADDED"
                elif was and not cur:
                    # left the selection: DELETED with the old object at the new resourceVersion
                    obj = dict(prev.obj)
                    obj["metadata"] = dict(obj["metadata"], resourceVersion=str(rv))
                    out.append(b'{"type":"DELETED","object":%s%s}\n' % (pre, dumps(obj)[1:]))
                    continue
                elif not cur:
                    continue
            elif not cur:
                continue
            out.append(b'{"type":"%s","object":%s%s}\n' % (etype.encode(), pre, entry.body[1:]))
        return out

    def _write_lines(self, lines: list[bytes]):
        buf, size = [], 0
        for line in lines:
            buf.append(line)
            size += len(line)
            if size >= 256 * 1024:
                self._chunk(b"".join(buf))
                buf, size = [], 0
        if buf:
            self._chunk(b"".join(buf))

    def _watch(self, rt: ResourceType, ns, name, q: dict):
        store = self.server.store
        srv = self.server
        lsel = parse_label_selector(q.get("labelSelector"))
        fsel = parse_field_selector(q.get("fieldSelector"))
        _, fns = self._name_from_fsel(fsel)
        if ns is None and fns is not None and rt.namespaced:
            ns = fns
        match = self._matcher(ns, name, lsel, fsel)
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("1", "true")
        send_initial_param = q.get("sendInitialEvents")
        send_initial = (send_initial_param or "").lower() in ("1", "true")
        rv_param = q.get("resourceVersion", "")
        try:
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else srv.default_watch_timeout
        except ValueError:
            raise ApiError(400, "BadRequest", "timeoutSeconds must be a number")
        if send_initial_param is not None and not srv.streaming_lists:
            # kube-apiserver's answer with the WatchList feature gate off (ValidateListOptions)
            raise ApiError(422, "Invalid", 'ListOptions.meta.k8s.io "" is invalid: sendInitialEvents: '
                           "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList "
                           "feature gate is enabled")
        if send_initial and q.get("resourceVersionMatch") not in (None, "", "NotOlderThan"):
            raise ApiError(422, "Invalid", "sendInitialEvents requires resourceVersionMatch=NotOlderThan")
        if rv_param not in ("", "0"):
            try:
                start_rv = int(rv_param)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resource version {rv_param!r}")
        else:
            start_rv = None
        deadline = time.monotonic() + timeout if timeout > 0 else None
        interval = srv.bookmark_interval

        initial: list[bytes] = []
        expired = False
        with store.lock:
            epoch = store.epoch
            if send_initial or (start_rv is None and send_initial_param is None):
                # rv unset/"0" without sendInitialEvents=false: synthetic ADDED for current state
                keys = rt.sorted_keys()
                objs = rt.objects
                ents = [objs[k] for k in keys]
                pos = store.rv
                if start_rv is not None and start_rv > pos:
                    pos = start_rv
            elif start_rv is None:
                ents = []
                pos = store.rv
            else:
                ents = []
                pos = start_rv
                expired = pos < rt.log_start
            store.open_watches += 1
        try:
            if ents:
                pre = rt.prefix
                initial = [b'{"type":"ADDED","object":%s%s}\n' % (pre, e.body[1:])
                           for e in ents if match is None or match(e)]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if expired:
                self._write_lines([self._expired_line()])
                self.wfile.write(b"0\r\n\r\n")
                return
            self._write_lines(initial)
            del initial
            if send_initial:
                self._chunk(rt.bookmark(pos, initial_end=True))
            last_bm = last_check = time.monotonic()
            while True:
                batch = None
                bm_rv = None
                end = None  # "clean" | "abort" | "expired"
                with store.lock:
                    while True:
                        if store.paused:
                            end = "abort"
                            break
                        if store.epoch != epoch:
                            end = "clean"
                            break
                        if pos < rt.log_start:
                            end = "expired"
                            break
                        log = rt.log
                        if log and log[-1][0] > pos:
                            idx = bisect.bisect_right(log, pos, key=lambda t: t[0])
                            batch = log[idx:idx + 5000]
                            break
                        now = time.monotonic()
                        if deadline is not None and now >= deadline:
                            end = "clean"
                            break
                        if bookmarks and now - last_bm >= interval:
                            bm_rv = max(pos, store.rv)
                            break
                        wait = 1.0
                        if deadline is not None:
                            wait = min(wait, deadline - now)
                        if bookmarks:
                            wait = min(wait, interval - (now - last_bm))
                        store.cond.wait(max(wait, 0.001))
                        if time.monotonic() - last_check >= 1.0:
                            break  # periodically check for a vanished client (outside the lock)
                if end == "abort":
                    self._abort()
                    return
                if end == "expired":
                    self._write_lines([self._expired_line()])
                    end = "clean"
                if end == "clean":
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if batch:
                    pos = batch[-1][0]
                    self._write_lines(self._event_lines(rt, batch, match))
                elif bm_rv is not None:
                    pos = bm_rv
                    last_bm = time.monotonic()
                    self._chunk(rt.bookmark(bm_rv))
                else:
                    last_check = time.monotonic()
                    if self._client_gone():
                        self.close_connection = True
                        return
        finally:
            with store.lock:
                store.open_watches -= 1

    @staticmethod
    def _expired_line() -> bytes:
        st = status_obj(410, "Expired", "too old resource version")
        return b'{"type":"ERROR","object":' + dumps(st) + b"}\n"


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, store: Store, *, verbose=False, bookmark_interval=1.0,
                 default_watch_timeout=1800.0, streaming_lists=True):
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store = store
        self.verbose = verbose
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.streaming_lists = streaming_lists
        super().__init__(addr, Handler)

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def parse_listen(s: str) -> tuple[str, int]:
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port or 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (port 0 = any free port)")
    ap.add_argument("--objects", action="append", default=[],
                    help="preload objects from a JSON (List, array or single object) file; repeatable")
    ap.add_argument("--no-servicecidrs", action="store_true",
                    help="do not serve networking.k8s.io/v1 servicecidrs (404, like an older cluster)")
    ap.add_argument("--bookmark-interval", type=float, default=1.0,
                    help="seconds between BOOKMARK events on watches that allow them (default 1)")
    ap.add_argument("--watch-timeout", type=float, default=1800.0,
                    help="watch duration when the client sends no timeoutSeconds (default 1800)")
    ap.add_argument("--log-size", type=int, default=200_000,
                    help="watch events kept per resource before the oldest are compacted (default 200000)")
    ap.add_argument("--no-defaulting", action="store_true",
                    help="do not default Services (clusterIP/nodePort allocation, protocol, targetPort...)")
    ap.add_argument("--service-cluster-ip-range", default="10.96.0.0/12",
                    help="range for allocated Service clusterIPs (default 10.96.0.0/12)")
    ap.add_argument("--no-streaming-lists", action="store_true",
                    help="refuse sendInitialEvents watches with 422 Invalid (kube-apiserver with the "
                         "WatchList feature gate off, or older than 1.27)")
    ap.add_argument("--port-file", help="also write the bound port to this file")
    ap.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = ap.parse_args(argv)

    store = Store(servicecidrs=not args.no_servicecidrs, log_size=args.log_size,
                  defaulting=not args.no_defaulting, service_cidr=args.service_cluster_ip_range)
    for path in args.objects:
        with no_gc():
            res = store.apply_many(load_objects_file(path))
        if res["errors"]:
            sys.stderr.write(f"apiserver: errors loading {path}: {res['errors'][:5]}\n")
            return 2
    server = ApiServer(parse_listen(args.listen), store, verbose=args.verbose,
                       bookmark_interval=args.bookmark_interval, default_watch_timeout=args.watch_timeout,
                       streaming_lists=not args.no_streaming_lists)
    host, port = server.server_address[:2]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"LISTENING {host}:{port}" if ":" not in host else f"LISTENING [{host}]:{port}", flush=True)

    def _term(*_):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, _term)
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
