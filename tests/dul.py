"""A tiny raw DICOM Upper Layer client for protocol-edge tests.

Real peers (dcmtk, pynetdicom) only send well-formed traffic; the malformed
PDU, abort and slow-sender tests need a client that can send anything, byte
by byte. This module builds PDUs by hand (PS3.8 section 9.3) and reads the
server's answers; it is written from the standard, not from a library, so
that it can be made to break every rule on purpose.
"""

import socket
import struct
import time

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def _uid(s):
    b = s.encode()
    return b + b"\0" if len(b) % 2 else b


def _item(item_type, payload):
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called="MINIPACS", calling="RAWSCU", contexts=None, max_pdu=65536):
    """A-ASSOCIATE-RQ bytes. contexts: list of (id, abstract, [ts...])."""
    if contexts is None:
        contexts = [(1, VERIFICATION, [IMPLICIT_LE]), (3, CT_IMAGE, [EXPLICIT_LE])]
    body = struct.pack(">HH", 1, 0)
    body += called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32
    body += _item(0x10, APP_CONTEXT.encode())
    for pc_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode())
        for ts in syntaxes:
            sub += _item(0x40, ts.encode())
        body += _item(0x20, struct.pack(">BBBB", pc_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4")
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdata(pc_id, is_command, is_last, data):
    """One P-DATA-TF PDU with one PDV."""
    control = (1 if is_command else 0) | (2 if is_last else 0)
    pdv = struct.pack(">IBB", len(data) + 2, pc_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _element(group, elem, value):
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, elem, len(value)) + value


def command(elements):
    """An implicit-LE command set with its group length."""
    body = b"".join(_element(0, e, v) for e, v in elements)
    return _element(0, 0, struct.pack("<I", len(body))) + body


def c_store_rq(message_id, sop_class, sop_instance):
    return command(
        [
            (0x0002, _uid(sop_class)),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0)),
            (0x1000, _uid(sop_instance)),
        ]
    )


def c_echo_rq(message_id=1):
    return command(
        [
            (0x0002, _uid(VERIFICATION)),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def c_find_rq(message_id, sop_class):
    return command(
        [
            (0x0002, _uid(sop_class)),
            (0x0100, struct.pack("<H", 0x0020)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
        ]
    )


def c_cancel_rq(message_id):
    return command(
        [
            (0x0100, struct.pack("<H", 0x0FFF)),
            (0x0120, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


RELEASE_RQ = struct.pack(">BBIxxxx", 0x05, 0, 4)
ABORT = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)


def parse_command(data):
    """Decode an implicit-LE command set into {element: bytes}."""
    out = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def status_of(cmd):
    return struct.unpack("<H", cmd[0x0900])[0]


class Connection:
    """A socket speaking raw PDUs."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data):
        self.sock.sendall(data)

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by peer")
            buf += chunk
        return buf

    def read_pdu(self):
        """Returns (type, body), or (None, b'') when the peer closed."""
        try:
            head = self._exact(6)
        except (ConnectionError, ConnectionResetError):
            return None, b""
        pdu_type, _, length = struct.unpack(">BBI", head)
        return pdu_type, self._exact(length)

    def associate(self, **kwargs):
        """Sends an A-ASSOCIATE-RQ; returns (type, body) of the answer."""
        self.send(associate_rq(**kwargs))
        return self.read_pdu()

    def read_command(self):
        """Reads PDUs until one complete command set; returns it decoded."""
        data = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise AssertionError(f"expected P-DATA-TF, got {pdu_type!r}")
            pos = 0
            while pos < len(body):
                length, _pc, control = struct.unpack_from(">IBB", body, pos)
                data += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 3 == 3:
                    return parse_command(data)

    def store(self, pc_id, sop_class, sop_instance, dataset, chunk=16384, message_id=1):
        """C-STORE of raw data set bytes; returns the response status."""
        self.send(pdata(pc_id, True, True, c_store_rq(message_id, sop_class, sop_instance)))
        for i in range(0, max(len(dataset), 1), chunk):
            part = dataset[i : i + chunk]
            self.send(pdata(pc_id, False, i + chunk >= len(dataset), part))
        return status_of(self.read_command())

    def read_find_answer(self):
        """Reads a C-FIND's responses up to the final one; returns (its
        status, the number of pending responses with an identifier). The
        identifiers are counted, never decoded."""
        matches, command_set = 0, b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise AssertionError(f"expected P-DATA-TF, got {pdu_type!r}")
            pos = 0
            while pos < len(body):
                length, _pc, control = struct.unpack_from(">IBB", body, pos)
                if control & 1:
                    command_set += body[pos + 6 : pos + 4 + length]
                    if control & 2:
                        status = status_of(parse_command(command_set))
                        command_set = b""
                        if status not in (0xFF00, 0xFF01):
                            return status, matches
                elif control & 2:
                    matches += 1  # the last fragment of an identifier
                pos += 4 + length

    def echo(self, pc_id=1):
        self.send(pdata(pc_id, True, True, c_echo_rq()))
        return status_of(self.read_command())

    def release(self):
        self.send(RELEASE_RQ)
        pdu_type, _ = self.read_pdu()
        self.close()
        return pdu_type

    def closed_by_peer(self, timeout=5):
        """True when the peer closes (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def close(self):
        self.sock.close()
