#!/usr/bin/env python3
"""Query/retrieve benchmark: minipacs serve against Orthanc and dcmqrscp.

This is a script that prints tables, not a timed test. Run it from anywhere:

    python3 tests/bench/qr.py                        # the full sizes (long)
    python3 tests/bench/qr.py --patients 100 --orthanc-patients 20 \\
        --dcmqrscp-patients 20 --workdir /tmp/qrbench    # a shorter run
    MINIPACS_BIN=/path/to/minipacs python3 tests/bench/qr.py ...

Data set (generated once with pydicom into <work dir>/data, reused when the
work dir is given again; a larger --patients adds the missing patients):
  * P patients (--patients, default 1,000) x 10 studies x 2 series x 5
    instances: CT Image Storage, Explicit VR Little Endian, 8x8 16-bit
    pixels (about 1 KiB a file), one folder per patient. Patient k is named
    PAT<k:05>^BENCH with ID PAT<k:05>; study s of patient k is dated
    2000-01-01 + (10k + s) days. UIDs are 2.25.<uuid5 of the object's name>,
    the same on every generation.
  * One more study of 400 instances in one series (patient BIG^STUDY, dated
    1990-01-01), each with 64 KiB of pixels (128x256 16-bit), for C-MOVE and
    C-GET. It is loaded into every peer and is outside every query below.

Peers (all started by this script, each with its own ports and folders under
the work dir, all running at once; the measurements are interleaved between
them, in rounds, so that a noisy spell on the shared machine hits each peer
alike):
  * minipacs serve (durable, its defaults) with a [[peer]] for the C-MOVE
    destination; loaded with all P patients. When a subset below is smaller
    than P, one more minipacs is loaded with exactly that subset, so that
    every ratio compares servers holding the same objects ("minipacs@N").
  * Orthanc (/usr/sbin/Orthanc, its SQLite index, no plugins), loaded with
    the first --orthanc-patients patients (default: all P), the destination
    in DicomModalities.
  * dcmtk dcmqrscp in its default mode (a child process per association;
    -s, single process, crashes with SIGSEGV after the first association in
    dcmtk 3.6.7), its own dcmqrscp.cfg and storage area, loaded
    with the first --dcmqrscp-patients patients (default: all P), the
    destination in its HostTable. Its index holds at most 500 studies (past
    that it deletes the oldest study), and its index.dat no more than 32
    MiB (about 4,170 objects; past that its C-FINDs hang), so it takes at
    most 37 patients (+ the big study): the default for --dcmqrscp-patients,
    whatever --patients.

Measurements
  * Take-in: dcmtk storescu +sd +r of the patients' folders (one
    association; TCP_NODELAY=1), then separately of the 400-object study.
    Wall time of storescu, objects/s; the server's CPU (utime+stime of the
    server and its live descendants from /proc/PID/stat, plus the children
    it has reaped, as a delta over the run) and its peak RSS during the run.
  * C-FIND, on ONE association per peer and per SCU (so process start-up is
    not measured), three untimed warm-up runs per query, then --runs rounds
    (default 50); each round asks every peer (in a rotating order) a C-ECHO
    and every query; all rounds with one SCU, then all with the other:
      - pynetdicom, as a viewer written in Python would (with TCP_NODELAY
        set on its socket: without it Nagle holds the identifier PDU of each
        C-FIND-RQ until the server's delayed ACK, ~40 ms, for every server);
        pynetdicom decodes each answer in Python, about 1.5 ms a match here,
        which bounds every ratio of its figures;
      - a raw SCU (tests/dul.py's PDU helpers, identifiers encoded once,
        answers counted, never decoded): close to the server's own latency.
        It runs in a child process: in this one, pynetdicom's socket threads
        and the RSS samplers would make it wait for Python's GIL on every
        response it reads.
    Latency is from the request being handed over to the final response
    being back; p50 and p99 by nearest rank. The C-ECHO rows are each SCU's
    floor (its own cost and the loopback round trip). The queries and their
    expected counts (every match lies within the first 20 patients, so all
    peers holding at least 20 patients must agree, and do not agree by
    accident of their size):
      Q1 Patient Root PATIENT, PatientName=PAT0001*              10
      Q2 Study Root STUDY, StudyDate range (studies 100..129)   30
      Q3 Study Root STUDY, PatientID=PAT00007                   10
      Q4 Study Root SERIES, the series of one study               2
      Q5 Study Root IMAGE, the instances of one series            5
  * C-MOVE: dcmtk movescu of the 400-object study (Study Root, STUDY
    level) to DEST, a dcmtk storescp --ignore (receives every object, stores
    nothing, default max PDU 16 KiB, the same process for every peer); C-GET:
    dcmtk getscu --ignore of the same study. Both with TCP_NODELAY=1, timed
    as the process from start to exit (its start-up, ~30 ms, included; not
    pynetdicom, whose decoding of each pending response, ~0.5 ms, would be
    all it measured). --retrieve-runs runs each (default 3), interleaved;
    best of N (noise only adds time); objects/s = 400 / best time; server
    CPU per run is the mean. movescu must get a final Success (0000: every
    sub-operation completed) and getscu must see 400 C-STORE requests.
  * Large C-FIND: a universal Study Root STUDY-level query (every study)
    with the raw SCU, 3 runs per peer. Its result count is 10 x patients +
    1, so 10,001 for minipacs at the default 1,000 patients: the issue's
    "10,000-result C-FIND with the 100,000-instance index". Peak RSS during
    it is measured on its own.
  * Peak RSS per phase (start-up, take-in, C-FIND, retrieve, large C-FIND):
    VmHWM from /proc/PID/status, reset at the start of each phase by writing
    5 to /proc/PID/clear_refs (needs root for another user's process), read
    at its end and sampled every 20 ms meanwhile, so that a process that
    ends within the phase (dcmqrscp's child per association) still counts
    with its last reading. A server of several processes (minipacs started
    as root: a keeper and an unprivileged worker; dcmqrscp: the listener and
    the child per association) shows the sum over its processes with the
    largest single one in parentheses; pages they share count once per
    process in the sum.

Caveats
  * The servers differ in what they promise: minipacs fsyncs each object
    before answering it; Orthanc commits its SQLite index per object;
    dcmqrscp rewrites its index.dat per object and fsyncs nothing.
  * Orthanc and dcmqrscp hold fewer objects than the full-size minipacs when
    subsets are given; every ratio uses the minipacs holding the same
    subset (minipacs@N), the full-size one is shown for its own figures.
  * dcmqrscp's index.dat is searched linearly (for a C-STORE too), so its
    take-in slows down as it fills; its C-FIND time grows with its size.

The exit status is 0 unless something broke (a peer failed to start, a load
or retrieve failed, a count was wrong).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from procs import (BenchError, Children, cpu_seconds, dcmtk_env, proc_kib, process_tree, tail,
                   wait_listening)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # dul.py: the raw PDU helpers of the tests
MINIPACS = Path(os.environ.get("MINIPACS_BIN", REPO / "target" / "release" / "minipacs"))
# Absolute paths on purpose: pynetdicom installs shims with the same names
# earlier on PATH.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
GETSCU = "/usr/bin/getscu"
MOVESCU = "/usr/bin/movescu"
DCMQRSCP = "/usr/bin/dcmqrscp"
ORTHANC = "/usr/sbin/Orthanc"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SCU_AE = "BENCHSCU"
DEST_AE = "DEST"
STUDIES_PER_PATIENT = 10
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 5
PER_PATIENT = STUDIES_PER_PATIENT * SERIES_PER_STUDY * INSTANCES_PER_SERIES
BIG_COUNT = 400
BIG_ROWS, BIG_COLUMNS = 128, 256  # 64 KiB of 16-bit pixels
SMALL_ROWS = SMALL_COLUMNS = 8
MIN_PATIENTS = 20  # every query's matches lie within the first 20 patients
# dcmqrscp's index holds at most 500 studies (DB_UpperMaxStudies): past it
# it deletes the oldest study to take a new one, so its subset must fit.
DCMQRSCP_MAX_STUDIES = 500
# Its index.dat cannot grow past 32 MiB ("DB ALERT: attempt to seek beyond
# 33554432 bytes", and a C-FIND then hangs), at 8,042 bytes an object
# (dcmtk 3.6.7, measured): about 4,170 objects, the big study's 400 included.
DCMQRSCP_INDEX_BYTES = 32 << 20
DCMQRSCP_RECORD_BYTES = 8042
DCMQRSCP_MAX_PATIENTS = min(
    (DCMQRSCP_MAX_STUDIES - 1) // STUDIES_PER_PATIENT,  # + the big study
    (DCMQRSCP_INDEX_BYTES // DCMQRSCP_RECORD_BYTES - 400 - 50) // 100)  # 50 spare
BASE_DATE = datetime.date(2000, 1, 1)
KIB = 1024
MIB = 1024 * 1024
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
LOAD_TIMEOUT_S = 6 * 3600
SAMPLE_S = 0.02


# --------------------------------------------------------------------------
# Child processes, ports, /proc
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_kib(pid: int) -> int:
    """The process's private pages (Private_Clean + Private_Dirty), KiB."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        pass
    return total


