#!/usr/bin/env python3
"""Load test: many senders at once, with hostile idle connections and a
viewer querying throughout. A script that prints figures, not a timed
test; it exits non-zero when a check fails or something breaks.

    python3 tests/bench/load.py                              # 32 x 1,000
    python3 tests/bench/load.py --senders 4 --objects 100    # CI short form
    python3 tests/bench/load.py --size 65536 --workdir /tmp/mpload

What runs at once, against one fresh `minipacs serve` (durable: fsync on;
TLS on beside plain DICOM; max_associations = senders + 8; every other
limit at its default, max_pending_connections 64 and acse_timeout 30 s
included):
  * senders: N dcmtk `storescu` processes (TCP_NODELAY=1), started
    together, each sending its own objects on one association: its own
    patient, study and series, small CT objects (Explicit VR Little Endian)
    of size/2 to 2 x size bytes of random pixels (default 16-64 KiB);
  * 100 idle TCP connections to the plain port that never send a byte;
  * 50 stalled TLS connections to the TLS port: 25 send nothing, 25 a
    partial ClientHello (a record header announcing 512 bytes, and 10 of
    them). These 150 come from a child process of their own, and are held
    open the whole time: the server drops silent connections after its
    ACSE timeout and the oldest pending ones beyond max_pending_connections
    (that is expected), and each one dropped is opened again 1 s later
    (--reopen-delay), so the pending set stays full and churning. The
    point is that no real sender is ever turned away because of them
    (--max-pending N sets max_pending_connections, to compare);
  * a viewer: one association (the raw C-FIND SCU of qr.py, in a child
    process so that no other thread here delays it) asking a C-FIND every
    second for the instances of a reference series of 20 objects stored
    before the load: latency p50/p99/max, and every answer must count 20.

The objects are generated once into the work dir (reused when it is given
again), with the SHA-256 of each data set (the bytes after the file meta
group) in a manifest.

Checks (exit status 1 when one fails):
  * every storescu exits 0 and logged a success response for each object;
  * every object is in the store, exactly once, with its data set bytes
    equal to the ones sent (SHA-256), and nothing else is there;
  * the index agrees: after the load, a C-FIND per sender's series counts
    its objects;
  * the viewer: no error, every answer counted right;
  * peak PSS of minipacs (keeper + worker, sampled every 50 ms from
    /proc/PID/smaps_rollup; shared pages counted once) <= 64 MiB;
  * minipacs exits 0 on SIGTERM at the end.
Also printed: wall time (first sender's start to last sender's exit),
objects/s and MB/s, minipacs CPU time per object, peak RSS summed over
keeper and worker (sampled VmRSS, and the sum of VmHWM: pages the two
share count twice there), and how often the held connections were dropped
by the server and opened again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from procs import (BenchError, Children, cpu_seconds, data_set_sha256, dcmtk_env, free_ports,
                   proc_kib, process_tree, tail, wait_listening)
from receive import MINIPACS, STORESCU, header_dataset, prepare_certificates, write_object

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # dul.py and conftest.py
from qr import STUDY_ROOT_FIND, Peer, Query, RawFind  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

AE = "MINIPACS"
PORT_RANGE = range(12200, 12300)
KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000
IDLE_TCP = 100
STALLED_TLS = 50
VIEWER_OBJECTS = 20
VIEWER_PERIOD_S = 1.0
SAMPLE_S = 0.05
PSS_FLOOR_MIB = 64.0
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
SENDER_TIMEOUT_S = 3600
COLUMNS = 128  # 256 bytes a row of 16-bit pixels
# A TLS record header (handshake, TLS 1.0 record version, 512 bytes) and
# the start of a ClientHello: the server's TLS library waits for the rest.
PARTIAL_CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03,
                              0x5A, 0x5A, 0x5A, 0x5A, 0x5A])


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------


def make_series(folder: Path, name: str, count: int, size: int, seed: int) -> dict:
    """count CT objects of one patient, study and series into folder; returns
    their manifest: study, series and {SOP instance UID: [file, SHA-256]}."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    study, series = generate_uid(), generate_uid()
    low, high = max(1, size // 2 // (2 * COLUMNS)), max(1, 2 * size // (2 * COLUMNS))
    objects = {}
    for i in range(count):
        rows = rng.randint(low, high)
        ds = header_dataset(rows, COLUMNS, study, series, i + 1)
        ds.PatientID = name
        ds.PatientName = f"LOAD^{name}"
        path = folder / f"{i + 1:05d}.dcm"
        pixels = rng.randbytes(rows * COLUMNS * 2)
        write_object(path, ds, len(pixels), pixels)
        objects[ds.SOPInstanceUID] = [path.name, data_set_sha256(path)]
    return {"study": study, "series": series, "objects": objects}


def prepare_objects(workdir: Path, senders: int, objects: int, size: int) -> Path:
    """One folder per sender and one for the viewer's reference series, with
    manifest.json; made once into a .partial folder, renamed when done."""
    final = workdir / f"objects-{senders}x{objects}-{size}"
    if (final / "manifest.json").is_file():
        print(f"objects: reusing {final}", flush=True)
        return final
    partial = workdir / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    manifest = {"viewer": make_series(partial / "viewer", "VIEWER", VIEWER_OBJECTS, 4096, 0)}
    for s in range(senders):
        manifest[f"s{s:03d}"] = make_series(partial / f"s{s:03d}", f"LOAD{s:03d}", objects, size,
                                            s + 1)
    (partial / "manifest.json").write_text(json.dumps(manifest))
    partial.rename(final)
    print(f"objects: generated {senders} x {objects} (+{VIEWER_OBJECTS}) in {final} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return final


# --------------------------------------------------------------------------
# Held connections (child process)
# --------------------------------------------------------------------------


def hold_connections(plain: int, tls: int, reopen_delay: float, conn) -> None:
    """Holds IDLE_TCP silent connections to the plain port and STALLED_TLS
    to the TLS port (half silent, half a partial ClientHello) until told to
    stop; each one the server closes is opened again after reopen_delay.
    Sends back {"opened": n, "closed": {kind: n}, "connect_errors": n,
    "open_min": n, "open_mean": x} (counts over the held time)."""
    kinds = ["idle"] * IDLE_TCP + ["tls"] * (STALLED_TLS // 2) + \
        ["hello"] * (STALLED_TLS - STALLED_TLS // 2)
    sel = selectors.DefaultSelector()
    sel.register(conn, selectors.EVENT_READ, None)
    due: list[tuple[float, int]] = [(0.0, i) for i in range(len(kinds))]
    stats = {"opened": 0, "closed": {k: 0 for k in set(kinds)}, "connect_errors": 0}
    live = 0
    open_samples = []
    next_sample = time.monotonic() + 1.0
    try:
        while True:
            now = time.monotonic()
            still = []
            for when, i in due:
                if when > now:
                    still.append((when, i))
                    continue
                try:
                    s = socket.create_connection(("127.0.0.1", plain if kinds[i] == "idle" else tls),
                                                 timeout=2)
                    if kinds[i] == "hello":
                        s.sendall(PARTIAL_CLIENT_HELLO)
                    s.setblocking(False)
                except OSError:
                    stats["connect_errors"] += 1
                    still.append((now + reopen_delay, i))
                    continue
                sel.register(s, selectors.EVENT_READ, i)
                stats["opened"] += 1
                live += 1
            due = still
            if now >= next_sample:
                open_samples.append(live)
                next_sample += 1.0
            timeout = 0.2
            if due:
                timeout = max(0.0, min(timeout, min(w for w, _ in due) - time.monotonic()))
            for key, _ in sel.select(timeout):
                if key.data is None:
                    return  # told to stop
                s, i = key.fileobj, key.data
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # e.g. a TLS alert: wait for the close
                sel.unregister(s)
                s.close()
                live -= 1
                stats["closed"][kinds[i]] += 1
                due.append((time.monotonic() + reopen_delay, i))
    finally:
        stats["open_min"] = min(open_samples, default=live)
        stats["open_mean"] = sum(open_samples) / len(open_samples) if open_samples else live
        for key in list(sel.get_map().values()):
            if key.data is not None:
                key.fileobj.close()
        conn.send(stats)
        conn.close()


# --------------------------------------------------------------------------
# The viewer (child process)
# --------------------------------------------------------------------------


def view(port: int, query: Query, conn) -> None:
    """A C-FIND every VIEWER_PERIOD_S on one association until told to stop;
    sends back {"latencies": [s], "counts": [n], "errors": [text]}. An
    association lost is an error, and a new one is made."""
    latencies, counts, errors = [], [], []
    raw = None
    next_at = time.monotonic()
    try:
        while True:
            if conn.poll(max(0.0, next_at - time.monotonic())):
                return
            next_at += VIEWER_PERIOD_S
            try:
                if raw is None:
                    raw = RawFind(Peer("minipacs", "minipacs", 0, AE, port, Path(".")))
                elapsed, count = raw.find(query)
                latencies.append(elapsed)
                counts.append(count)
            except Exception as e:  # noqa: BLE001 (reported to the parent)
                errors.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
                raw = None
    finally:
        if raw is not None:
            try:
                raw.release()
            except Exception as e:  # noqa: BLE001
                errors.append(f"release: {type(e).__name__}: {e}")
        conn.send({"latencies": latencies, "counts": counts, "errors": errors})
        conn.close()


def series_query(study: str, series: str, expected: int) -> Query:
    return Query("series", "instances of one series", STUDY_ROOT_FIND,
                 (("QueryRetrieveLevel", "IMAGE"), ("StudyInstanceUID", study),
                  ("SeriesInstanceUID", series), ("SOPInstanceUID", ""),
                  ("InstanceNumber", "")), expected)


class ChildProcess:
    """A forked helper that reports one result through a pipe when told to
    stop (any message)."""

    def __init__(self, target, *args) -> None:
        ctx = multiprocessing.get_context("fork")
        self._ours, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
        self.proc.start()
        theirs.close()

    def finish(self, timeout: float = 30) -> dict:
        try:
            self._ours.send("stop")
            if not self._ours.poll(timeout):
                raise BenchError(f"{self.proc.name}: no result within {timeout} s")
            return self._ours.recv()
        except (EOFError, BrokenPipeError):
            raise BenchError(f"{self.proc.name} died (exit {self.proc.exitcode})") from None
        finally:
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


# --------------------------------------------------------------------------
# Memory sampling
# --------------------------------------------------------------------------


class Sampler:
    """Every SAMPLE_S: minipacs's processes' summed VmRSS and PSS; keeps the
    peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.samples = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            pids = process_tree(self.pid)
            rss = sum(proc_kib(f"/proc/{p}/status", "VmRSS") for p in pids)
            pss = sum(proc_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.processes = max(self.processes, len(pids))
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def config(run: Path, plain: int, tls_port: int, certs, senders: int,
           max_pending: int | None) -> Path:
    text = (
        f'port = {plain}\n'
        f'aetitle = "{AE}"\n'
        f'output_directory = "{run / "store"}"\n'
        f'log_directory = "{run / "logs"}"\n'
        f'fsync = true\n'
        f'max_associations = {senders + 8}\n'
        + (f'max_pending_connections = {max_pending}\n' if max_pending else '') +
        f'[tls]\n'
        f'port = {tls_port}\n'
        f'key = "{certs.key("server")}"\n'
        f'cert = "{certs.cert("server")}"\n'
        f'ca_files = ["{certs.ca}"]\n'
    )
    path = run / "minipacs.toml"
    path.write_text(text)
    return path


def storescu(children: Children, log: Path, calling: str, port: int, files: list[Path]):
    return children.start([STORESCU, "-v", "-aet", calling, "-aec", AE, "127.0.0.1", port,
                           *files], log, env=dcmtk_env())


def successes(log: Path) -> tuple[int, list[str]]:
    """Success responses in a storescu -v log, and the other responses."""
    ok, other = 0, []
    for line in log.read_text(errors="replace").splitlines():
        if "Received Store Response" in line:
            if line.rstrip().endswith("(Success)"):
                ok += 1
            else:
                other.append(line.strip())
    return ok, other


def verify_store(store: Path, manifest: dict) -> tuple[int, list[str]]:
    """Compares the store with the manifest: (objects byte-exact, problems)."""
    expected = {}
    for entry in manifest.values():
        for uid, (_name, digest) in entry["objects"].items():
            expected[uid] = digest
    exact, problems, seen = 0, [], set()
    for path in sorted(store.iterdir()):
        if path.name.startswith(".") or path.name.startswith("index.sqlite"):
            continue
        uid = path.name.split(".", 1)[1] if "." in path.name else path.name
        if path.is_dir() or uid not in expected:
            problems.append(f"unexpected in the store: {path.name}")
            continue
        if uid in seen:
            problems.append(f"twice in the store: {uid}")
        seen.add(uid)
        if data_set_sha256(path) == expected[uid]:
            exact += 1
        else:
            problems.append(f"data set differs from the one sent: {path.name}")
    missing = set(expected) - seen
    for uid in sorted(missing)[:20]:
        problems.append(f"missing from the store: {uid}")
    if len(missing) > 20:
        problems.append(f"... and {len(missing) - 20} more missing")
    return exact, problems


def run(args: argparse.Namespace, workdir: Path, children: Children) -> int:
    problems: list[str] = []
    objects = prepare_objects(workdir, args.senders, args.objects, args.size)
    manifest = json.loads((objects / "manifest.json").read_text())
    certs = prepare_certificates(workdir)
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    plain, tls_port = free_ports(PORT_RANGE, 2)
    server_log = run_dir / "serve.log"
    server = children.start([MINIPACS, "serve", "--config",
                             config(run_dir, plain, tls_port, certs, args.senders,
                                    args.max_pending)], server_log)
    wait_listening(server, [plain, tls_port], "minipacs", server_log, START_TIMEOUT_S)
    print(f"minipacs {MINIPACS} on ports {plain} (plain) and {tls_port} (TLS), pid {server.pid}",
          flush=True)

    # The viewer's reference series, before the load.
    viewer = manifest["viewer"]
    log = run_dir / "storescu-viewer.log"
    proc = storescu(children, log, "REFSCU", plain,
                    sorted((objects / "viewer").iterdir()))
    if proc.wait() != 0:
        raise BenchError(f"storing the viewer's series failed ({proc.returncode})\n{tail(log)}")

    holder = ChildProcess(hold_connections, plain, tls_port, args.reopen_delay)
    viewer_proc = ChildProcess(view, plain,
                               series_query(viewer["study"], viewer["series"], VIEWER_OBJECTS))
    sampler = Sampler(server.pid)  # a thread: started after the forks
    time.sleep(2)  # the held connections are open, the viewer has asked
    cpu_before = cpu_seconds(process_tree(server.pid))
    print(f"load: {args.senders} storescu x {args.objects} objects, with {IDLE_TCP} idle TCP "
          f"and {STALLED_TLS} stalled TLS connections held, and a viewer", flush=True)
    senders = []
    started = time.perf_counter()
    for s in range(args.senders):
        key = f"s{s:03d}"
        folder = objects / key
        files = [folder / name for name, _ in manifest[key]["objects"].values()]
        log = run_dir / f"storescu-{key}.log"
        senders.append((key, log, storescu(children, log, f"LOAD{s:03d}", plain, files)))
    ends = {}
    deadline = time.monotonic() + SENDER_TIMEOUT_S
    while len(ends) < len(senders):
        for key, _log, proc in senders:
            if key not in ends and proc.poll() is not None:
                ends[key] = time.perf_counter()
                if proc.returncode != 0:
                    print(f"  sender {key} exited {proc.returncode} at "
                          f"{time.strftime('%H:%M:%S')}, {ends[key] - started:.2f} s after the "
                          f"start", flush=True)
        if server.poll() is not None:
            raise BenchError(f"minipacs exited ({server.returncode}) during the load\n"
                             f"{tail(server_log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"senders still running after {SENDER_TIMEOUT_S} s")
        time.sleep(0.01)
    wall = max(ends.values()) - started
    cpu = cpu_seconds(process_tree(server.pid)) - cpu_before
    time.sleep(2)  # the viewer asks a last time with the load over
    views = viewer_proc.finish()
    held = holder.finish()
    sampler.stop()
    hwm_kib = sum(proc_kib(f"/proc/{p}/status", "VmHWM") for p in process_tree(server.pid))

    failed_sends = 0
    for key, log, proc in senders:
        ok, other = successes(log)
        count = len(manifest[key]["objects"])
        if proc.returncode != 0 or ok != count or other:
            failed_sends += 1
            problems.append(f"sender {key}: exit {proc.returncode}, {ok} of {count} successes"
                            f"{', ' + other[0] if other else ''}\n{tail(log, 5)}")

    # The index agrees: each sender's series counts its objects.
    index_wrong = 0
    raw = RawFind(Peer("minipacs", "minipacs", 0, AE, plain, Path(".")))
    try:
        for s in range(args.senders):
            entry = manifest[f"s{s:03d}"]
            _, count = raw.find(series_query(entry["study"], entry["series"], args.objects))
            if count != len(entry["objects"]):
                index_wrong += 1
                problems.append(f"C-FIND of sender s{s:03d}'s series: {count} matches, "
                                f"expected {len(entry['objects'])}")
    finally:
        raw.release()

    code = children.stop(server)
    if code != 0:
        problems.append(f"minipacs exited {code} on SIGTERM\n{tail(server_log)}")
    exact, store_problems = verify_store(run_dir / "store", manifest)
    problems += store_problems

    wrong_counts = sum(1 for c in views["counts"] if c != VIEWER_OBJECTS)
    if wrong_counts:
        problems.append(f"viewer: {wrong_counts} answers did not count {VIEWER_OBJECTS} "
                        f"(counts seen: {sorted(set(views['counts']))})")
    for error in views["errors"][:10]:
        problems.append(f"viewer: {error}")
    if not views["latencies"]:
        problems.append("viewer: no C-FIND answered")
    peak_pss = sampler.peak_pss_kib / KIB
    if peak_pss > PSS_FLOOR_MIB:
        problems.append(f"peak PSS {peak_pss:.1f} MiB > {PSS_FLOOR_MIB:.0f} MiB")

    total = args.senders * args.objects
    sent_bytes = sum((objects / key / name).stat().st_size
                     for key in manifest if key != "viewer"
                     for name, _ in manifest[key]["objects"].values())
    expected_total = total + VIEWER_OBJECTS
    lat = [x * 1000 for x in views["latencies"]]
    print()
    print(f"Load: {args.senders} senders x {args.objects} objects ({args.size // 2 // KIB}-"
          f"{2 * args.size // KIB} KiB, {sent_bytes / MB:.0f} MB), {IDLE_TCP} idle TCP + "
          f"{STALLED_TLS} stalled TLS held, 1 viewer; durable, TLS on")
    rows = [
        ("wall (first start to last exit)", f"{wall:.1f} s"),
        ("objects/s", f"{total / wall:.0f}"),
        ("MB/s", f"{sent_bytes / MB / wall:.1f}"),
        ("failed sends (storescu)", f"{failed_sends} of {args.senders}"),
        ("objects in store byte-exact", f"{exact} of {expected_total}"),
        ("index: C-FIND count per series", f"{args.senders - index_wrong} of {args.senders} right"),
        ("viewer C-FIND", f"{len(lat)} answers, {wrong_counts} wrong counts, "
                          f"{len(views['errors'])} errors"),
        ("viewer C-FIND p50 / p99 / max",
         f"{percentile(lat, 50):.1f} / {percentile(lat, 99):.1f} / {max(lat):.1f} ms"
         if lat else "-"),
        ("minipacs CPU", f"{cpu:.1f} s, {cpu * 1000 / total:.2f} ms/object"),
        (f"peak RSS, {sampler.processes} processes summed",
         f"{sampler.peak_rss_kib / KIB:.1f} MiB sampled, {hwm_kib / KIB:.1f} MiB VmHWM"),
        ("peak PSS (keeper + worker)", f"{peak_pss:.1f} MiB "
                                       f"({'PASS' if peak_pss <= PSS_FLOOR_MIB else 'FAIL'}: "
                                       f"floor <= {PSS_FLOOR_MIB:.0f} MiB)"),
        ("memory samples", f"{sampler.samples} (every {SAMPLE_S * 1000:.0f} ms)"),
        ("held connections open", f"mean {held['open_mean']:.0f}, min {held['open_min']} "
                                  f"of {IDLE_TCP + STALLED_TLS}"),
        ("held: dropped by server / opened",
         f"idle {held['closed'].get('idle', 0)}, TLS silent {held['closed'].get('tls', 0)}, "
         f"TLS partial hello {held['closed'].get('hello', 0)} / {held['opened']} "
         f"({held['connect_errors']} connect errors)"),
    ]
    for name, value in rows:
        print(f"  {name:<34} {value}")
    print()
    if problems:
        print(f"FAIL: {len(problems)} problem(s):")
        for message in problems[:40]:
            print(f"  {message}")
        print(f"server log: {server_log}")
        return 1
    print("PASS: 0 failed sends, every object byte-exact, the index and the viewer right, "
          f"peak PSS <= {PSS_FLOOR_MIB:.0f} MiB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--objects", type=int, default=1000, help="objects per sender")
    parser.add_argument("--size", type=int, default=32 * KIB,
                        help="typical pixel bytes of an object (each is size/2 to 2 x size)")
    parser.add_argument("--reopen-delay", type=float, default=1.0,
                        help="seconds before a held connection the server dropped is opened again")
    parser.add_argument("--max-pending", type=int,
                        help="max_pending_connections (default: minipacs's own, 64)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minipacs-load"))
    parser.add_argument("--keep", action="store_true", help="keep the run's store and logs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not MINIPACS.exists():
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=REPO)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir.stat().st_uid == os.getuid():
        args.workdir.chmod(0o755)  # a root start's worker reads the CA file
    print(f"work dir: {args.workdir}", flush=True)
    children = Children(STOP_TIMEOUT_S)
    code = 2
    try:
        code = run(args, args.workdir, children)
        return code
    except BenchError as e:
        print(f"\nload.py: ERROR: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if code == 0 and not args.keep:
            shutil.rmtree(args.workdir / "run", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
