#!/usr/bin/env python3
"""Receive-path benchmark: minipacs against dcmtk storescp, with floors.

This is a script that prints figures, not a test. Run it from anywhere:

    python3 tests/bench/receive.py                 # full run, N=5
    python3 tests/bench/receive.py --quick         # smoke run, N=1, small data
    python3 tests/bench/receive.py --only w1 --runs 3 --workdir /tmp/mpbench
    python3 tests/bench/receive.py --tls           # plain DICOM, then DICOM over TLS
    python3 tests/bench/receive.py --only-tls      # DICOM over TLS only

Workloads (generated once into the work dir, reused when it is given again):
  W1  400 CT Image Storage objects of ~512 KiB (512x512 16-bit pixels),
      Explicit VR Little Endian, one folder.
  W2  one 512 MiB object (16-bit OW PixelData), written in chunks so the
      script never holds it in memory.

Receivers, each a fresh process with a fresh empty output folder per run:
  1. minipacs serve              (durable: fdatasync + rename + folder fsync)
  2. minipacs serve --no-fsync
  3. dcmtk storescp +B +xa -dhl  (bit-preserving, no fsync)
  4. dcmtk storescp --ignore     (stores nothing: the sender's own floor)
Senders: dcmtk storescu first, then minipacs send, each against all four.

TLS (--tls adds these measurements after the plain ones, --only-tls runs
only them; without either flag the script runs no TLS at all):
  * A private CA and a server and a client certificate (ECDSA P-256; the
    server's with SAN DNS:localhost and IP:127.0.0.1; both with extended key
    usage serverAuth and clientAuth) are made once with the openssl command
    line into <work dir>/certs and reused when the work dir is given again.
    Both sides verify the peer against that CA (mutual TLS).
  * Receivers: minipacs serve (durable) and serve --no-fsync, each with
    --tls KEY CERT --tls-port P --add-cert-file CA --no-plain; dcmtk
    storescp +tls +B +xa -dhl; and storescp +tls --ignore as the floor.
  * Senders: dcmtk storescu +tls, then minipacs send --tls.
  * No Python floors: the plain tables have them, and they carry no TLS.
  * Ratios and checks are against dcmtk storescp +tls.
  * Negotiated protocol and cipher suite: for minipacs serve, from the
    `tls=...` field of its association log lines (every association of every
    run); for dcmtk storescp, from storescp -d in one untimed probe
    association per sender before the rounds.

Method
  * Wall time is that of the sender process, from start to exit, so it covers
    association set-up, every C-STORE and its response, and release. The
    response to the last object is only sent once the receiver has stored it,
    so the sender's wall time is the receiver's time to store everything.
  * Receivers are interleaved within each round (round r runs receiver 1, 2,
    3, 4 and the floors in turn) because the machine is noisy: a slow spell
    then hits every receiver about equally instead of one of them wholly.
  * Best of N: noise (other tenants, writeback of earlier runs, scheduling)
    only ever adds time, so the minimum over N runs is the figure closest to
    what each receiver itself costs. CPU time is likewise the minimum over
    runs; peak RSS is the maximum over runs.
  * Receiver CPU is utime+stime of the receiver process (all its threads)
    from /proc/PID/stat, read right after the sender exits and before the
    receiver is stopped; peak RSS is VmHWM from /proc/PID/status. When the
    receiver is several processes (minipacs serve with a privilege-separated
    worker), both are summed over the process and its live descendants (CPU
    also counts children it has reaped); the table then says how many
    processes, and the summed peak RSS counts pages they share once per
    process (PSS, read at the same moment, counts them once).
  * Between runs the output folder is removed and os.sync() is called
    (outside any timing), so no run pays for writeback left by the one
    before it.
  * Floors, measured interleaved in the same rounds, say how far from "free"
    each figure is:
      - storescp --ignore: what the sender costs when nothing is stored;
      - W1: a bare Python durability loop (write the object's bytes to a
        temp file, fdatasync, rename into place, fsync the folder, once per
        object), and the same loop without the fsyncs: what the disk charges
        for durability with no DICOM at all;
      - W2: a raw socket-to-file copy in Python (socket.sendfile on one side,
        recv_into a 1 MiB buffer + os.write on the other, then fdatasync, and
        once without it): what moving the bytes through loopback TCP onto
        the disk costs with no protocol.

The PASS/FAIL lines at the end are informational: the exit status is 0 unless
something broke (a sender failed, objects did not land, a process would not
start).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from procs import (BenchError, Children, cpu_seconds, dcmtk_env, proc_kib, process_tree, tail,
                   wait_listening)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]
# MINIPACS_BIN selects another build (as in the tests).
MINIPACS = Path(os.environ.get("MINIPACS_BIN", REPO / "target" / "release" / "minipacs"))
# Absolute paths on purpose: pynetdicom installs shims with the same names
# earlier on PATH.
STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
OPENSSL = "/usr/bin/openssl"

PORT_RANGE = range(12000, 12100)
RECEIVER_AE = "PACS"
SENDER_AE = "BENCHSCU"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000
COPY_BUFFER = 1 * MIB
SENDER_TIMEOUT_S = 1800
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 20
MINIPACS_FREE_SPACE_RESERVE = 0.05  # its default reserve: 5 % of the filesystem


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------


def plain_env() -> dict[str, str]:
    return os.environ.copy()


class Ports:
    """Hands out ports in 12000-12099, a different one each time, skipping
    any that are in use (a fresh port per run also sidesteps TIME_WAIT)."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        for _ in PORT_RANGE:
            port = PORT_RANGE[self._next % len(PORT_RANGE)]
            self._next += 1
            if port_is_free(port):
                return port
        raise BenchError("no free port in 12000-12099")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# /proc readings