def shared_once_mib(pids: list[int]) -> float:
    """Peak RSS of a server of several processes with the pages they
    share counted once: the largest process's VmHWM plus the private pages
    of the others, now. minipacs's keeper and worker are one binary: the
    keeper's RSS is mostly the binary's and libc's pages, the same pages
    the worker maps, and its private memory is under 1 MiB."""
    if not pids:
        return 0.0
    hwm = {pid: proc_kib(f"/proc/{pid}/status", "VmHWM") for pid in pids}
    largest = max(hwm, key=lambda pid: hwm[pid])
    return (hwm[largest] + sum(private_kib(pid) for pid in pids if pid != largest)) / KIB


def reset_peak_rss(pids: list[int]) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+),
    so the next reading is the peak of what happened since."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError as e:
            raise BenchError(f"cannot reset the peak RSS of {pid}: {e}") from e


@dataclass
class Rss:
    """Peak RSS of a server's processes: the sum, and the largest one."""

    total_mib: float = 0.0
    largest_mib: float = 0.0
    processes: int = 1

    @staticmethod
    def read(pids: list[int]) -> "Rss":
        values = [proc_kib(f"/proc/{pid}/status", "VmHWM") / KIB for pid in pids]
        return Rss(sum(values), max(values, default=0.0), len(values))

    def __str__(self) -> str:
        if self.processes == 1:
            return f"{self.total_mib:.1f}"
        return f"{self.total_mib:.1f} ({self.largest_mib:.1f})"


# --------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------


