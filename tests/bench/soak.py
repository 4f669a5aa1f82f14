#!/usr/bin/env python3
"""Soak: a steady stream into a small store that retention keeps cycling,
forwarding to a destination that goes away and comes back. A script that
prints figures, not a timed test; it exits non-zero when a check fails or
something breaks. Needs root (it mounts a tmpfs).

    python3 tests/bench/soak.py                          # 30 minutes
    python3 tests/bench/soak.py --minutes 10
    python3 tests/bench/soak.py --minutes 2 --dest-period 60 --dest-down 20   # CI

Set-up
  * The store is a tmpfs of --store-mib (default 96 MiB) mounted in the
    work dir, so that it fills within a minute; the index lives in it.
  * minipacs serve (durable), started as root as on the device (a keeper
    and an unprivileged worker), with [retention] keep_free_percent = 40
    (free_space_reserve_percent at its default, 5) and a [[forward]] rule
    to DEST.
  * DEST is a pynetdicom storage SCP (this script, run with
    --destination): for each object it appends the SOP Instance UID, the
    SHA-256 of the data set as received and the time to a records file,
    flushed before it answers success. It is stopped (SIGTERM, its port
    closed) for --dest-down seconds at the end of every --dest-period
    (default down 60 s every 300 s), then started again.
  * The sender: --rate studies a second (default 1), each 1 to 4 CT objects
    of 256 KiB to 1 MiB of random pixels, each study sent by one dcmtk
    storescu -v -nh (TCP_NODELAY=1; -nh: go on after a refusal). Its log says the status of each object in
    order: an object is acknowledged when it got success. Object files
    are deleted once sent; only their data set SHA-256 is kept.

Samples, every --sample-every seconds (default 60; 10 for runs under 10
minutes) and at the end: RSS (VmRSS) and PSS (smaps_rollup) summed over
keeper and worker, open file descriptors of both (/proc/PID/fd),
index.sqlite, -wal and -shm sizes, queue depth (`minipacs queue status`:
queued + sent for DEST), objects acknowledged, delivered (distinct at DEST),
refused, studies deleted (audit trail), store use.

Checks (exit status 1 when one fails)
  * 0 lost: at the end DEST is started, the stream stops and the queue is
    given --drain-timeout seconds to empty; then every acknowledged object
    is still in the store with its data set bytes, or was delivered to DEST
    byte-exact (SHA-256), or both; and every one was delivered.
  * Retention never deleted an undelivered object: for every audit
    `deleted` line, each acknowledged object of that study was delivered
    byte-exact before the deletion time, and the line's object count is
    the study's acknowledged count.
  * Refusals: while DEST is down the store fills with undelivered studies
    that retention may not delete, so the free-space reserve refuses
    objects (A700, out of resources). That is allowed while DEST is down
    and within --grace seconds of its coming back (default --dest-down +
    30: the queue's retry pause, growing from 2 s, has reached about the
    time DEST was down, then the queue drains and retention makes room);
    any other failure, or a refusal while DEST has been up longer, fails
    the run. Both counts are printed.
  * Flat: after the warm-up (the first third of the run, at least 1 and
    at most 5 minutes: SQLite's WAL grows to its checkpoint size, about
    4 MiB, in the first minute), the last sample of RSS, PSS, descriptors and each SQLite file
    is <= the warm-up's largest x 1.1 + a small constant (2 MiB of memory,
    4 descriptors, 256 KiB of file); the largest later sample is printed
    beside it.
  * minipacs exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from procs import (BenchError, Children, data_set_sha256, dcmtk_env, free_ports, proc_kib,
                   process_tree, tail, wait_listening)
from pydicom.uid import generate_uid
from receive import MINIPACS, STORESCU, header_dataset, write_object

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # conftest.py

AE = "MINIPACS"
DEST_AE = "DEST"
PORT_RANGE = range(12300, 12400)
KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
SEND_TIMEOUT_S = 300
KEEP_FREE_PERCENT = 40
RESERVE_PERCENT = 5
COLUMNS = 512  # 1 KiB a row of 16-bit pixels
MIN_OBJECT, MAX_OBJECT = 256 * KIB, 1 * MIB
FLAT_FACTOR = 1.1
RESPONSE = re.compile(r"Received Store Response \((.*)\)\s*$")


# --------------------------------------------------------------------------
# The destination (this script run with --destination)
# --------------------------------------------------------------------------


def destination(port: int, records: Path) -> None:
    """A storage SCP that records what it receives, and keeps nothing else."""
    from pynetdicom import AE as PynetdicomAE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    lock = threading.Lock()
    out = open(records, "a")

    def on_store(event):
        data = event.request.DataSet.getvalue()
        line = json.dumps({"uid": str(event.request.AffectedSOPInstanceUID),
                           "sha256": hashlib.sha256(data).hexdigest(), "time": time.time()})
        with lock:
            out.write(line + "\n")
            out.flush()
        return 0x0000

    ae = PynetdicomAE(ae_title=DEST_AE)
    ae.maximum_associations = 4
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)], block=True)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class SentObject:
    uid: str
    study: str
    sha256: str
    sent_at: float
    status: str = "not answered"  # "Success", or storescu's words for the status

    @property
    def acknowledged(self) -> bool:
        return self.status == "Success"


@dataclass
class Sample:
    t: float
    rss_mib: float
    pss_mib: float
    fds: int
    index_kib: float
    wal_kib: float
    shm_kib: float
    queue: int | None
    acked: int
    delivered: int
    refused: int
    deleted: int
    used_percent: float


@dataclass
class DestState:
    """When DEST was down: [(went down, came back or None)]."""
    windows: list[tuple[float, float | None]] = field(default_factory=list)

    def state_at(self, t: float, grace: float) -> str:
        """'down', 'grace' (up for less than grace seconds) or 'up'."""
        for down, up in self.windows:
            if down <= t and (up is None or t < up):
                return "down"
            if up is not None and up <= t < up + grace:
                return "grace"
        return "up"


# --------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, children) -> None:
        self.args = args
        self.workdir = workdir
        self.children = children
        self.rng = random.Random(20240101)
        self.objects: list[SentObject] = []
        self.by_study: dict[str, list[SentObject]] = {}
        self.samples: list[Sample] = []
        self.dest_state = DestState()
        self.problems: list[str] = []
        self.send_failures = 0
        self.outbox = workdir / "outbox"
        self.mount = workdir / "mnt"
        self.store = self.mount / "store"
        self.logs = workdir / "logs"
        self.records = workdir / "dest-records.jsonl"
        self.dest = None
        self.server = None

    # -- set-up -----------------------------------------------------------

    def mount_store(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("soak.py mounts a tmpfs for its store: run it as root")
        self.mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.store_mib}m",
                               "tmpfs", str(self.mount)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"cannot mount a tmpfs on {self.mount}: {done.stderr.strip()}")
        self.mount.chmod(0o755)

    def unmount_store(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)

    def write_config(self) -> Path:
        text = (
            f'port = {self.port}\n'
            f'aetitle = "{AE}"\n'
            f'output_directory = "{self.store}"\n'
            f'log_directory = "{self.logs}"\n'
            f'fsync = true\n'
            f'free_space_reserve_percent = {RESERVE_PERCENT}\n'
            f'[retention]\n'
            f'keep_free_percent = {KEEP_FREE_PERCENT}\n'
            f'[[peer]]\naetitle = "{DEST_AE}"\nhost = "127.0.0.1"\nport = {self.dest_port}\n'
            f'[[forward]]\nto = "{DEST_AE}"\n'
        )
        self.config = self.workdir / "minipacs.toml"
        self.config.write_text(text)
        return self.config

    def start_dest(self) -> None:
        log = self.workdir / "dest.log"
        with open(log, "a") as f:
            f.write(f"--- started {time.strftime('%H:%M:%S')}\n")
        self.dest = self.children.start([sys.executable, Path(__file__).resolve(), "--destination",
                                         str(self.dest_port), "--records", self.records], log)
        wait_listening(self.dest, [self.dest_port], "destination", log, START_TIMEOUT_S)
        if self.dest_state.windows and self.dest_state.windows[-1][1] is None:
            down, _ = self.dest_state.windows[-1]
            self.dest_state.windows[-1] = (down, time.time())

    def stop_dest(self) -> None:
        self.children.stop(self.dest)
        self.dest = None
        self.dest_state.windows.append((time.time(), None))

    # -- the stream ---------------------------------------------------------

    def send_study(self, number: int) -> None:
        """Makes one study of 1-4 objects, sends it with storescu, records
        each object's status, deletes the files."""
        folder = self.outbox / f"study{number:06d}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        files, sent = [], []
        for i in range(self.rng.randint(1, 4)):
            rows = self.rng.randint(MIN_OBJECT // (2 * COLUMNS), MAX_OBJECT // (2 * COLUMNS))
            ds = header_dataset(rows, COLUMNS, study, series, i + 1)
            ds.PatientID = f"SOAK{number:06d}"
            ds.PatientName = "SOAK^MINIPACS"
            path = folder / f"{i + 1}.dcm"
            pixels = self.rng.randbytes(rows * COLUMNS * 2)
            write_object(path, ds, len(pixels), pixels)
            files.append(path)
            sent.append(SentObject(ds.SOPInstanceUID, study, data_set_sha256(path), 0.0))
        log = self.workdir / "storescu.log"
        started = time.time()
        done = subprocess.run([STORESCU, "-v", "-nh", "-aet", "SOAKSCU", "-aec", AE, "127.0.0.1",
                               str(self.port), *map(str, files)], env=dcmtk_env(),
                              capture_output=True, text=True, timeout=SEND_TIMEOUT_S)
        output = done.stdout + done.stderr  # dcmtk logs to stderr
        statuses = [m.group(1) for m in map(RESPONSE.search, output.splitlines()) if m]
        for obj, status in zip(sent, statuses):
            obj.status = status
        for obj in sent:
            obj.sent_at = started
        self.objects += sent
        self.by_study[study] = sent
        if done.returncode != 0 or len(statuses) != len(files) or \
                any(s != "Success" for s in statuses):
            self.send_failures += 1
            with open(log, "a") as f:
                f.write(f"--- study {number} at {time.strftime('%H:%M:%S')}, exit "
                        f"{done.returncode}\n{output}")
        shutil.rmtree(folder)

    # -- samples ------------------------------------------------------------

    def delivered(self) -> dict[str, list[tuple[str, float]]]:
        """{uid: [(sha256, time)]} from DEST's records."""
        out: dict[str, list[tuple[str, float]]] = {}
        try:
            text = self.records.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by the stop
            out.setdefault(r["uid"], []).append((r["sha256"], r["time"]))
        return out

    def audit(self) -> list[dict]:
        lines = []
        files = sorted(glob.glob(str(self.logs / "audit.jsonl*")),
                       key=lambda p: -int(p.rsplit(".", 1)[1]) if p[-1].isdigit() else 0)
        for path in files:
            for line in Path(path).read_text(errors="replace").splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def queue_depth(self) -> int | None:
        done = subprocess.run([MINIPACS, "queue", "-c", self.config, "status"],
                              capture_output=True, text=True, timeout=60)
        for line in done.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == DEST_AE:
                return int(fields[1]) + int(fields[2])
        if done.returncode == 0:
            return 0  # no entries for DEST at all
        return None

    def sample(self, t: float) -> Sample:
        pids = process_tree(self.server.pid)
        rss = sum(proc_kib(f"/proc/{p}/status", "VmRSS") for p in pids) / KIB
        pss = sum(proc_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids) / KIB
        index = self.store / "index.sqlite"
        fs = os.statvfs(self.mount)
        used = 100.0 * (1 - fs.f_bavail / fs.f_blocks)
        s = Sample(t, rss, pss, fd_count(pids), file_size(index) / KIB,
                   file_size(Path(f"{index}-wal")) / KIB, file_size(Path(f"{index}-shm")) / KIB,
                   self.queue_depth(), sum(o.acknowledged for o in self.objects),
                   len(self.delivered()),
                   sum(1 for o in self.objects if not o.acknowledged),
                   sum(1 for a in self.audit() if a.get("event") == "deleted"), used)
        self.samples.append(s)
        print(sample_row(s), flush=True)
        return s

    # -- the run ------------------------------------------------------------

    def run(self) -> int:
        self.port, self.dest_port = free_ports(PORT_RANGE, 2)
        shutil.rmtree(self.outbox, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        for path in (self.records, self.workdir / "storescu.log", self.workdir / "dest.log"):
            path.unlink(missing_ok=True)
        self.mount_store()
        try:
            return self.soak()
        finally:
            self.children.stop_all()
            self.unmount_store()

    def soak(self) -> int:
        args = self.args
        self.start_dest()
        server_log = self.workdir / "serve.log"
        self.server = self.children.start([MINIPACS, "serve", "--config", self.write_config()],
                                          server_log)
        wait_listening(self.server, [self.port], "minipacs", server_log, START_TIMEOUT_S)
        duration = args.minutes * 60
        interval = args.sample_every or (60 if args.minutes >= 10 else 10)
        print(f"soak: {args.minutes} min, {args.rate} studies/s of 1-4 x 256 KiB-1 MiB into a "
              f"{args.store_mib} MiB tmpfs (retention keeps {KEEP_FREE_PERCENT} % free, reserve "
              f"{RESERVE_PERCENT} %); DEST down {args.dest_down} s every {args.dest_period} s; "
              f"a sample every {interval} s", flush=True)
        print(sample_header(), flush=True)
        started = time.monotonic()
        self.sample(0.0)
        next_sample = interval
        next_study = 0.0
        number = 0
        while True:
            now = time.monotonic() - started
            if now >= duration:
                break
            if self.server.poll() is not None:
                raise BenchError(f"minipacs exited ({self.server.returncode}) during the soak "
                                 f"(this script only stops it at the end: signalled from "
                                 f"outside?)\n{tail(server_log)}")
            phase = now % args.dest_period
            want_up = phase < args.dest_period - args.dest_down
            if want_up and self.dest is None:
                self.start_dest()
            elif not want_up and self.dest is not None:
                self.stop_dest()
            if self.dest is not None and self.dest.poll() is not None:
                raise BenchError(f"the destination exited ({self.dest.returncode})\n"
                                 f"{tail(self.workdir / 'dest.log')}")
            if now >= next_sample:
                self.sample(now)
                next_sample += interval
                continue
            if now >= next_study:
                self.send_study(number)
                number += 1
                next_study += 1.0 / args.rate
                continue
            time.sleep(min(0.05, max(0.0, next_study - now)))
        end = time.monotonic() - started
        self.sample(end)
        if self.dest is None:
            self.start_dest()
        drained = self.drain()
        final = self.sample(time.monotonic() - started)
        code = self.children.stop(self.server)
        if code != 0:
            self.problems.append(f"minipacs exited {code} on SIGTERM\n{tail(server_log)}")
        self.children.stop(self.dest)
        self.dest = None
        return self.report(end, drained, final)

    def drain(self) -> float | None:
        """Waits until DEST's queue is empty; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < self.args.drain_timeout:
            if self.queue_depth() == 0:
                return time.monotonic() - started
            time.sleep(1)
        self.problems.append(f"the queue did not drain within {self.args.drain_timeout} s of the "
                             f"end (depth {self.queue_depth()})")
        return None

    # -- checks -------------------------------------------------------------

    def stored(self) -> dict[str, str]:
        """{uid: data set SHA-256} of the store's files."""
        out = {}
        for path in self.store.iterdir():
            if path.name.startswith(".") or path.name.startswith("index.sqlite"):
                continue
            uid = path.name.split(".", 1)[1] if "." in path.name else path.name
            if uid in out:
                self.problems.append(f"twice in the store: {uid}")
            out[uid] = data_set_sha256(path)
        return out

    def report(self, end: float, drained: float | None, final: Sample) -> int:
        args = self.args
        stored = self.stored()
        delivered = self.delivered()
        audit = self.audit()
        acked = [o for o in self.objects if o.acknowledged]
        lost, corrupt, undelivered = [], [], []
        for o in acked:
            in_store = o.uid in stored
            if in_store and stored[o.uid] != o.sha256:
                corrupt.append(f"{o.uid}: stored data set differs from the one sent")
            copies = delivered.get(o.uid, [])
            if any(sha != o.sha256 for sha, _ in copies):
                corrupt.append(f"{o.uid}: delivered data set differs from the one sent")
            good_copy = any(sha == o.sha256 for sha, _ in copies)
            if not good_copy:
                undelivered.append(o.uid)
            if not in_store and not good_copy:
                lost.append(o.uid)
        # Retention deleted only delivered studies.
        deletions = [a for a in audit if a.get("event") == "deleted"]
        bad_deletions = []
        for d in deletions:
            objs = [o for o in self.by_study.get(d["study_instance_uid"], []) if o.acknowledged]
            when = parse_time(d["time"])
            if not objs:
                bad_deletions.append(f"deleted study {d['study_instance_uid']} was not sent here")
                continue
            if d["objects"] != len(objs):
                bad_deletions.append(f"deleted study {d['study_instance_uid']}: {d['objects']} "
                                     f"objects deleted, {len(objs)} acknowledged")
            for o in objs:
                times = [t for sha, t in delivered.get(o.uid, []) if sha == o.sha256]
                if not times or min(times) > when:
                    bad_deletions.append(f"deleted study {o.study}: object {o.uid} not delivered "
                                         f"before the deletion at {d['time']}")
            for o in objs:
                if o.uid in stored:
                    bad_deletions.append(f"deleted study {o.study}: {o.uid} still in the store")
        # Refusals by DEST's state at the time.
        refused = {"down": 0, "grace": 0, "up": 0}
        other_failures = []
        for o in self.objects:
            if o.acknowledged:
                continue
            if "OutOfResources" in o.status.replace(" ", "") or "A700" in o.status:
                refused[self.dest_state.state_at(o.sent_at, args.grace)] += 1
            else:
                other_failures.append(f"{o.uid}: {o.status}")
        # Flatness.
        warmup = min(300.0, max(60.0, end / 3))
        first = [s for s in self.samples if s.t <= warmup]
        later = [s for s in self.samples if s.t > warmup]
        flat_rows = []
        for name, key, const in (("RSS MiB", "rss_mib", 2.0), ("PSS MiB", "pss_mib", 2.0),
                                 ("descriptors", "fds", 4), ("index.sqlite KiB", "index_kib", 256),
                                 ("-wal KiB", "wal_kib", 256), ("-shm KiB", "shm_kib", 256)):
            base = max(getattr(s, key) for s in first)
            limit = base * FLAT_FACTOR + const
            last = getattr(self.samples[-1], key)
            peak = max((getattr(s, key) for s in later), default=last)
            ok = last <= limit
            flat_rows.append((name, base, peak, last, limit, ok))
            if not ok:
                self.problems.append(f"not flat: {name} last {last:.0f} > {limit:.0f} "
                                     f"(warm-up max {base:.0f} x {FLAT_FACTOR} + {const})")

        print()
        print(f"Soak: {end / 60:.1f} min, {len(self.by_study)} studies, {len(self.objects)} "
              f"objects sent ({sum(1 for _ in acked)} acknowledged), DEST down "
              f"{len(self.dest_state.windows)} times")
        rows = [
            ("acknowledged objects lost", f"{len(lost)}"),
            ("corrupt (store or DEST differs)", f"{len(corrupt)}"),
            ("acknowledged, never delivered", f"{len(undelivered)} (queue drained "
             f"{'in %.0f s' % drained if drained is not None else 'NOT'} after the end)"),
            ("in the store at the end", f"{len(stored)} objects, {final.used_percent:.0f} % used"),
            ("studies deleted by retention", f"{len(deletions)}, "
                                             f"{len(bad_deletions)} not allowed"),
            ("refused (A700) while DEST down", f"{refused['down']} (allowed)"),
            (f"refused within {args.grace:.0f} s of DEST back", f"{refused['grace']} (allowed)"),
            ("refused while DEST up longer", f"{refused['up']}"),
            ("other failures", f"{len(other_failures)}"),
        ]
        for name, value in rows:
            print(f"  {name:<34} {value}")
        for down, up in self.dest_state.windows:
            during = [o.sent_at for o in self.objects if not o.acknowledged
                      and down <= o.sent_at < (up or float("inf"))]
            after = [o.sent_at - up for o in self.objects if not o.acknowledged
                     and up is not None and o.sent_at >= up]
            after = [a for a in after if a < args.dest_period - args.dest_down]
            print(f"  DEST down {time.strftime('%H:%M:%S', time.localtime(down))} for "
                  f"{(up or down) - down:.0f} s: {len(during)} refused while down, "
                  f"{len(after)} after it was back"
                  + (f", the last {max(after):.0f} s after" if after else ""))
        print(f"\nFlatness (warm-up: the first {warmup:.0f} s; limit = warm-up max x "
              f"{FLAT_FACTOR} + constant)")
        print(f"  {'':<18} {'warm-up max':>12} {'later max':>10} {'last':>10} {'limit':>10}")
        for name, base, peak, last, limit, ok in flat_rows:
            print(f"  {name:<18} {base:>12.1f} {peak:>10.1f} {last:>10.1f} {limit:>10.1f}  "
                  f"{'flat' if ok else 'GROWS'}")
        self.problems += [f"lost: {u}" for u in lost[:20]]
        self.problems += corrupt[:20]
        self.problems += [f"acknowledged, never delivered: {u}" for u in undelivered[:10]]
        self.problems += bad_deletions[:20]
        if refused["up"]:
            self.problems.append(f"{refused['up']} objects refused while DEST had been up over "
                                 f"{args.grace:.0f} s (see {self.workdir / 'storescu.log'})")
        self.problems += [f"failed: {f}" for f in other_failures[:10]]
        print()
        if self.problems:
            print(f"FAIL: {len(self.problems)} problem(s):")
            for message in self.problems[:60]:
                print(f"  {message}")
            return 1
        print("PASS: 0 lost, retention deleted only delivered studies, no refusal while DEST "
              "was up, RSS, descriptors and SQLite files flat")
        return 0


def sample_header() -> str:
    return (f"{'min':>5} {'RSS MiB':>8} {'PSS MiB':>8} {'fds':>4} {'index KiB':>10} "
            f"{'wal KiB':>8} {'shm KiB':>8} {'queue':>6} {'acked':>6} {'deliv':>6} "
            f"{'refused':>7} {'deleted':>7} {'used %':>6}")


def sample_row(s: Sample) -> str:
    queue = "?" if s.queue is None else str(s.queue)
    return (f"{s.t / 60:>5.1f} {s.rss_mib:>8.1f} {s.pss_mib:>8.1f} {s.fds:>4} "
            f"{s.index_kib:>10.0f} {s.wal_kib:>8.0f} {s.shm_kib:>8.0f} {queue:>6} "
            f"{s.acked:>6} {s.delivered:>6} {s.refused:>7} {s.deleted:>7} "
            f"{s.used_percent:>6.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1.0, help="studies a second")
    parser.add_argument("--store-mib", type=int, default=96, help="size of the store's tmpfs")
    parser.add_argument("--dest-period", type=float, default=300,
                        help="DEST goes away once every this many seconds")
    parser.add_argument("--dest-down", type=float, default=60, help="for this many seconds")
    parser.add_argument("--grace", type=float,
                        help="seconds after DEST is back in which refusals are still allowed "
                             "(default: --dest-down + 30: the queue's retry pause has grown to "
                             "about the time it was down, then it drains)")
    parser.add_argument("--sample-every", type=float,
                        help="seconds between samples (default 60; 10 for runs under 10 min)")
    parser.add_argument("--drain-timeout", type=float, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minipacs-soak"))
    parser.add_argument("--destination", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.destination:
        destination(args.destination, args.records)
        return 0
    if not 0 < args.dest_down < args.dest_period:
        parser.error("--dest-down must be above 0 and below --dest-period")
    if args.grace is None:
        args.grace = args.dest_down + 30
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not MINIPACS.exists():
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=REPO)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir.stat().st_uid == os.getuid():
        args.workdir.chmod(0o755)
    print(f"work dir: {args.workdir}", flush=True)
    children = Children(STOP_TIMEOUT_S)
    try:
        return Soak(args, args.workdir, children).run()
    except BenchError as e:
        print(f"\nsoak.py: ERROR: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
