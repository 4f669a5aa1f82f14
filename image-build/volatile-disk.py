#!/usr/bin/env python3
"""An SD card with a volatile write cache, served to QEMU over NBD.

image-build/power-cut-test runs one of these per boot in front of the card
file. QEMU's own disk back ends cannot model a power cut: whatever the guest
wrote and QEMU passed on sits in the host's page cache and survives killing
QEMU, flushed or not. Here, writes the guest has not flushed are kept in
memory (reads see them) and reach the file only on NBD_CMD_FLUSH, which is
what the guest's flush (an ext4 journal commit, fdatasync, a FAT sync)
becomes. When the connection ends without NBD_CMD_DISC (QEMU was killed: the
power was cut) the unflushed writes are lost the way a card may lose them:
each one independently kept or dropped at random (--keep-probability; 0
drops them all), applied in the order they were written. The last line of
standard output is a JSON report of the cut.

The protocol is NBD's fixed newstyle (doc/proto.md of NetworkBlockDevice/
nbd): NBD_OPT_GO (and NBD_OPT_EXPORT_NAME) to enter transmission, other
options answered NBD_REP_ERR_UNSUP (so no structured replies: simple replies
only), then NBD_CMD_READ, WRITE, FLUSH, TRIM (accepted and ignored, which
the protocol allows) and DISC. FUA is not advertised, so QEMU makes a
forced-unit-access write a write plus a flush. Requests are served one at a
time in arrival order, so a flush covers every write answered before it.

Usage: volatile-disk.py CARD SOCKET [--seed N] [--keep-probability P]
"""

import argparse
import json
import os
import random
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = 2**31 + 1
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
# Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_TRIM.
TRANSMISSION_FLAGS = 1 | 4 | 32
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
EINVAL, ENOTSUP = 22, 95

PAGE = 4096
MAX_REQUEST = 32 * 1024 * 1024


class Disconnected(Exception):
    """The client went away: mid-request counts as a power cut too."""


def recv_exact(conn, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise Disconnected
        got += k
    return bytes(buf)


class VolatileCard:
    """The card file plus the writes since the last flush: `pages` (the
    newest content of every 4 KiB page written since, for reads) and
    `unflushed` (each write as sent, in order, for the power cut)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.pages = {}
        self.unflushed = []
        self.flushes = 0
        self.writes = 0

    def read(self, offset, length):
        data = bytearray(os.pread(self.fd, length, offset))
        if self.pages:
            end = offset + length
            for page in range(offset // PAGE, (end - 1) // PAGE + 1):
                content = self.pages.get(page)
                if content is None:
                    continue
                start = page * PAGE
                lo, hi = max(start, offset), min(start + PAGE, end)
                data[lo - offset:hi - offset] = content[lo - start:hi - start]
        return bytes(data)

    def write(self, offset, data):
        self.writes += 1
        self.unflushed.append((offset, data))
        end = offset + len(data)
        for page in range(offset // PAGE, (end - 1) // PAGE + 1):
            start = page * PAGE
            content = self.pages.get(page)
            if content is None:
                content = bytearray(os.pread(self.fd, PAGE, start).ljust(PAGE, b"\0"))
                self.pages[page] = content
            lo, hi = max(start, offset), min(start + PAGE, end)
            content[lo - start:hi - start] = data[lo - offset:hi - offset]

    def flush(self):
        """What the card has been told is written is now on it."""
        for page, content in self.pages.items():
            start = page * PAGE
            os.pwrite(self.fd, content[:max(0, min(PAGE, self.size - start))], start)
        self.pages.clear()
        self.unflushed.clear()
        self.flushes += 1

    def power_cut(self, rng, keep_probability):
        """Each unflushed write reaches the card or not, independently;
        those that do land in the order they were written."""
        kept = dropped = kept_bytes = dropped_bytes = 0
        for offset, data in self.unflushed:
            if rng.random() < keep_probability:
                os.pwrite(self.fd, data, offset)
                kept += 1
                kept_bytes += len(data)
            else:
                dropped += 1
                dropped_bytes += len(data)
        self.pages.clear()
        self.unflushed.clear()
        return {"unflushed_writes": kept + dropped, "kept_writes": kept, "kept_bytes": kept_bytes,
                "dropped_writes": dropped, "dropped_bytes": dropped_bytes}


def send_option_reply(conn, option, reply_type, data=b""):
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, reply_type, len(data)) + data)


def handshake(conn, card):
    """Fixed newstyle negotiation up to the transmission phase."""
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    client_flags, = struct.unpack(">I", recv_exact(conn, 4))
    no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
    while True:
        magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
        if magic != IHAVEOPT:
            raise Disconnected
        recv_exact(conn, length)  # the export name and info requests: there is one export
        if option == OPT_EXPORT_NAME:
            conn.sendall(struct.pack(">QH", card.size, TRANSMISSION_FLAGS) + (b"" if no_zeroes else bytes(124)))
            return
        if option == OPT_GO:
            send_option_reply(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, card.size, TRANSMISSION_FLAGS))
            send_option_reply(conn, option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 512, PAGE, MAX_REQUEST))
            send_option_reply(conn, option, REP_ACK)
            return
        if option == OPT_ABORT:
            send_option_reply(conn, option, REP_ACK)
            raise Disconnected
        send_option_reply(conn, option, REP_ERR_UNSUP)


def transmission(conn, card):
    """Serves requests until NBD_CMD_DISC (True) or the client vanishes."""
    while True:
        magic, _flags, command, handle, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
        if magic != REQUEST_MAGIC:
            raise Disconnected
        in_bounds = offset + length <= card.size and length <= MAX_REQUEST
        if command == CMD_WRITE:
            data = recv_exact(conn, length)
            error = 0 if in_bounds else EINVAL
            if not error:
                card.write(offset, data)
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle))
        elif command == CMD_READ:
            if in_bounds:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + card.read(offset, length))
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, handle))
        elif command == CMD_FLUSH:
            card.flush()
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
        elif command == CMD_TRIM:
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0 if in_bounds else EINVAL, handle))
        elif command == CMD_DISC:
            return True
        else:
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, ENOTSUP, handle))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("card")
    parser.add_argument("socket")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-probability", type=float, default=0.5)
    args = parser.parse_args()
    card = VolatileCard(args.card)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(args.socket)
    server.listen(1)
    print(f"volatile disk: serving {args.card} ({card.size} bytes) on {args.socket}", flush=True)
    conn, _ = server.accept()
    server.close()
    disconnected_cleanly = False
    try:
        handshake(conn, card)
        disconnected_cleanly = transmission(conn, card)
    except (Disconnected, ConnectionError):
        pass
    if disconnected_cleanly:
        card.flush()
        report = {"cut": False}
    else:
        report = {"cut": True, **card.power_cut(random.Random(args.seed), args.keep_probability)}
    report.update(flushes=card.flushes, writes=card.writes)
    os.close(card.fd)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
