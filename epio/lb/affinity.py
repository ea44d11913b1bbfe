"""Client affinity of the TLS listener across router processes (``lb.tls_affinity``).

With ``lb.workers > 1`` the kernel spreads a listener's connections over the
router processes (``SO_REUSEPORT``) by a hash of the whole 4-tuple, so a client's
next connection lands on any process.  Each process has its own TLS session-ticket
keys (OpenSSL makes them at random per context; pyOpenSSL, and the OpenSSL that
``cryptography``'s wheel links statically, offer no way to set them), so a client
resuming on another process gets a full handshake.  With ``lb.tls_affinity =
"client"`` the parent attaches a classic BPF program to the TLS listener's
``SO_REUSEPORT`` group (``SO_ATTACH_REUSEPORT_CBPF``) that picks the process by the
client's address instead: the IPv4 address, or the first 64 bits of the IPv6 one
(a host's privacy addresses share them), modulo ``lb.workers``.  A returning
client then meets the process that issued its ticket.  While a process is down
(fewer sockets than ``lb.workers``) the kernel's own hash serves the indexes left
over.  The price: clients behind one address (a NAT, a proxy or load balancer that
hides clients' addresses) all go to one process.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>
SKF_NET_OFF = -0x100000  # <linux/filter.h>: offsets from the network header

# classic BPF opcodes (<linux/bpf_common.h>, <linux/filter.h>)
_LD_W_ABS = 0x00 | 0x00 | 0x20
_LD_B_ABS = 0x00 | 0x10 | 0x20
_RSH_K = 0x04 | 0x70 | 0x00
_XOR_X = 0x04 | 0xA0 | 0x08
_MOD_K = 0x04 | 0x90 | 0x00
_JEQ_K = 0x05 | 0x10 | 0x00
_JA = 0x05 | 0x00
_TAX = 0x07 | 0x00
_RET_A = 0x06 | 0x10


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def client_program(n: int) -> bytes:
    """The filter (``struct sock_filter[]``): the index of the socket for a connection,
    from its client's address, in ``range(n)``."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return b"".join([
        _insn(_LD_B_ABS, SKF_NET_OFF),  # 0: A = first byte of the IP header
        _insn(_RSH_K, 4),  # 1: A = IP version
        _insn(_JEQ_K, 4, jt=5),  # 2: IPv4 -> 8
        _insn(_LD_W_ABS, SKF_NET_OFF + 8),  # 3: IPv6 source, bits 0-31
        _insn(_TAX),  # 4
        _insn(_LD_W_ABS, SKF_NET_OFF + 12),  # 5: bits 32-63
        _insn(_XOR_X),  # 6
        _insn(_JA, 1),  # 7: -> 9
        _insn(_LD_W_ABS, SKF_NET_OFF + 12),  # 8: IPv4 source
        _insn(_MOD_K, n),  # 9
        _insn(_RET_A),  # 10
    ])


def attach_client_affinity(sock: socket.socket, n: int) -> None:
    """Make ``sock``'s SO_REUSEPORT group (of ``n`` processes) choose by client address
    (OSError when the kernel refuses)."""
    prog = client_program(n)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("@HP", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
