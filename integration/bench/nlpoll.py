"""Ask the kernel whether one set element exists, over nf_tables netlink, without starting `nft`.

The benchmark polls for "the last Service's ClusterIP element" every ~10 ms during cold start.
`nft get element` costs a process start and a cache fill (tens of ms on a loaded 2-core box),
which would be the resolution of the measurement; one NFT_MSG_GETSETELEM on an open socket costs
microseconds. The socket is created inside the benchmark's network namespace (see netns_socket)
and used from the calling thread.

Only what the benchmark needs: exact-match lookup of a concatenated key in an `ip` table.
Key layout (nf_tables concatenations): every field is padded to a multiple of 4 bytes;
ipv4_addr = 4 bytes, inet_proto = 1 byte (+3), inet_service = 2 bytes big endian (+2).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM = 13
NFT_MSG_NEWSETELEM = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
AF_INET = 2
PROTOS = {"tcp": 6, "udp": 17, "sctp": 132}


def _attr(typ: int, payload: bytes) -> bytes:
    ln = 4 + len(payload)
    return struct.pack("=HH", ln, typ) + payload + b"\0" * ((4 - ln % 4) % 4)


def key_ip_proto_port(ip: str, proto: str, port: int) -> bytes:
    return (ipaddress.IPv4Address(ip).packed + bytes([PROTOS[proto]]) + b"\0\0\0"
            + struct.pack("!H", port) + b"\0\0")


class ElementPoller:
    """One netlink socket; exists(table, set, key) -> bool. Raises OSError on unexpected errors."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.bind((0, 0))
        self.seq = 0

    @classmethod
    def new_socket(cls) -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)

    def exists(self, table: str, set_name: str, key: bytes, family: int = AF_INET) -> bool:
        self.seq += 1
        seq = self.seq
        elem = _attr(NFTA_LIST_ELEM | NLA_F_NESTED,
                     _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key)))
        body = (struct.pack("=BBH", family, 0, 0)
                + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elem))
        hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        self.sock.send(hdr + body)
        found = False
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, off)
                if ln < 16:
                    raise OSError(errno.EPROTO, "bad netlink message")
                if rseq == seq:
                    if typ == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + 16)
                        if err == 0:
                            return found
                        if -err == errno.ENOENT:
                            return False
                        raise OSError(-err, f"GETSETELEM {table}/{set_name}: {os.strerror(-err)}")
                    if typ == NLMSG_DONE:
                        return found
                    if typ & 0xff == NFT_MSG_NEWSETELEM:
                        found = True
                off += (ln + 3) & ~3

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------
# Element notifications (what `nft monitor new elements` reads), without nft's cache fill:
# `nft monitor` 1.0.6 spends minutes at 100% CPU before printing anything when the namespace
# already holds ~400k elements, so the benchmark listens to the multicast group itself.

NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFTA_SET_ELEM_DATA = 2
NLA_TYPE_MASK = 0x3FFF


def _attrs(buf: bytes, off: int, end: int):
    while off + 4 <= end:
        ln, typ = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            return
        yield typ & NLA_TYPE_MASK, off + 4, off + ln
        off += (ln + 3) & ~3


def _value(buf: bytes, start: int, end: int) -> bytes | None:
    for typ, s, e in _attrs(buf, start, end):
        if typ == NFTA_DATA_VALUE:
            return buf[s:e]
    return None


def parse_new_elements(buf: bytes):
    """Yield (family, table, set, key bytes, data bytes|None) for every element of every
    NFT_MSG_NEWSETELEM message in one recv buffer."""
    off = 0
    while off + 16 <= len(buf):
        ln, typ, _flags, _seq, _pid = struct.unpack_from("=IHHII", buf, off)
        if ln < 16:
            return
        end = min(off + ln, len(buf))
        if typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM and ln >= 20:
            family = buf[off + 16]
            table = set_name = ""
            elems = None
            for atyp, s, e in _attrs(buf, off + 20, end):
                if atyp == NFTA_SET_ELEM_LIST_TABLE:
                    table = buf[s:e].rstrip(b"\0").decode(errors="replace")
                elif atyp == NFTA_SET_ELEM_LIST_SET:
                    set_name = buf[s:e].rstrip(b"\0").decode(errors="replace")
                elif atyp == NFTA_SET_ELEM_LIST_ELEMENTS:
                    elems = (s, e)
            if elems:
                for ltyp, s, e in _attrs(buf, *elems):
                    if ltyp != NFTA_LIST_ELEM:
                        continue
                    key = data = None
                    for etyp, s2, e2 in _attrs(buf, s, e):
                        if etyp == NFTA_SET_ELEM_KEY:
                            key = _value(buf, s2, e2)
                        elif etyp == NFTA_SET_ELEM_DATA:
                            data = _value(buf, s2, e2)
                    if key is not None:
                        yield family, table, set_name, key, data
        off += (ln + 3) & ~3


def monitor_socket() -> socket.socket:
    """Call inside the target namespace: a socket subscribed to nf_tables notifications."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((0, 0))
    s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    return s