def uid_of(name: str) -> str:
    """A UID derived from a name (PS3.5 B.2: 2.25 + a UUID as a decimal),
    the same every time, so reused files and the queries agree."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "minipacs-qrbench/" + name).int)


def patient_id(k: int) -> str:
    return f"PAT{k:05d}"


def study_uid(k: int, s: int) -> str:
    return uid_of(f"study/{k}/{s}")


def series_uid(k: int, s: int, r: int) -> str:
    return uid_of(f"series/{k}/{s}/{r}")


def study_date(k: int, s: int) -> str:
    return (BASE_DATE + datetime.timedelta(days=k * STUDIES_PER_PATIENT + s)).strftime("%Y%m%d")


BIG_STUDY = uid_of("study/big")
BIG_SERIES = uid_of("series/big")


def image_dataset(rows: int, columns: int) -> Dataset:
    """The parts of a CT image every object shares."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_instance(ds: Dataset, name: str, path: Path, number: int) -> None:
    ds.SOPInstanceUID = uid_of(name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.save_as(path, enforce_file_format=True)


def make_patient(folder: Path, k: int) -> None:
    ds = image_dataset(SMALL_ROWS, SMALL_COLUMNS)
    ds.PixelData = bytes((k + j) % 256 for j in range(SMALL_ROWS * SMALL_COLUMNS * 2))
    ds.PatientName = f"{patient_id(k)}^BENCH"
    ds.PatientID = patient_id(k)
    ds.PatientBirthDate = f"19{50 + k % 50:02d}0101"
    ds.PatientSex = "FM"[k % 2]
    for s in range(STUDIES_PER_PATIENT):
        ds.StudyInstanceUID = study_uid(k, s)
        ds.StudyDate = study_date(k, s)
        ds.StudyTime = "120000"
        ds.StudyID = str(s + 1)
        ds.AccessionNumber = f"A{k:05d}{s:02d}"
        ds.StudyDescription = f"BENCH STUDY {s + 1}"
        for r in range(SERIES_PER_STUDY):
            ds.SeriesInstanceUID = series_uid(k, s, r)
            ds.SeriesNumber = r + 1
            for i in range(INSTANCES_PER_SERIES):
                write_instance(ds, f"instance/{k}/{s}/{r}/{i}", folder / f"{s}-{r}-{i}.dcm", i + 1)


def make_big_study(folder: Path) -> None:
    ds = image_dataset(BIG_ROWS, BIG_COLUMNS)
    ds.PixelData = bytes(j % 251 for j in range(BIG_ROWS * BIG_COLUMNS * 2))
    ds.PatientName = "BIG^STUDY"
    ds.PatientID = "BIG00001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = BIG_STUDY
    ds.StudyDate = "19900101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "BIG0001"
    ds.StudyDescription = "BENCH BIG STUDY"
    ds.SeriesInstanceUID = BIG_SERIES
    ds.SeriesNumber = 1
    for i in range(BIG_COUNT):
        write_instance(ds, f"instance/big/{i}", folder / f"big-{i:04d}.dcm", i + 1)


def build_once(final: Path, build) -> bool:
    """Builds a folder into <name>.partial and renames it when done, so an
    interrupted generation is never mistaken for a finished one. False when
    it was already there."""
    if final.is_dir():
        return False
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    partial.rename(final)
    return True


def prepare_data(workdir: Path, patients: int) -> tuple[list[Path], Path]:
    """The patients' folders (in order) and the big study's folder."""
    data = workdir / "data"
    started = time.perf_counter()
    made = 0
    folders = []
    for k in range(patients):
        folder = data / "patients" / patient_id(k)
        made += build_once(folder, lambda d, k=k: make_patient(d, k))
        folders.append(folder)
    big = data / "big"
    made_big = build_once(big, make_big_study)
    print(f"data: {patients} patients in {data / 'patients'} ({made} generated, "
          f"{patients - made} reused), big study {'generated' if made_big else 'reused'}; "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    return folders, big


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class Query:
    key: str
    title: str
    model: str
    keys: tuple[tuple[str, str], ...]  # (keyword, value), the level first
    expected: int | None  # None: depends on the peer's size

    def identifier(self) -> Dataset:
        ds = Dataset()
        for keyword, value in self.keys:
            setattr(ds, keyword, value)
        return ds


def queries() -> list[Query]:
    first, last = 100, 129  # global study numbers: patients 10-12
    date_range = (f"{study_date(first // 10, first % 10)}-"
                  f"{study_date(last // 10, last % 10)}")
    study_keys = (("StudyInstanceUID", ""), ("StudyDate", ""), ("StudyTime", ""),
                  ("AccessionNumber", ""), ("StudyID", ""), ("StudyDescription", ""),
                  ("PatientName", ""), ("PatientID", ""))
    return [
        Query("Q1", "patients PAT0001* (Patient Root PATIENT)", PATIENT_ROOT_FIND,
              (("QueryRetrieveLevel", "PATIENT"), ("PatientName", "PAT0001*"),
               ("PatientID", ""), ("PatientBirthDate", ""), ("PatientSex", "")), 10),
        Query("Q2", f"studies dated {date_range}", STUDY_ROOT_FIND,
              (("QueryRetrieveLevel", "STUDY"),) + tuple(
                  (k, date_range if k == "StudyDate" else v) for k, v in study_keys), 30),
        Query("Q3", "studies of patient PAT00007", STUDY_ROOT_FIND,
              (("QueryRetrieveLevel", "STUDY"),) + tuple(
                  (k, "PAT00007" if k == "PatientID" else v) for k, v in study_keys), 10),
        Query("Q4", "series of one study", STUDY_ROOT_FIND,
              (("QueryRetrieveLevel", "SERIES"), ("StudyInstanceUID", study_uid(7, 3)),
               ("SeriesInstanceUID", ""), ("Modality", ""), ("SeriesNumber", "")), 2),
        Query("Q5", "instances of one series", STUDY_ROOT_FIND,
              (("QueryRetrieveLevel", "IMAGE"), ("StudyInstanceUID", study_uid(7, 3)),
               ("SeriesInstanceUID", series_uid(7, 3, 1)), ("SOPInstanceUID", ""),
               ("InstanceNumber", "")), 5),
    ]


LARGE_QUERY = Query("QL", "every study (universal STUDY level)", STUDY_ROOT_FIND,
                    (("QueryRetrieveLevel", "STUDY"), ("StudyInstanceUID", ""),
                     ("StudyDate", ""), ("PatientName", ""), ("PatientID", ""),
                     ("AccessionNumber", "")), None)


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------


@dataclass
class Phase:
    cpu_s: float = 0.0
    rss: Rss | None = None


@dataclass
class Peer:
    """One server under test: how it runs, what it holds, what was measured."""

    name: str
    kind: str  # "minipacs", "orthanc", "dcmqrscp"
    patients: int
    ae: str
    port: int
    root: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    http: int | None = None
    rss: dict[str, Rss] = field(default_factory=dict)
    load: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # objects, wall, cpu
    find: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, set[int]] = field(default_factory=dict)
    retrieve: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # wall, cpu
    large: list[tuple[float, int]] = field(default_factory=list)
    large_shared_once: float | None = None  # MiB, see shared_once_mib

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is not running (exit {code})\n{tail(self.log)}")

    def begin(self) -> float:
        """Starts a measured phase: resets the peak RSS and starts sampling
        it (a process that ends during the phase, as dcmqrscp's child per
        association does, is then still counted), returns the CPU so far."""
        self.alive()
        pids = self.pids()
        reset_peak_rss(pids)
        self._sampler = Sampler(self)
        return cpu_seconds(pids)

    def end(self, phase: str, cpu_before: float) -> float:
        """Ends a phase: the peak RSS since begin() (kept as the max over
        phases of the same name), returns the CPU it used."""
        self.alive()
        rss = self._sampler.stop()
        old = self.rss.get(phase)
        if old is None or rss.total_mib > old.total_mib:
            self.rss[phase] = rss
        return cpu_seconds(self.pids()) - cpu_before


class Sampler:
    """Reads the peak RSS of a peer's process tree every SAMPLE_S seconds in
    a thread, keeping the largest sum. VmHWM only grows between resets, so a
    process alive at the end is exact; one that ended counts with its last
    reading."""

    def __init__(self, peer: "Peer") -> None:
        self._peer = peer
        self._best = Rss()
        self._best_by_pid: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pids = self._peer.pids()
        for pid in pids:
            # a new child (dcmqrscp forks one per association) starts as a
            # copy of its parent's pages: reset it once when first seen
            if pid not in self._best_by_pid:
                self._best_by_pid[pid] = 0.0
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                except OSError:
                    pass
            value = proc_kib(f"/proc/{pid}/status", "VmHWM") / KIB
            self._best_by_pid[pid] = max(self._best_by_pid[pid], value)
        live = [self._best_by_pid[pid] for pid in pids]
        total = sum(live)
        if total > self._best.total_mib:
            self._best = Rss(total, max(live, default=0.0), len(live))

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self._sample()

    def stop(self) -> Rss:
        self._done.set()
        self._thread.join()
        self._sample()
        return self._best


def start_minipacs(children: Children, root: Path, name: str, patients: int,
                   dest_port: int) -> Peer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "minipacs.toml"
    config.write_text(
        f'log_directory = "{root / "logs"}"\n'
        f'[[peer]]\naetitle = "{DEST_AE}"\nhost = "127.0.0.1"\nport = {dest_port}\n')
    store = root / "store"  # minipacs makes it itself (a root start hands it to its worker)
    log = root / "server.log"
    proc = children.start([MINIPACS, "serve", "--config", config, "--port", port,
                           "--aetitle", "MINIPACS", "--output-directory", store],
                          log, cwd=root)
    wait_listening(proc, [port], name, log, START_TIMEOUT_S)
    return Peer(name, "minipacs", patients, "MINIPACS", port, root, proc, log)


def start_orthanc(children: Children, root: Path, patients: int, dest_port: int) -> Peer:
    root.mkdir(parents=True, exist_ok=True)
    port, http = free_port(), free_port()
    config = {
        "Name": "minipacs-qrbench",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http,
        "DicomPort": port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [],
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {"dest": [DEST_AE, "127.0.0.1", dest_port],
                            "bench": [SCU_AE, "127.0.0.1", 1]},
        "DicomScuTimeout": 60,
        "DicomScpTimeout": 600,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "StorageCompression": False,
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    log = root / "server.log"
    proc = children.start([ORTHANC, path], log, env=dcmtk_env(), cwd=root)
    wait_listening(proc, [port, http], "Orthanc", log, START_TIMEOUT_S)
    return Peer("Orthanc", "orthanc", patients, "ORTHANC", port, root, proc, log, http)


def start_dcmqrscp(children: Children, root: Path, patients: int, dest_port: int) -> Peer:
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    max_studies = DCMQRSCP_MAX_STUDIES
    cfg = root / "dcmqrscp.cfg"
    cfg.write_text(
        f"NetworkTCPPort  = {port}\n"
        "MaxPDUSize      = 16384\n"
        "MaxAssociations = 16\n"
        "HostTable BEGIN\n"
        f"dest  = ({DEST_AE}, 127.0.0.1, {dest_port})\n"
        f"bench = ({SCU_AE}, 127.0.0.1, 1)\n"
        "HostTable END\n"
        "VendorTable BEGIN\n"
        "VendorTable END\n"
        "AETable BEGIN\n"
        f"DCMQRSCP  {storage}  RW  ({max_studies}, 1024mb)  ANY\n"
        "AETable END\n")
    log = root / "server.log"
    # Its default mode, a child process per association: -s (single
    # process) crashes (SIGSEGV) after the first association in 3.6.7.
    proc = children.start([DCMQRSCP, "-c", cfg], log, env=dcmtk_env(), cwd=root)
    wait_listening(proc, [port], "dcmqrscp", log, START_TIMEOUT_S)
    return Peer("dcmqrscp", "dcmqrscp", patients, "DCMQRSCP", port, root, proc, log)


# --------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------


def timed(argv: list, log: Path, env: dict[str, str], children: Children,
          timeout: float) -> tuple[float, int | None]:
    """Runs a client to its end; its wall time and exit code (None: killed
    by the watchdog). proc.wait() blocks in waitpid, so the time is not
    rounded to a polling step."""
    started = time.perf_counter()
    proc = children.start(argv, log, env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - started
    children.stop(proc)
    return wall, (None if code == -signal.SIGKILL else code)


def load(peer: Peer, phase: str, folders: list[Path], count: int, children: Children,
         logs: Path) -> None:
    """storescu +sd +r of the folders into the peer: one association."""
    log = logs / f"load-{peer.name}-{phase}.log"
    cpu = peer.begin()
    wall, code = timed([STORESCU, "-aet", SCU_AE, "-aec", peer.ae, "+sd", "+r", "-nh",
                        "127.0.0.1", peer.port, *folders], log, dcmtk_env(), children,
                       LOAD_TIMEOUT_S)
    used = peer.end("take-in", cpu)
    if code != 0:
        raise BenchError(f"storescu into {peer.name} ({phase}) exited {code}\n{tail(log)}")
    peer.load[phase] = (count, wall, used)
    print(f"  {peer.name}: {phase}: {count} objects in {wall:.1f}s "
          f"({count / wall:.0f} objects/s, server CPU {used:.1f}s)", flush=True)


def check_loaded(peer: Peer, expected_studies: int) -> None:
    """Counts the studies the peer holds with one C-FIND, so a load that
    silently lost objects is caught before anything is timed."""
    raw = RawFind(peer)
    try:
        count = raw.find(LARGE_QUERY)[1]
    finally:
        raw.release()
    if count != expected_studies:
        raise BenchError(f"{peer.name} holds {count} studies, expected {expected_studies}")


def run_find(assoc, query: Query) -> tuple[float, int]:
    """One C-FIND on the open association: (seconds, matches)."""
    identifier = query.identifier()
    matches = 0
    started = time.perf_counter()
    final = None
    for status, answer in assoc.send_c_find(identifier, query.model):
        if not status:
            raise BenchError(f"C-FIND {query.key}: no response (association lost?)")
        if status.Status in (0xFF00, 0xFF01):
            matches += 1
        else:
            final = status.Status
    elapsed = time.perf_counter() - started
    if final != 0x0000:
        raise BenchError(f"C-FIND {query.key}: final status {final:#06x}"
                         if final is not None else f"C-FIND {query.key}: no final status")
    return elapsed, matches


def run_echo(assoc) -> float:
    started = time.perf_counter()
    status = assoc.send_c_echo()
    elapsed = time.perf_counter() - started
    if not status or status.Status != 0:
        raise BenchError("C-ECHO failed")
    return elapsed


class RawFind:
    """A lean C-FIND SCU on a raw socket (tests/dul.py's PDU helpers): the
    identifiers are encoded once up front and the responses are only
    counted, never decoded, so its latency is close to the server's own. It
    is measured beside pynetdicom because pynetdicom decodes each response
    in Python (about 1.5 ms a match here), which would hide the servers'
    differences."""

    CONTEXTS = ((1, VERIFICATION), (3, PATIENT_ROOT_FIND), (5, STUDY_ROOT_FIND))

    def __init__(self, peer: "Peer") -> None:
        import dul

        self._dul = dul
        self._conn = dul.Connection(peer.port, timeout=120)
        pdu_type, body = self._conn.associate(
            called=peer.ae, calling=SCU_AE, max_pdu=262144,
            contexts=[(i, model, [dul.IMPLICIT_LE]) for i, model in self.CONTEXTS])
        if pdu_type != 0x02 or self._accepted(body) != {i for i, _ in self.CONTEXTS}:
            raise BenchError(f"{peer.name}: raw association not accepted as asked "
                             f"(PDU {pdu_type}, contexts {sorted(self._accepted(body))})")
        self._message_id = 0
        self._identifiers: dict[str, bytes] = {}

    @staticmethod
    def _accepted(body: bytes) -> set[int]:
        """The presentation context IDs an A-ASSOCIATE-AC accepted."""
        accepted, at = set(), 68
        while at + 4 <= len(body):
            item_type, length = body[at], int.from_bytes(body[at + 2:at + 4], "big")
            if item_type == 0x21 and body[at + 6] == 0:
                accepted.add(body[at + 4])
            at += 4 + length
        return accepted

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def find(self, query: Query) -> tuple[float, int]:
        from pynetdicom.dsutils import encode

        dul = self._dul
        if query.key not in self._identifiers:
            self._identifiers[query.key] = encode(query.identifier(), True, True)
        pc_id = 3 if query.model == PATIENT_ROOT_FIND else 5
        message = (dul.pdata(pc_id, True, True, dul.c_find_rq(self._next_id(), query.model)) +
                   dul.pdata(pc_id, False, True, self._identifiers[query.key]))
        started = time.perf_counter()
        self._conn.send(message)
        status, matches = self._conn.read_find_answer()
        elapsed = time.perf_counter() - started
        if status != 0:
            raise BenchError(f"C-FIND {query.key}: final status {status:#06x}")
        return elapsed, matches

    def echo(self) -> float:
        started = time.perf_counter()
        status = self._conn.echo(1)
        elapsed = time.perf_counter() - started
        if status != 0:
            raise BenchError(f"raw C-ECHO: status {status:#06x}")
        return elapsed

    def release(self) -> None:
        self._conn.release()


def nodelay(assoc) -> None:
    """pynetdicom writes a C-FIND-RQ's command and identifier as two PDUs
    without TCP_NODELAY: Nagle then holds the second until the server's
    delayed ACK (about 40 ms on Linux), which would be most of every
    latency measured, for every server alike."""
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def measure_find(peers: list[Peer], runs: int, qs: list[Query]) -> None:
    """C-FIND latency, in two passes of `runs` rounds each; each round asks
    every peer (in a rotating order) a C-ECHO and every query, on one open
    association per peer: first with pynetdicom, then with the raw SCU.

    The raw SCU runs in a child process of its own. In this one, each
    pynetdicom association keeps a thread that polls its socket about
    every millisecond, and each peer's RSS sampler wakes every 20 ms: all
    of them take Python's GIL, and a raw SCU sharing it was measured
    waiting for it on every response it read (Q3, ten answers: 7 ms here
    against 0.7 ms alone, the same server)."""
    cpu = {peer.name: peer.begin() for peer in peers}
    measure_find_pynetdicom(peers, runs, qs)
    measure_find_raw(peers, runs, qs)
    for peer in peers:
        peer.end("C-FIND", cpu[peer.name])


def measure_find_pynetdicom(peers: list[Peer], runs: int, qs: list[Query]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=SCU_AE)
    for model in (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND):
        ae.add_requested_context(model)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 120
    associations = {}
    try:
        for peer in peers:
            assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae)
            if not assoc.is_established:
                raise BenchError(f"{peer.name}: C-FIND association refused")
            nodelay(assoc)
            associations[peer.name] = assoc
            for q in qs:
                for _ in range(3):
                    run_find(assoc, q)
            for _ in range(3):
                run_echo(assoc)
        for r in range(runs):
            turn = r % len(peers)
            for peer in peers[turn:] + peers[:turn]:
                assoc = associations[peer.name]
                try:
                    peer.find.setdefault("echo", []).append(run_echo(assoc))
                except BenchError as e:
                    raise BenchError(f"{peer.name}: {e}\n{tail(peer.log)}") from None
                for q in qs:
                    elapsed, matches = run_find(assoc, q)
                    peer.find.setdefault(q.key, []).append(elapsed)
                    peer.counts.setdefault(q.key, set()).add(matches)
    finally:
        for assoc in associations.values():
            if assoc.is_established:
                assoc.release()


def raw_find_rounds(targets: list[tuple[str, str, int]], runs: int, qs: list[Query],
                    conn) -> None:
    """The raw SCU's rounds, in a child process: sends back
    ("ok", {peer: {key: [seconds]}}, {peer: {key: [matches]}}) or
    ("error", message, None)."""
    raws: dict[str, RawFind] = {}
    try:
        times: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in targets}
        counts: dict[str, dict[str, list[int]]] = {name: {} for name, _, _ in targets}
        for name, ae, port in targets:
            raws[name] = RawFind(Peer(name, "", 0, ae, port, Path(".")))
            for q in qs:
                for _ in range(3):
                    raws[name].find(q)
            for _ in range(3):
                raws[name].echo()
        for r in range(runs):
            turn = r % len(targets)
            for name, _, _ in targets[turn:] + targets[:turn]:
                raw = raws[name]
                times[name].setdefault("raw echo", []).append(raw.echo())
                for q in qs:
                    elapsed, matches = raw.find(q)
                    times[name].setdefault("raw " + q.key, []).append(elapsed)
                    counts[name].setdefault("raw " + q.key, []).append(matches)
        conn.send(("ok", times, counts))
    except BaseException as e:  # reported to the parent, which raises
        conn.send(("error", f"{type(e).__name__}: {e}", None))
    finally:
        for raw in raws.values():
            try:
                raw.release()
            except OSError:
                pass
        conn.close()


def measure_find_raw(peers: list[Peer], runs: int, qs: list[Query]) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    targets = [(peer.name, peer.ae, peer.port) for peer in peers]
    child = ctx.Process(target=raw_find_rounds, args=(targets, runs, qs, theirs), daemon=True)
    child.start()
    theirs.close()
    try:
        if not ours.poll(3600):
            raise BenchError("raw C-FIND rounds: no result within an hour")
        outcome, times, counts = ours.recv()
    except EOFError:
        raise BenchError(f"raw C-FIND rounds: the child process died "
                         f"(exit {child.exitcode})") from None
    finally:
        child.join(10)
    if outcome != "ok":
        raise BenchError(f"raw C-FIND rounds: {times}")
    for peer in peers:
        for key, values in times[peer.name].items():
            peer.find.setdefault(key, []).extend(values)
        for key, values in counts[peer.name].items():
            peer.counts.setdefault(key, set()).update(values)


def measure_retrieve(peers: list[Peer], runs: int, children: Children, logs: Path) -> list[str]:
    """C-MOVE (dcmtk movescu, to DEST) and C-GET (getscu --ignore) of the big
    study, interleaved; returns the problems seen.

    Both requesters are dcmtk's, timed as processes (their start-up, about
    30 ms, included). pynetdicom as the C-MOVE requester decodes every
    pending response in Python, about 0.5 ms each here: it then took
    0.22-0.24 s for 400 objects whichever server sent them, its own
    speed, where movescu takes 0.09 s from minipacs."""
    problems = []
    retrieve_keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={BIG_STUDY}"]
    for r in range(runs):
        turn = r % len(peers)
        for peer in peers[turn:] + peers[:turn]:
            # C-MOVE
            log = logs / f"move-{peer.name}-{r}.log"
            log.unlink(missing_ok=True)
            cpu = peer.begin()
            wall, exit_code = timed([MOVESCU, "-v", "-S", "-aet", SCU_AE, "-aec", peer.ae,
                                     "-aem", DEST_AE, *retrieve_keys, "127.0.0.1", peer.port],
                                    log, dcmtk_env(), children, 600)
            used = peer.end("retrieve", cpu)
            text = log.read_text(errors="replace")
            # 0000 is only sent when every sub-operation completed
            if exit_code != 0 or "Received Final Move Response (Success)" not in text:
                problems.append(f"{peer.name}: movescu exit {exit_code}, no final Success "
                                f"response, see {log}")
            else:
                peer.retrieve.setdefault("C-MOVE", []).append((wall, used))
            # C-GET
            log = logs / f"get-{peer.name}-{r}.log"
            log.unlink(missing_ok=True)
            cpu = peer.begin()
            wall, exit_code = timed([GETSCU, "-v", "-S", "--ignore", "-aet", SCU_AE,
                                     "-aec", peer.ae, *retrieve_keys, "127.0.0.1",
                                     peer.port], log, dcmtk_env(), children, 600)
            used = peer.end("retrieve", cpu)
            received = log.read_text(errors="replace").count("Received C-STORE Request")
            if exit_code != 0 or received != BIG_COUNT:
                problems.append(f"{peer.name}: getscu exit {exit_code}, {received} C-STORE "
                                f"requests received (expected {BIG_COUNT}), see {log}")
            else:
                peer.retrieve.setdefault("C-GET", []).append((wall, used))
    return problems


def measure_large(peer: Peer, runs: int) -> None:
    """The universal STUDY-level query with the raw SCU (pynetdicom would
    spend some 15 s decoding 10,000 answers), peak RSS on its own."""
    raw = RawFind(peer)
    try:
        for _ in range(runs):
            cpu = peer.begin()
            peer.large.append(raw.find(LARGE_QUERY))
            once = shared_once_mib(peer.pids())
            peer.end("large C-FIND", cpu)
            peer.large_shared_once = max(peer.large_shared_once or 0.0, once)
    finally:
        raw.release()


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


def twin(peers: list[Peer], other: Peer) -> Peer | None:
    """The minipacs that holds the same patients as the other peer."""
    return next((p for p in peers if p.kind == "minipacs" and p.patients == other.patients), None)


def print_tables(peers: list[Peer], qs: list[Query], runs: int, retrieve_runs: int) -> list[str]:
    problems = []
    others = [p for p in peers if p.kind != "minipacs"]

    rows = []
    for p in peers:
        for phase, (count, wall, cpu) in p.load.items():
            rows.append([p.name, phase, str(count), f"{wall:.1f}", f"{count / wall:.0f}",
                         f"{cpu:.1f}", f"{cpu / count * 1000:.2f}"])
    table("Take-in: dcmtk storescu +sd +r, one association (server CPU = utime+stime delta)",
          ["server", "objects", "n", "wall s", "objects/s", "CPU s", "CPU ms/object"], rows)
    rows = []
    for other in others:
        mine = twin(peers, other)
        if mine is None:
            continue
        for phase in other.load:
            if phase not in mine.load:
                continue
            (n, w, c), (n2, w2, c2) = mine.load[phase], other.load[phase]
            rows.append([f"{mine.name} / {other.name}", phase,
                         ratio(n / w, n2 / w2), ratio(c / n, c2 / n2)])
    if rows:
        table("Take-in ratios (same objects)", ["pair", "objects", "objects/s", "CPU/object"],
              rows)

    # C-FIND
    header = ["server", "patients"] + [f"{q.key} n" for q in qs]
    rows = []
    pynetdicom_lost: list[str] = []
    for p in peers:
        row = [p.name, str(p.patients)]
        for q in qs:
            pynetdicom = p.counts.get(q.key, set())
            raw = p.counts.get("raw " + q.key, set())
            cells = ["/".join(str(c) for c in sorted(seen)) or "-" for seen in (pynetdicom, raw)]
            row.append(cells[0] if cells[0] == cells[1] else " | ".join(cells))
            if q.expected is None:
                continue
            if raw != {q.expected}:
                problems.append(f"{p.name}: {q.key} returned {sorted(raw)} to the raw SCU, "
                                f"expected {q.expected}")
            elif pynetdicom != {q.expected}:
                # The raw SCU read every answer from the same server in
                # the same run: the one pynetdicom lacks was sent.
                pynetdicom_lost.append(f"{p.name} {q.key}: {sorted(pynetdicom)}")
        rows.append(row)
    table("C-FIND result counts (expected: " +
          ", ".join(f"{q.key}={q.expected}" for q in qs) +
          "; pynetdicom | raw SCU where they differ)", header, rows)
    print("  " + "\n  ".join(f"{q.key}: {q.title}" for q in qs))
    if pynetdicom_lost:
        print("  pynetdicom got one answer too few in some runs, where the raw SCU got them "
              "all from the same server:\n    " + "\n    ".join(pynetdicom_lost) +
              "\n  pynetdicom 3.0.4 was seen losing one pending C-FIND response in about "
              "500 when answers come back to back while other Python threads run "
              "(docs/benchmark.md); not counted as a problem of the server.")

    for q in ["echo"] + [q.key for q in qs]:
        rows = []
        for p in peers:
            v, raw = p.find.get(q, []), p.find.get("raw " + q, [])
            if not v or not raw:
                continue
            rows.append([p.name, str(p.patients), str(len(v)), ms(percentile(v, 50)),
                         ms(percentile(v, 99)), ms(percentile(raw, 50)),
                         ms(percentile(raw, 99))])
        title = ("C-ECHO on the same associations (each SCU's floor), ms" if q == "echo" else
                 f"C-FIND {q}: {next(x.title for x in qs if x.key == q)}, ms")
        table(title, ["server", "patients", "runs", "pynetdicom p50", "p99", "raw SCU p50",
                      "p99"], rows)
    rows = []
    for other in others:
        mine = twin(peers, other)
        if mine is None:
            continue
        for q in qs:
            rows.append([f"{mine.name} / {other.name}", q.key,
                         ratio(percentile(mine.find[q.key], 50),
                               percentile(other.find[q.key], 50)),
                         ratio(percentile(mine.find["raw " + q.key], 50),
                               percentile(other.find["raw " + q.key], 50))])
    if rows:
        table("C-FIND p50 ratios (same objects; floor: <= 0.20x Orthanc)",
              ["pair", "query", "pynetdicom", "raw SCU"], rows)

    # Retrieve
    rows = []
    best: dict[tuple[str, str], float] = {}
    for p in peers:
        for op in ("C-MOVE", "C-GET"):
            v = p.retrieve.get(op, [])
            if not v:
                rows.append([p.name, op, "0", "-", "-", "-"])
                continue
            wall = min(w for w, _ in v)
            best[(p.name, op)] = BIG_COUNT / wall
            rows.append([p.name, op, str(len(v)), f"{wall:.3f}", f"{BIG_COUNT / wall:.0f}",
                         f"{sum(c for _, c in v) / len(v):.2f}"])
    table(f"Retrieve of the {BIG_COUNT}-object study ({BIG_COUNT} x 64 KiB; best of "
          f"{retrieve_runs}; C-MOVE to storescp --ignore, C-GET by getscu --ignore)",
          ["server", "op", "runs", "best s", "objects/s", "server CPU s/run"], rows)
    rows = []
    for p in (p for p in peers if p.kind == "minipacs"):
        for op in ("C-MOVE", "C-GET"):
            theirs = [best.get((o.name, op)) for o in others]
            theirs = [t for t in theirs if t is not None]
            fastest = max(theirs, default=None)
            row = [p.name, op]
            for o in others:
                row.append(ratio(best.get((p.name, op)), best.get((o.name, op))))
            row.append(ratio(best.get((p.name, op)), fastest))
            rows.append(row)
    if rows:
        table("Retrieve throughput ratios (floor: >= 1.20x the faster peer)",
              ["server", "op"] + [f"/ {o.name}" for o in others] + ["/ faster"], rows)

    # Large C-FIND
    rows = []
    for p in peers:
        if p.large:
            times = [t for t, _ in p.large]
            counts = sorted({n for _, n in p.large})
            once = p.large_shared_once
            rows.append([p.name, str(p.patients), "/".join(map(str, counts)), str(len(times)),
                         f"{min(times):.3f}", str(p.rss.get("large C-FIND", "-")),
                         f"{once:.1f}" if once is not None and len(p.pids()) > 1 else "-"])
            expected = p.patients * STUDIES_PER_PATIENT + 1
            if counts != [expected]:
                problems.append(f"{p.name}: large C-FIND returned {counts}, expected {expected}")
    if rows:
        table("Large C-FIND: every study, universal STUDY level, raw SCU "
              "(peak RSS during it, MiB; shared once: several processes' shared pages "
              "counted once)",
              ["server", "patients", "results", "runs", "best s", "peak RSS", "shared once"],
              rows)

    # RSS
    phases = ["start-up", "take-in", "C-FIND", "retrieve", "large C-FIND"]
    rows = []
    for p in peers:
        values = [p.rss.get(ph) for ph in phases]
        peak = max((v for v in values if v is not None), key=lambda v: v.total_mib, default=None)
        rows.append([p.name, str(p.patients)] + [str(v) if v else "-" for v in values] +
                    [str(peak) if peak else "-"])
    table("Peak RSS per phase, MiB (VmHWM; several processes: sum (largest))",
          ["server", "patients"] + phases + ["peak"], rows)
    rows = []
    for other in others:
        mine = twin(peers, other)
        if mine is None:
            continue
        a = max(v.total_mib for v in mine.rss.values())
        b = max(v.total_mib for v in other.rss.values())
        rows.append([f"{mine.name} / {other.name}", ratio(a, b)])
    if rows:
        table("Peak RSS ratios (same objects)", ["pair", "peak RSS"], rows)
    return problems


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def check_tools() -> None:
    for tool in (STORESCU, STORESCP, GETSCU, MOVESCU, DCMQRSCP, ORTHANC, MINIPACS):
        if not Path(tool).exists():
            raise BenchError(f"{tool} not found (MINIPACS_BIN selects the minipacs binary)")
    if os.geteuid() != 0:
        print("note: not root: resetting another user's peak RSS (clear_refs) may fail")


def describe(args: argparse.Namespace) -> None:
    version = subprocess.run([str(MINIPACS), "--version"], capture_output=True, text=True)
    dcmtk = subprocess.run([DCMQRSCP, "--version"], capture_output=True, text=True)
    orthanc = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True)
    import pynetdicom
    print(f"minipacs: {version.stdout.strip()} ({MINIPACS})")
    print(f"dcmtk:    {(dcmtk.stdout.splitlines() or ['?'])[0]}")
    print(f"Orthanc:  {(orthanc.stdout.splitlines() or ['?'])[0]}")
    print(f"SCU:      pynetdicom {pynetdicom.__version__}, python {sys.version.split()[0]}")
    print(f"machine:  {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"load {os.getloadavg()[0]:.2f}, nice {os.nice(0)}")
    print(f"sizes:    minipacs {args.patients} patients ({args.patients * PER_PATIENT} instances), "
          f"Orthanc {args.orthanc_patients} ({args.orthanc_patients * PER_PATIENT}), "
          f"dcmqrscp {args.dcmqrscp_patients} ({args.dcmqrscp_patients * PER_PATIENT}); "
          f"each + the {BIG_COUNT}-object study")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=1000,
                   help="patients of 100 instances each for minipacs (default 1000: 100,000)")
    p.add_argument("--orthanc-patients", type=int,
                   help="the first N patients only for Orthanc (default: all)")
    p.add_argument("--dcmqrscp-patients", type=int,
                   help=f"the first N patients only for dcmqrscp (default and most: "
                        f"{DCMQRSCP_MAX_PATIENTS}, as its index holds at most "
                        f"{DCMQRSCP_MAX_STUDIES} studies)")
    p.add_argument("--runs", type=int, default=50, help="C-FIND rounds (default 50)")
    p.add_argument("--retrieve-runs", type=int, default=3,
                   help="C-MOVE and C-GET runs per server (default 3)")
    p.add_argument("--skip", action="append", default=[], choices=("orthanc", "dcmqrscp"),
                   help="leave a peer out")
    p.add_argument("--workdir", type=Path,
                   help="where data, servers and logs go; the data is kept and reused "
                        "(default: a fresh temp dir, removed at the end)")
    args = p.parse_args()
    args.orthanc_patients = args.orthanc_patients or args.patients
    args.dcmqrscp_patients = args.dcmqrscp_patients or min(args.patients, DCMQRSCP_MAX_PATIENTS)
    if args.dcmqrscp_patients > DCMQRSCP_MAX_PATIENTS:
        p.error(f"--dcmqrscp-patients: at most {DCMQRSCP_MAX_PATIENTS} (dcmqrscp's index holds "
                f"at most {DCMQRSCP_MAX_STUDIES} studies, dropping the oldest past it, and "
                f"its index.dat at most 32 MiB, about 4,170 objects)")
    for name in ("patients", "orthanc_patients", "dcmqrscp_patients"):
        value = getattr(args, name)
        if value < MIN_PATIENTS or value > args.patients:
            p.error(f"--{name.replace('_', '-')} must be in {MIN_PATIENTS}..--patients "
                    f"(the queries' matches lie in the first {MIN_PATIENTS} patients)")
    if args.runs < 50:
        print(f"note: --runs {args.runs} is below the 50 the p99 is meant for")
    return args