# --------------------------------------------------------------------------


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of VmHWM (peak RSS) over the processes. Pages that processes share
    (the binary, after a fork) count once per process, so for more than one
    process this is an upper bound."""
    return sum(proc_kib(f"/proc/{pid}/status", "VmHWM") for pid in pids) / KIB


def pss_mib(pids: list[int]) -> float:
    """Sum of PSS now: each shared page split between the processes that
    map it, so shared pages count once in all."""
    return sum(proc_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids) / KIB


# --------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------


@dataclass
class Workload:
    key: str  # "w1" or "w2"
    title: str
    folder: Path
    files: list[Path]

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def unit(self) -> str:
        return "objects/s" if self.key == "w1" else "MB/s"

    def rate(self, wall: float) -> float:
        if self.key == "w1":
            return self.count / wall
        return self.total_bytes / MB / wall


def pixel_pattern(size: int) -> bytes:
    """Deterministic noise, so no layer on the way can compress it away."""
    return random.Random(1234).randbytes(size)


def header_dataset(rows: int, columns: int, study: str, series: str, number: int) -> Dataset:
    """A CT image data set without its PixelData, which the caller appends."""
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.PatientName = "BENCH^MINIPACS"
    ds.PatientID = "BENCH0001"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds


def pixel_data_header(length: int) -> bytes:
    """(7FE0,0010) OW in Explicit VR Little Endian: tag, VR, 2 reserved
    bytes, 32-bit length."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def write_object(path: Path, ds: Dataset, pixel_bytes: int, pattern: bytes) -> None:
    """Writes the Part-10 header and data set with pydicom, then appends
    PixelData (the last element) chunk by chunk."""
    assert pixel_bytes % 2 == 0 and pixel_bytes % len(pattern) == 0
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as f:
        f.write(pixel_data_header(pixel_bytes))
        for _ in range(pixel_bytes // len(pattern)):
            f.write(pattern)


def make_w1(folder: Path, count: int) -> None:
    rows = columns = 512
    pixels = pixel_pattern(rows * columns * 2)
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        ds = header_dataset(rows, columns, study, series, i + 1)
        write_object(folder / f"ct{i + 1:04d}.dcm", ds, len(pixels), pixels)


def make_w2(folder: Path, size: int) -> None:
    columns = 16384
    rows = size // (columns * 2)
    assert rows * columns * 2 == size and rows <= 0xFFFF
    ds = header_dataset(rows, columns, generate_uid(), generate_uid(), 1)
    write_object(folder / "big.dcm", ds, size, pixel_pattern(1 * MIB))


def check_object(path: Path, pixel_bytes: int) -> None:
    """Reads the header back with pydicom and checks that the file ends with
    the PixelData element of the expected length."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with open(path, "rb") as f:
        f.seek(-(pixel_bytes + 12), os.SEEK_END)
        element_header = f.read(12)
    if ds.SOPClassUID != CT_IMAGE_STORAGE or element_header != pixel_data_header(pixel_bytes):
        raise BenchError(f"generated {path} does not read back as expected")


def prepare(workdir: Path, key: str, name: str, build, pixel_bytes: int) -> Path:
    """Builds a workload folder once: into <name>.partial, renamed when done,
    so an interrupted generation is never mistaken for a finished one."""
    final = workdir / name
    if final.is_dir():
        print(f"  {key}: reusing {final}")
        return final
    partial = workdir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    build(partial)
    check_object(sorted(partial.iterdir())[0], pixel_bytes)
    partial.rename(final)
    print(f"  {key}: generated {final} in {time.perf_counter() - started:.1f}s")
    return final


def workload_from(key: str, title: str, folder: Path) -> Workload:
    files = sorted(folder.iterdir())
    return Workload(key, title, folder, files)


# --------------------------------------------------------------------------
# TLS certificates
# --------------------------------------------------------------------------

CERT_DAYS = "3650"
# Both end-entity certificates carry serverAuth and clientAuth, so either
# may be used on either side of a connection.
LEAF_EXTENSIONS = ("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
SERVER_NAMES = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files in the certificate folder: ca.pem, and a key and a
    certificate for "server" and for "client"."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def key(self, who: str) -> Path:
        return self.folder / f"{who}.key"

    def cert(self, who: str) -> Path:
        return self.folder / f"{who}.pem"

    def placeholders(self, who: str) -> dict[str, Path]:
        """For the {key}, {cert} and {ca} placeholders of a command."""
        return {"key": self.key(who), "cert": self.cert(who), "ca": self.ca}


def openssl(folder: Path, *args: str) -> None:
    """Runs the openssl command line in folder; its output is shown only
    when it fails."""
    done = subprocess.run([OPENSSL, *args], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"openssl {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")


def make_key(folder: Path, name: str) -> None:
    openssl(folder, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", name)


def make_ca(folder: Path) -> None:
    """A self-signed CA: its own key, CA:TRUE, may sign certificates."""
    make_key(folder, "ca.key")
    openssl(folder, "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", CERT_DAYS,
            "-subj", "/CN=minipacs bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.pem")


def make_leaf(folder: Path, who: str, extensions: str) -> None:
    """A key, a signing request and a certificate signed by the CA with
    exactly the given extensions (from an extension file, so nothing comes
    from the system's openssl.cnf)."""
    make_key(folder, f"{who}.key")
    (folder / f"{who}.ext").write_text(extensions)
    openssl(folder, "req", "-new", "-key", f"{who}.key", "-subj", f"/CN=minipacs bench {who}",
            "-out", f"{who}.csr")
    openssl(folder, "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-sha256", "-days", CERT_DAYS,
            "-extfile", f"{who}.ext", "-out", f"{who}.pem")


def prepare_certificates(workdir: Path) -> TlsFiles:
    """Makes the CA and both certificates once: into certs.partial, renamed
    when done (as the workloads are), and checks that each certificate
    verifies against the CA."""
    final = workdir / "certs"
    if final.is_dir():
        print(f"  TLS: reusing {final}")
        return TlsFiles(final)
    partial = workdir / "certs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    make_ca(partial)
    make_leaf(partial, "server", LEAF_EXTENSIONS + SERVER_NAMES)
    make_leaf(partial, "client", LEAF_EXTENSIONS)
    openssl(partial, "verify", "-CAfile", "ca.pem", "server.pem", "client.pem")
    partial.rename(final)
    print(f"  TLS: made a private CA, a server and a client certificate (ECDSA P-256) in {final}")
    return TlsFiles(final)


# --------------------------------------------------------------------------
# Receivers and senders
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Receiver:
    name: str
    argv: tuple[str, ...]  # with {port} and {out} placeholders; TLS: {key} {cert} {ca}
    dcmtk: bool
    stores: bool  # False for storescp --ignore
    tls: bool = False

    def command(self, port: int, out: Path, tls: TlsFiles | None = None) -> list[str]:
        if self.tls and tls is None:
            raise BenchError(f"{self.name}: no TLS certificates")
        files = tls.placeholders("server") if self.tls else {}
        return [a.format(port=port, out=out, **files) for a in self.argv]


MINIPACS_SERVE = (str(MINIPACS), "serve", "--port", "{port}", "--aetitle", RECEIVER_AE,
                  "--output-directory", "{out}")
DURABLE = Receiver("minipacs durable", MINIPACS_SERVE, dcmtk=False, stores=True)
NO_FSYNC = Receiver("minipacs --no-fsync", MINIPACS_SERVE + ("--no-fsync",), dcmtk=False, stores=True)
DCMTK = Receiver("dcmtk storescp +B", (STORESCP, "+B", "+xa", "-dhl", "-aet", RECEIVER_AE,
                                        "-od", "{out}", "{port}"), dcmtk=True, stores=True)
IGNORE = Receiver("floor: storescp --ignore", (STORESCP, "--ignore", "+xa", "-aet", RECEIVER_AE,
                                              "{port}"), dcmtk=True, stores=False)
RECEIVERS = (DURABLE, NO_FSYNC, DCMTK, IGNORE)

# TLS only (--no-plain): the TLS listener is the one port minipacs binds.
MINIPACS_SERVE_TLS = (str(MINIPACS), "serve", "--aetitle", RECEIVER_AE,
                      "--output-directory", "{out}", "--tls", "{key}", "{cert}",
                      "--tls-port", "{port}", "--add-cert-file", "{ca}", "--no-plain")
DCMTK_TLS = ("+tls", "{key}", "{cert}", "--add-cert-file", "{ca}")
TLS_DURABLE = Receiver("minipacs +tls durable", MINIPACS_SERVE_TLS, dcmtk=False, stores=True,
                       tls=True)
TLS_NO_FSYNC = Receiver("minipacs +tls --no-fsync", MINIPACS_SERVE_TLS + ("--no-fsync",),
                        dcmtk=False, stores=True, tls=True)
TLS_DCMTK = Receiver("dcmtk storescp +tls +B", (STORESCP, *DCMTK_TLS, "+B", "+xa", "-dhl",
                                                 "-aet", RECEIVER_AE, "-od", "{out}", "{port}"),
                     dcmtk=True, stores=True, tls=True)
TLS_IGNORE = Receiver("floor: storescp +tls --ignore", (STORESCP, *DCMTK_TLS, "--ignore", "+xa",
                                                        "-aet", RECEIVER_AE, "{port}"),
                      dcmtk=True, stores=False, tls=True)
TLS_RECEIVERS = (TLS_DURABLE, TLS_NO_FSYNC, TLS_DCMTK, TLS_IGNORE)


@dataclass(frozen=True)
class Sender:
    name: str
    dcmtk: bool
    tls: bool = False

    def command(self, port: int, paths: list[Path], tls: TlsFiles | None = None) -> list[str]:
        """The sender's argv for these files or folders."""
        if self.dcmtk:
            return [STORESCU, *self.tls_options("+tls", tls), "-aec", RECEIVER_AE,
                    "localhost", str(port), *map(str, paths)]
        return [str(MINIPACS), "send", *self.tls_options("--tls", tls), "--aetitle", SENDER_AE,
                "--call", RECEIVER_AE, "localhost", str(port), *map(str, paths)]

    def paths(self, workload: Workload) -> list[Path]:
        """storescu is given the files, minipacs send the folder."""
        return list(workload.files) if self.dcmtk else [workload.folder]

    def tls_options(self, flag: str, tls: TlsFiles | None) -> list[str]:
        """Client key and certificate, and the CA the receiver must chain to;
        dcmtk and minipacs take them in the same order."""
        if not self.tls:
            return []
        if tls is None:
            raise BenchError(f"{self.name}: no TLS certificates")
        return [flag, str(tls.key("client")), str(tls.cert("client")),
                "--add-cert-file", str(tls.ca)]

    def env(self) -> dict[str, str]:
        return dcmtk_env() if self.dcmtk else plain_env()


SENDERS = (Sender("dcmtk storescu", dcmtk=True), Sender("minipacs send", dcmtk=False))
TLS_SENDERS = (Sender("dcmtk storescu +tls", dcmtk=True, tls=True),
               Sender("minipacs send --tls", dcmtk=False, tls=True))


@dataclass(frozen=True)
class Suite:
    """Receivers and senders measured together, and the rows that ratios
    and checks compare: plain DICOM, or DICOM over TLS."""

    name: str
    receivers: tuple[Receiver, ...]
    senders: tuple[Sender, ...]
    durable: Receiver
    no_fsync: Receiver
    reference: Receiver  # dcmtk: the other side of every ratio
    python_floors: bool
    # rows of another minipacs build (--baseline), ratios against dcmtk too
    baseline_rows: tuple[str, ...] = ()

    @property
    def minipacs_rows(self) -> tuple[str, ...]:
        return (self.durable.name, self.no_fsync.name, *self.baseline_rows)


PLAIN = Suite("plain", RECEIVERS, SENDERS, DURABLE, NO_FSYNC, DCMTK, python_floors=True)
TLS = Suite("TLS", TLS_RECEIVERS, TLS_SENDERS, TLS_DURABLE, TLS_NO_FSYNC, TLS_DCMTK,
            python_floors=False)


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


@dataclass
class Sample:
    wall: float
    cpu: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    processes: int = 1


@dataclass
class Row:
    """All runs of one receiver (or floor) for one workload and sender."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    failures: int = 0

    def best_wall(self) -> float | None:
        return min((s.wall for s in self.samples), default=None)

    def best_cpu(self) -> float | None:
        return min((s.cpu for s in self.samples if s.cpu is not None), default=None)

    def peak_rss(self) -> float | None:
        return max((s.rss_mib for s in self.samples if s.rss_mib is not None), default=None)

    def peak_pss(self) -> float | None:
        return max((s.pss_mib for s in self.samples if s.pss_mib is not None), default=None)

    def processes(self) -> int:
        return max((s.processes for s in self.samples), default=1)


def count_files(folder: Path) -> int:
    """Regular files under folder, skipping hidden entries (minipacs keeps
    its in-flight temp files in .incoming and a .lock file) and minipacs's
    index (index.sqlite and its -wal and -shm, in the store's root)."""
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        top = Path(root) == Path(folder)
        total += sum(1 for f in files if not f.startswith(".") and not (top and f.startswith("index.sqlite")))
    return total


def fresh_folder(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# Outputs of many files are set aside, not deleted, until the end: see
# clean_up. Past this many bytes set aside, the oldest are deleted after all.
RETIRED_BYTES_CAP = 24 << 30
RETIRED: list[tuple[Path, int]] = []  # (folder, bytes), oldest first
RETIRED_NAMES = itertools.count()


def clean_up(path: Path) -> None:
    """Sets a run's output aside (or removes it) and flushes what is left
    dirty, so the next run does not pay for this one's writeback.

    A folder of many files is moved aside, not deleted, until the script
    ends. This machine's ext4 has no journal, and without one ext4 does
    not hand out an inode freed in the last 60 s (300 s while its table
    block is dirty): every file created meanwhile scans past them
    (find_inode_bit -> recently_deleted, 15-30 % of a receiver's CPU in a
    profile). Deleting each run's 400 files before the next run made every
    receiver pay for its predecessor's deletions, by an amount that
    depended on the order and the timing, which is noise at 5-10 %.
    Deleting a handful of large files (W2) costs nothing of the kind."""
    files = count_files(path) if path.exists() else 0
    if files <= 16:
        shutil.rmtree(path, ignore_errors=True)
    else:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        aside = path.parent / "set-aside" / f"{next(RETIRED_NAMES):05d}-{path.name}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        path.rename(aside)
        RETIRED.append((aside, size))
        while sum(b for _, b in RETIRED) > RETIRED_BYTES_CAP:
            oldest, _ = RETIRED.pop(0)
            shutil.rmtree(oldest, ignore_errors=True)
    os.sync()


class Bench:
    def __init__(self, workdir: Path, children: Children, ports: Ports,
                 tls: TlsFiles | None = None) -> None:
        self.workdir = workdir
        self.children = children
        self.ports = ports
        self.tls = tls
        self.errors: list[str] = []
        # "sender -> receiver" -> {"<version> <suite>": associations seen}
        self.negotiated: dict[str, dict[str, int]] = {}
        (workdir / "logs").mkdir(exist_ok=True)

    def error(self, message: str) -> None:
        banner = "!" * 78
        print(f"\n{banner}\n!!! ERROR: {message}\n{banner}\n", flush=True)
        self.errors.append(message.splitlines()[0])

    # -- one DICOM run ------------------------------------------------------

    def dicom_run(self, workload: Workload, sender: Sender, receiver: Receiver,
                  label: str) -> Sample | None:
        out = fresh_folder(self.workdir / "runs" / "out")
        if not receiver.dcmtk:
            # minipacs makes its store itself: started as root, it would
            # refuse a folder this script (root) made for a worker that
            # cannot write to it.
            out.rmdir()
        port = self.ports.take()
        recv_log = self.workdir / "logs" / f"{label}.receiver.log"
        send_log = self.workdir / "logs" / f"{label}.sender.log"
        env = dcmtk_env() if receiver.dcmtk else plain_env()
        proc = self.children.start(receiver.command(port, out, self.tls), recv_log, env)
        try:
            wait_listening(proc, [port], receiver.name, recv_log, START_TIMEOUT_S)
            wall, code = self.timed_send(sender.command(port, sender.paths(workload), self.tls),
                                         send_log, sender.env())
            if proc.poll() is not None:
                self.error(f"{label}: receiver exited ({exit_status(proc.returncode)}) during "
                           f"the run; sender: {exit_status(code)}. This script only stops a "
                           f"receiver after its sender has exited: was it signalled from "
                           f"outside?\n{tail(recv_log)}")
                return None
            tree = process_tree(proc.pid)
            sample = Sample(wall, cpu_seconds(tree), peak_rss_mib(tree), pss_mib(tree), len(tree))
            landed = count_files(out)
        finally:
            self.children.stop(proc)
            clean_up(out)
        if code != 0:
            self.error(f"{label}: sender {exit_status(code)}\n{tail(send_log)}\n"
                       f"  receiver log:\n{tail(recv_log)}")
            return None
        if receiver.stores and landed != workload.count:
            self.error(f"{label}: {landed} files landed, expected {workload.count}\n"
                       f"{tail(recv_log)}")
            return None
        if receiver.tls and not receiver.dcmtk:
            self.note_negotiated(f"{sender.name} -> minipacs serve", minipacs_tls(recv_log))
        return sample

    def note_negotiated(self, pair: str, sessions: list[str]) -> None:
        counts = self.negotiated.setdefault(pair, {})
        for session in sessions:
            counts[session] = counts.get(session, 0) + 1

    def timed_send(self, argv: list[str], log: Path,
                   env: dict[str, str]) -> tuple[float, int | None]:
        """Runs the sender; returns its wall time and exit code (None: timed
        out). The wait blocks in waitpid: Popen.wait(timeout=...) polls in
        steps of up to 50 ms, which would round every wall time up to the
        next step. A watchdog timer kills a sender that hangs instead."""
        started = time.perf_counter()
        proc = self.children.start(argv, log, env)
        timed_out = threading.Event()

        def kill_hung_sender() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(SENDER_TIMEOUT_S, kill_hung_sender)
        watchdog.start()
        try:
            code = proc.wait()
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        self.children.stop(proc)  # already exited: only forgets it
        return wall, None if timed_out.is_set() else code

    # -- TLS: what dcmtk storescp negotiates ---------------------------------

    def probe_storescp_tls(self, sample: Path) -> None:
        """One untimed association from each TLS sender, with one object, to
        storescp +tls -d, whose debug log shows each connection's protocol
        and cipher suite. The connections come one after the other, so the
        log's entries are the senders' in order."""
        out = fresh_folder(self.workdir / "runs" / "probe")
        port = self.ports.take()
        recv_log = self.workdir / "logs" / "tls-probe.storescp.log"
        argv = TLS_DCMTK.command(port, out, self.tls)
        argv.insert(1, "-d")
        proc = self.children.start(argv, recv_log, dcmtk_env())
        try:
            wait_listening(proc, [port], TLS_DCMTK.name, recv_log, START_TIMEOUT_S)
            for sender in TLS_SENDERS:
                send_log = self.workdir / "logs" / f"tls-probe.{slug(sender.name)}.log"
                _wall, code = self.timed_send(sender.command(port, [sample], self.tls),
                                              send_log, sender.env())
                if code != 0:
                    raise BenchError(f"TLS probe: {sender.name} -> {TLS_DCMTK.name}: "
                                     f"{exit_status(code)}\n{tail(send_log)}\n"
                                     f"  receiver log:\n{tail(recv_log)}")
        finally:
            self.children.stop(proc)
            clean_up(out)
        sessions = storescp_tls(recv_log)
        if len(sessions) != len(TLS_SENDERS):
            raise BenchError(f"TLS probe: {len(sessions)} TLS connection(s) in {recv_log}, "
                             f"expected {len(TLS_SENDERS)}")
        for sender, session in zip(TLS_SENDERS, sessions):
            self.note_negotiated(f"{sender.name} -> dcmtk storescp", [session])

    # -- floor (b): bare durability loop -------------------------------------

    def durability_loop(self, payload: bytes, count: int, fsync: bool) -> float:
        folder = fresh_folder(self.workdir / "runs" / "loop")
        try:
            return durability_loop(folder, payload, count, fsync)
        finally:
            clean_up(folder)

    # -- floor (c): raw socket-to-file copy ----------------------------------

    def raw_copy(self, source: Path, fsync: bool) -> float:
        folder = fresh_folder(self.workdir / "runs" / "raw")
        try:
            wall, received = raw_copy(source, folder / "copy.bin", self.ports.take(), fsync)
        finally:
            clean_up(folder)
        if received != source.stat().st_size:
            raise BenchError(f"raw copy received {received} bytes of {source.stat().st_size}")
        return wall


def exit_status(code: int | None) -> str:
    if code is None:
        return f"timed out after {SENDER_TIMEOUT_S}s"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def durability_loop(folder: Path, payload: bytes, count: int, fsync: bool) -> float:
    """Per object: temp file, write, fdatasync, rename into place, fsync the
    folder; the fsyncs are skipped when fsync is False."""
    started = time.perf_counter()
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            temp = folder / f".incoming-{i}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, payload)
                if fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(temp, folder / f"object-{i:05d}")
            if fsync:
                os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return time.perf_counter() - started


def raw_copy(source: Path, target: Path, port: int, fsync: bool) -> tuple[float, int]:
    """Streams source over loopback TCP with socket.sendfile into a Python
    sink thread (recv_into a 1 MiB buffer, os.write, then fdatasync), which
    answers one byte when done, like a C-STORE response. Returns the
    sender's wall time and the bytes the sink received."""
    result: dict = {}
    with socket.create_server(("127.0.0.1", port)) as listener:
        sink = threading.Thread(target=socket_sink, args=(listener, target, fsync, result),
                                daemon=True)
        sink.start()
        try:
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as conn, open(source, "rb") as f:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.sendfile(f)
                conn.shutdown(socket.SHUT_WR)
                answer = conn.recv(1)
            wall = time.perf_counter() - started
        finally:
            sink.join(timeout=STOP_TIMEOUT_S)
    if "error" in result:
        raise BenchError(f"raw copy sink failed: {result['error']}")
    if answer != b"k":
        raise BenchError("raw copy sink did not answer")
    return wall, result["received"]


def socket_sink(listener: socket.socket, target: Path, fsync: bool, result: dict) -> None:
    try:
        conn, _ = listener.accept()
        with conn:
            buffer = bytearray(COPY_BUFFER)
            view = memoryview(buffer)
            received = 0
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while n := conn.recv_into(view):
                    write_all(fd, view[:n])
                    received += n
                if fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            result["received"] = received
            conn.sendall(b"k")
    except OSError as e:
        result["error"] = e


# --------------------------------------------------------------------------
# TLS logs
# --------------------------------------------------------------------------

# minipacs serve, one association line each: ... tls=TLSv1_3 TLS13_AES_256_GCM_SHA384 ...
MINIPACS_TLS = re.compile(r"\btls=(TLS\S+) (\S+)")
# storescp -d, per connection: "D:   Protocol    : TLSv1.3" then
# "D:   Ciphersuite : TLS_AES_256_GCM_SHA384, encryption: 256 bits"
STORESCP_PROTOCOL = re.compile(r"^\w: +Protocol +: (\S+)", re.MULTILINE)
STORESCP_SUITE = re.compile(r"^\w: +Ciphersuite +: ([^,\s]+)", re.MULTILINE)


def minipacs_tls(log: Path) -> list[str]:
    """'<version> <suite>' of every TLS association in a minipacs serve log."""
    text = log.read_text(errors="replace")
    return [f"{version} {suite}" for version, suite in MINIPACS_TLS.findall(text)]


def storescp_tls(log: Path) -> list[str]:
    """'<version> <suite>' of every TLS connection in a storescp -d log."""
    text = log.read_text(errors="replace")
    versions = STORESCP_PROTOCOL.findall(text)
    suites = STORESCP_SUITE.findall(text)
    return [f"{version} {suite}" for version, suite in zip(versions, suites)]


# --------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------


def floor_names(key: str) -> tuple[str, str]:
    """Row names of the two floors measured with a workload."""
    if key == "w1":
        return ("floor: py write+fdatasync+rename+dir fsync",
                "floor: py write+rename, no fsync")
    return ("floor: py socket->file copy + fdatasync",
            "floor: py socket->file copy, no fsync")


def measure(bench: Bench, workload: Workload, sender: Sender, runs: int,
            suite: Suite = PLAIN) -> dict[str, Row]:
    """N rounds; each round runs every receiver of the suite and then, for
    plain DICOM, both Python floors once."""
    rows = {r.name: Row(r.name) for r in suite.receivers}
    durable_floor, plain_floor = floor_names(workload.key)
    if suite.python_floors:
        rows[durable_floor] = Row(durable_floor)
        rows[plain_floor] = Row(plain_floor)
    payload = workload.files[0].read_bytes() if workload.key == "w1" else b""

    for r in range(1, runs + 1):
        for receiver in suite.receivers:
            label = f"{workload.key}-{slug(sender.name)}-r{r}-{slug(receiver.name)}"
            sample = bench.dicom_run(workload, sender, receiver, label)
            record(rows[receiver.name], sample)
            show_progress(label, sample)
        if not suite.python_floors:
            continue
        for fsync, name in ((True, durable_floor), (False, plain_floor)):
            if workload.key == "w1":
                wall = bench.durability_loop(payload, workload.count, fsync)
            else:
                wall = bench.raw_copy(workload.files[0], fsync)
            rows[name].samples.append(Sample(wall))
            show_progress(f"{workload.key}-{slug(sender.name)}-r{r}-{slug(name)}", Sample(wall))
    return rows


def record(row: Row, sample: Sample | None) -> None:
    if sample is None:
        row.failures += 1
    else:
        row.samples.append(sample)


def slug(name: str) -> str:
    """For log file names: "minipacs --no-fsync" -> "minipacs-no-fsync"."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    return "-".join(words)


def show_progress(label: str, sample: Sample | None) -> None:
    if sample is None:
        print(f"    {label}: FAILED", flush=True)
        return
    extra = ""
    if sample.cpu is not None:
        extra = f"  cpu {sample.cpu:.2f}s  rss {sample.rss_mib:.1f} MiB"
        if sample.processes > 1:
            extra += f" over {sample.processes} processes (pss {sample.pss_mib:.1f} MiB)"
    print(f"    {label}: {sample.wall:.3f}s{extra}", flush=True)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt(value: float | None, width: int, decimals: int) -> str:
    """A right-aligned number, or a dash when there is none."""
    text = "-" if value is None else f"{value:.{decimals}f}"
    return text.rjust(width)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def print_table(workload: Workload, sender: Sender, rows: dict[str, Row], runs: int,
                suite: Suite = PLAIN) -> None:
    dcmtk = rows[suite.reference.name]
    print()
    tag = "" if suite.name == PLAIN.name else f"{suite.name} -- "
    print(f"{tag}{workload.title} -- sender: {sender.name} -- best of {runs}")
    header = (f"{'receiver':<44} {'best wall s':>11} {workload.unit:>10} {'recv CPU s':>10} "
              f"{'peak RSS MiB':>12} {'wall ratio':>10} {'CPU ratio':>9}")
    print(header)
    print("-" * len(header))
    for row in rows.values():
        wall = row.best_wall()
        rate = workload.rate(wall) if wall else None
        is_minipacs = row.name in suite.minipacs_rows
        wall_ratio = ratio(dcmtk.best_wall(), wall) if is_minipacs else None
        cpu_ratio = ratio(row.best_cpu(), dcmtk.best_cpu()) if is_minipacs else None
        note = f"  ({row.failures} failed)" if row.failures else ""
        if row.processes() > 1:
            note += f"  ({row.processes()} processes, PSS {fmt(row.peak_pss(), 0, 1)} MiB)"
        print(f"{row.name:<44} {fmt(wall, 11, 3)} {fmt(rate, 10, 1)} "
              f"{fmt(row.best_cpu(), 10, 2)} {fmt(row.peak_rss(), 12, 1)} "
              f"{fmt(wall_ratio, 10, 2)} {fmt(cpu_ratio, 9, 2)}{note}")
    print("  best wall: min over runs of the sender's wall time; recv CPU: min over runs of the")
    print("  receiver's utime+stime read right after the sender exits; peak RSS: max VmHWM over")
    print("  runs; wall ratio = dcmtk_wall / minipacs_wall (>1: minipacs faster); CPU ratio =")
    if suite.python_floors:
        print("  minipacs_cpu / dcmtk_cpu (<1: minipacs cheaper). Floors are Python, run in the same")
        print("  rounds; they have no receiver process, hence no CPU/RSS figures. CPU is counted in")
    else:
        print(f"  minipacs_cpu / dcmtk_cpu (<1: minipacs cheaper); dcmtk is {suite.reference.name}.")
        print("  Every receiver and sender does mutual TLS with the bench CA. CPU is counted in")
    print(f"  clock ticks of {1 / os.sysconf('SC_CLK_TCK') * 1000:.0f} ms.")
    if any(row.processes() > 1 for row in rows.values()):
        print("  A receiver of several processes: CPU and peak RSS are sums over them; the RSS sum")
        print("  counts shared pages (the binary) once per process, PSS (at the end of the run,")
        print("  max over runs) once in all.")
    if workload.key == "w2":
        print(f"  MB = 10^6 bytes; the object is {workload.total_bytes:,} bytes.")


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def print_checks(results: dict[tuple[str, str], dict[str, Row]]) -> None:
    print()
    print("Checks (informational)")
    print("----------------------")
    for sender in SENDERS:
        w1 = results.get(("w1", sender.name))
        w2 = results.get(("w2", sender.name))
        print(f"sender: {sender.name}")
        if w1:
            check_durable_budget(w1)
            check_wall_vs_dcmtk("W1 no-fsync", w1, NO_FSYNC)
        if w2:
            check_wall_vs_dcmtk("W2 durable", w2, DURABLE)
        for key, rows in (("W1", w1), ("W2", w2)):
            if rows:
                for receiver in (DURABLE, NO_FSYNC):
                    check_cpu(f"{key} {receiver.name}", rows, receiver)


def check_durable_budget(w1: dict[str, Row]) -> None:
    durable = w1[DURABLE.name].best_wall()
    no_fsync = w1[NO_FSYNC.name].best_wall()
    loop = w1[floor_names("w1")[0]].best_wall()
    ok = None
    budget = None
    if None not in (durable, no_fsync, loop):
        budget = (no_fsync + loop) * 1.1
        ok = durable <= budget
    print(f"  {verdict(ok)}  W1 durable <= (W1 no-fsync + bare durability loop) x 1.1: "
          f"{fmt(durable, 0, 3)}s <= ({fmt(no_fsync, 0, 3)}s + {fmt(loop, 0, 3)}s) x 1.1 "
          f"= {fmt(budget, 0, 3)}s")


def check_wall_vs_dcmtk(label: str, rows: dict[str, Row], receiver: Receiver,
                        reference: Receiver = DCMTK, at_least: float = 1.0,
                        against: str = "dcmtk") -> None:
    r = ratio(rows[reference.name].best_wall(), rows[receiver.name].best_wall())
    ok = None if r is None else r >= at_least
    print(f"  {verdict(ok)}  {label} >= {at_least:.1f}x {against}: {fmt(r, 0, 2)}x "
          f"(dcmtk {fmt(rows[reference.name].best_wall(), 0, 3)}s, "
          f"minipacs {fmt(rows[receiver.name].best_wall(), 0, 3)}s)")


TLS_W2_FLOOR = 1.5  # minipacs at least this many times as fast as dcmtk +tls on W2
TLS_W1_FLOOR = 1.0
TLS_RSS_CEILING_MIB = 16.0


def print_tls_checks(results: dict[tuple[str, str], dict[str, Row]]) -> None:
    """W1 compares minipacs --no-fsync (dcmtk does not fsync either), W2 both
    minipacs receivers; peak RSS is the largest over both workloads."""
    print()
    print("TLS checks (informational)")
    print("--------------------------")
    for sender in TLS_SENDERS:
        w1 = results.get(("w1", sender.name))
        w2 = results.get(("w2", sender.name))
        print(f"sender: {sender.name}")
        if w1:
            check_wall_vs_dcmtk(f"TLS W1: {TLS_NO_FSYNC.name}", w1, TLS_NO_FSYNC, TLS_DCMTK,
                                TLS_W1_FLOOR, "dcmtk +tls")
        if w2:
            for receiver in (TLS_DURABLE, TLS_NO_FSYNC):
                check_wall_vs_dcmtk(f"TLS W2: {receiver.name}", w2, receiver, TLS_DCMTK,
                                    TLS_W2_FLOOR, "dcmtk +tls")
        for receiver in (TLS_DURABLE, TLS_NO_FSYNC):
            check_rss(receiver, [rows for rows in (w1, w2) if rows])


def check_rss(receiver: Receiver, tables: list[dict[str, Row]]) -> None:
    """On the summed peak RSS, the conservative figure; with several
    processes the line also gives their PSS."""
    rows = [table[receiver.name] for table in tables]
    peak = max((p for p in (r.peak_rss() for r in rows) if p is not None), default=None)
    ok = None if peak is None else peak <= TLS_RSS_CEILING_MIB
    processes = max((r.processes() for r in rows), default=1)
    detail = ""
    if processes > 1:
        pss = max((p for p in (r.peak_pss() for r in rows) if p is not None), default=None)
        detail = (f" (sum over {processes} processes, shared pages counted in each; "
                  f"PSS {fmt(pss, 0, 1)} MiB)")
    print(f"  {verdict(ok)}  TLS peak RSS <= {TLS_RSS_CEILING_MIB:.0f} MiB, {receiver.name}: "
          f"{fmt(peak, 0, 1)} MiB{detail}")


def print_negotiated(negotiated: dict[str, dict[str, int]]) -> None:
    """Protocol and cipher suite per sender -> receiver pair, with how many
    associations showed each."""
    print()
    print("TLS negotiated (protocol, cipher suite)")
    print("---------------------------------------")
    for pair, counts in negotiated.items():
        seen = ", ".join(f"{session} (x{n})" for session, n in counts.items())
        print(f"  {pair:<44} {seen or '- (not in the log)'}")
    print("  minipacs serve: from its association log lines, every association of every run;")
    print("  dcmtk storescp: from storescp -d, one probe association per sender before the rounds.")


def check_cpu(label: str, rows: dict[str, Row], receiver: Receiver) -> None:
    mine, theirs = rows[receiver.name].best_cpu(), rows[DCMTK.name].best_cpu()
    ok = None if mine is None or theirs is None else mine <= theirs
    print(f"  {verdict(ok)}  receiver CPU <= dcmtk, {label}: {fmt(mine, 0, 2)}s vs "
          f"{fmt(theirs, 0, 2)}s")


# --------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------


def ensure_binary() -> None:
    if MINIPACS.exists():
        return
    print(f"{MINIPACS} missing: cargo build --release", flush=True)
    subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    if not MINIPACS.exists():
        raise BenchError(f"cargo build did not produce {MINIPACS}")


def check_tools(tls: bool) -> None:
    for tool in (STORESCP, STORESCU):
        if not os.access(tool, os.X_OK):
            raise BenchError(f"{tool} not found (apt-get install dcmtk)")
    if tls and not os.access(OPENSSL, os.X_OK):
        raise BenchError(f"{OPENSSL} not found (apt-get install openssl)")


def filesystem_type(path: Path) -> str:
    """The type of the mount that holds path, from /proc/mounts."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def check_disk(workdir: Path, w1_count: int, w2_bytes: int, only: str | None) -> None:
    """Free space must hold the workloads still to generate plus one run's
    output, and leave minipacs's default 5 % reserve, below which it refuses
    objects; what is left above that (up to RETIRED_BYTES_CAP) holds the
    outputs set aside between runs (see clean_up)."""
    w1_bytes = w1_count * 530 * KIB if only != "w2" else 0
    w2_total = w2_bytes if only != "w1" else 0
    to_generate = 0
    if only != "w2" and not (workdir / w1_name(w1_count)).is_dir():
        to_generate += w1_bytes
    if only != "w1" and not (workdir / w2_name(w2_bytes)).is_dir():
        to_generate += w2_total
    usage = shutil.disk_usage(workdir)
    need = to_generate + max(w1_bytes, w2_total) + int(usage.total * MINIPACS_FREE_SPACE_RESERVE)
    need = int(need * 1.1)
    print(f"disk: {usage.free / 2**30:.1f} GiB free on {workdir} "
          f"({filesystem_type(workdir)}); need about {need / 2**30:.1f} GiB "
          f"(data + one run's output + minipacs's 5 % reserve)")
    if usage.free < need:
        raise BenchError(f"not enough free disk space: {usage.free / 2**30:.1f} GiB free, "
                         f"need about {need / 2**30:.1f} GiB")
    global RETIRED_BYTES_CAP
    RETIRED_BYTES_CAP = max(0, min(RETIRED_BYTES_CAP, usage.free - need - (2 << 30)))
    print(f"outputs of many files are set aside until the end, up to "
          f"{RETIRED_BYTES_CAP / 2**30:.1f} GiB (see clean_up)")
    if filesystem_type(workdir) == "tmpfs":
        print("WARNING: the work dir is on tmpfs: fsync is free there, durable figures mean nothing")


def w1_name(count: int) -> str:
    return f"w1-ct-{count}"


def w2_name(size: int) -> str:
    return f"w2-ct-{size // MIB}MiB"


def describe_machine(tls: bool) -> None:
    version = subprocess.run([str(MINIPACS), "--version"], capture_output=True, text=True)
    dcmtk = subprocess.run([STORESCP, "--version"], capture_output=True, text=True)
    first = dcmtk.stdout.splitlines()[0] if dcmtk.stdout else "?"
    print(f"minipacs: {version.stdout.strip()} ({MINIPACS})")
    print(f"dcmtk:    {first.strip()}")
    if tls:
        linked = [line.strip("- ").strip() for line in dcmtk.stdout.splitlines()
                  if "OpenSSL" in line]
        openssl_version = subprocess.run([OPENSSL, "version"], capture_output=True, text=True)
        print(f"openssl:  {openssl_version.stdout.strip()}; dcmtk reports "
              f"{linked[0] if linked else '?'}")
        print(f"cpu:      crypto-related flags: {cpu_crypto_flags()}")
    print(f"machine:  {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"python {sys.version.split()[0]}")


def cpu_crypto_flags() -> str:
    """Which of the CPU features that AES-GCM and ChaCha20 lean on are there."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    wanted = ("aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq", "sha_ni")
    return " ".join(f for f in wanted if f in flags) or "none of aes/pclmulqdq/avx2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None,
                   help="runs per receiver, best of N (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N=1, W1 with 40 objects, W2 of 64 MiB")
    p.add_argument("--only", choices=("w1", "w2"), help="run one workload only")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true",
                     help="after the plain measurements, measure DICOM over TLS too")
    tls.add_argument("--only-tls", action="store_true",
                     help="measure DICOM over TLS only")
    p.add_argument("--baseline", type=Path, metavar="BIN",
                   help="also measure this other minipacs binary (durable and --no-fsync), "
                        "interleaved with the others, e.g. a build of an earlier commit, "
                        "so that before/after ratios come from one run")
    p.add_argument("--workdir", type=Path,
                   help="where data, outputs and logs go; kept and reused "
                        "(default: a fresh temp dir under /tmp, removed at the end)")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        p.error("--runs must be at least 1")
    plain = PLAIN
    if args.baseline is not None:
        if not args.baseline.exists():
            p.error(f"--baseline {args.baseline}: no such file")
        serve = (str(args.baseline.resolve()), *MINIPACS_SERVE[1:])
        extra = (Receiver("baseline durable", serve, dcmtk=False, stores=True),
                 Receiver("baseline --no-fsync", serve + ("--no-fsync",), dcmtk=False,
                          stores=True))
        plain = dataclasses.replace(
            PLAIN, receivers=(*PLAIN.receivers[:2], *extra, *PLAIN.receivers[2:]),
            baseline_rows=tuple(r.name for r in extra))
    args.plain = plain
    args.suites = (TLS,) if args.only_tls else (plain, TLS) if args.tls else (plain,)
    return args


def measure_suite(bench: Bench, suite: Suite, workloads: list[Workload],
                  runs: int) -> dict[tuple[str, str], dict[str, Row]]:
    """Every workload with every sender of the suite; keyed by (workload
    key, sender name)."""
    results = {}
    for workload in workloads:
        for sender in suite.senders:
            tag = "" if suite.name == PLAIN.name else f" over {suite.name}"
            print(f"\nmeasuring {workload.title}{tag}, sender {sender.name}, {runs} round(s)",
                  flush=True)
            results[(workload.key, sender.name)] = measure(bench, workload, sender, runs, suite)
    return results


def run(args: argparse.Namespace, workdir: Path, children: Children) -> int:
    w1_count = 40 if args.quick else 400
    w2_bytes = (64 if args.quick else 512) * MIB
    with_tls = TLS in args.suites
    ensure_binary()
    check_tools(with_tls)
    describe_machine(with_tls)
    check_disk(workdir, w1_count, w2_bytes, args.only)

    print("data:")
    workloads = []
    if args.only != "w2":
        folder = prepare(workdir, "W1", w1_name(w1_count),
                         lambda d: make_w1(d, w1_count), 512 * 512 * 2)
        workloads.append(workload_from(
            "w1", f"W1: {w1_count} CT objects of ~512 KiB", folder))
    if args.only != "w1":
        folder = prepare(workdir, "W2", w2_name(w2_bytes),
                         lambda d: make_w2(d, w2_bytes), w2_bytes)
        workloads.append(workload_from(
            "w2", f"W2: one {w2_bytes // MIB} MiB CT object", folder))

    tls_files = prepare_certificates(workdir) if with_tls else None

    bench = Bench(workdir, children, Ports(), tls_files)
    if with_tls:
        sample = min((f for w in workloads for f in w.files), key=lambda f: f.stat().st_size)
        print(f"\nTLS probe: one object from each TLS sender to {TLS_DCMTK.name} -d", flush=True)
        bench.probe_storescp_tls(sample)
    results: dict[str, dict[tuple[str, str], dict[str, Row]]] = {}
    for suite in args.suites:
        results[suite.name] = measure_suite(bench, suite, workloads, args.runs)

    print("\n" + "=" * 78)
    for suite in args.suites:
        for workload in workloads:
            for sender in suite.senders:
                print_table(workload, sender, results[suite.name][(workload.key, sender.name)],
                            args.runs, suite)
    if args.plain in args.suites:
        print_checks(results[PLAIN.name])
    if with_tls:
        print_tls_checks(results[TLS.name])
        print_negotiated(bench.negotiated)

    if bench.errors:
        print(f"\n!!! {len(bench.errors)} run(s) FAILED:")
        for message in bench.errors:
            print(f"!!!   {message}")
        return 1
    return 0


def main() -> int:
    args = parse_args()
    # SIGTERM ends the script through the same finally as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="minipacs-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if own_workdir:
        # mkdtemp makes it 0700; started as root, minipacs serve hands the
        # output folder to an unprivileged worker, which must get through.
        workdir.chmod(0o755)
    print(f"work dir: {workdir}")
    children = Children(STOP_TIMEOUT_S)
    try:
        return run(args, workdir, children)
    except BenchError as e:
        print(f"\n!!! ERROR: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        shutil.rmtree(workdir / "runs", ignore_errors=True)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