def run(args: argparse.Namespace, workdir: Path, children: Children) -> int:
    check_tools()
    describe(args)
    folders, big = prepare_data(workdir, args.patients)
    servers = workdir / "servers"
    shutil.rmtree(servers, ignore_errors=True)
    servers.mkdir()
    logs = servers / "logs"
    logs.mkdir()

    dest_log = logs / "dest-storescp.log"
    dest_port = free_port()
    dest = children.start([STORESCP, "--ignore", "+xa", "-aet", DEST_AE, dest_port], dest_log,
                          env=dcmtk_env())
    wait_listening(dest, [dest_port], "storescp --ignore (DEST)", dest_log, START_TIMEOUT_S)

    sizes = [args.patients]
    if "orthanc" not in args.skip:
        sizes.append(args.orthanc_patients)
    if "dcmqrscp" not in args.skip:
        sizes.append(args.dcmqrscp_patients)
    peers: list[Peer] = []
    for n in sorted(set(sizes), reverse=True):
        name = "minipacs" if n == args.patients else f"minipacs@{n}"
        peers.append(start_minipacs(children, servers / name.replace("@", "-"), name, n,
                                    dest_port))
    if "orthanc" not in args.skip:
        peers.append(start_orthanc(children, servers / "orthanc", args.orthanc_patients,
                                   dest_port))
    if "dcmqrscp" not in args.skip:
        peers.append(start_dcmqrscp(children, servers / "dcmqrscp", args.dcmqrscp_patients,
                                    dest_port))
    for p in peers:
        p.rss["start-up"] = Rss.read(p.pids())

    print("\ntake-in", flush=True)
    for p in peers:
        load(p, "patients", folders[:p.patients], p.patients * PER_PATIENT, children, logs)
        load(p, "400-object study", [big], BIG_COUNT, children, logs)
        check_loaded(p, p.patients * STUDIES_PER_PATIENT + 1)

    qs = queries()
    print(f"\nC-FIND: {args.runs} rounds of {len(qs)} queries and a C-ECHO per server",
          flush=True)
    started = time.perf_counter()
    measure_find(peers, args.runs, qs)
    print(f"  done in {time.perf_counter() - started:.1f}s", flush=True)

    print(f"\nC-MOVE and C-GET: {args.retrieve_runs} runs each per server", flush=True)
    problems = measure_retrieve(peers, args.retrieve_runs, children, logs)

    print("\nlarge C-FIND (every study)", flush=True)
    for p in peers:
        measure_large(p, 3)

    for p in peers:
        p.alive()
    print("\n" + "=" * 78)
    problems += print_tables(peers, qs, args.runs, args.retrieve_runs)

    for p in peers:
        code = children.stop(p.proc)
        if p.kind == "minipacs" and code != 0:
            problems.append(f"{p.name} exited {code} on SIGTERM\n{tail(p.log)}")
    children.stop(dest)
    if problems:
        print(f"\n!!! {len(problems)} problem(s):")
        for message in problems:
            print(f"!!!   {message}")
        return 1
    print("\nno problems: every count as expected, every retrieve complete")
    return 0


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="minipacs-qrbench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if own_workdir:
        workdir.chmod(0o755)  # a root start hands the store to a worker that must get in
    print(f"work dir: {workdir}")
    children = Children(STOP_TIMEOUT_S, append=True)
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
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
