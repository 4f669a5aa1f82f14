"""Retention (issue 14): the store never fills, and nothing undelivered goes.

The store lives on a small tmpfs mounted for each test (CI runs as root);
studies of two ~1 MiB objects are sent one by one with `minipacs send`,
several times the filesystem's size in all, while a thread samples the
filesystem's free space. With a destination up (a pynetdicom storage SCP
recording what it receives and when), retention deletes whole delivered
studies, least recently received first, and the reserve never refuses
anything. With the destination down nothing may go: nothing is deleted,
the reserve refuses with A700 and the log and status say why. With no
[[forward]] rule at all, the oldest studies go outright.
"""

import datetime
import os
import subprocess
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt

import conftest
from conftest import audit, free_port, make_ct, wait_until, write_config

ROOT_UID = "1.2.826.0.1.3680043.10.142"
FS_MIB = 48
OBJECT = 1 << 20
PER_STUDY = 2
KEEP_FREE = 30
RESERVE = 5  # free_space_reserve_percent's default
# The senders' pace, MiB/s: an SD card's write speed. Unpaced, loopback
# into a tmpfs runs at some 500 MiB/s, which fills the margin between
# KEEP_FREE and the reserve (12 MiB) in about 25 ms, well inside one of
# retention's 250 ms ticks; a real card takes 10 to 40 MB/s.
RATE = 16


# --- helpers ---------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A FS_MIB tmpfs for the store, mounted for the test (CI runs as root).
    Ask for it before server_factory, so that it is unmounted after the
    server stopped."""
    folder = tmp_path / "small"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (this test needs root): {r.stderr}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def free_percent(path):
    st = os.statvfs(path)
    return st.f_bavail * 100.0 / st.f_blocks


class FreeSpaceSampler:
    """Samples a filesystem's free space (as minipacs computes it) every
    few milliseconds in a thread; keeps the lowest seen."""

    def __init__(self, path):
        self.path = path
        self.lowest = 100.0
        self.samples = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            self.lowest = min(self.lowest, free_percent(self.path))
            self.samples += 1
            time.sleep(0.002)

    def stop(self):
        self.stopping.set()
        self.thread.join()


def make_studies(folder, n, tag):
    """n studies of PER_STUDY ~1 MiB CT objects, each in its own folder;
    returns [(study UID, folder, [SOP Instance UIDs])] in sending order."""
    out = []
    for s in range(n):
        study = f"{ROOT_UID}.{tag}.{s + 1}"
        d = folder / f"study{s:03}"
        d.mkdir(parents=True)
        uids = []
        for i in range(PER_STUDY):
            uid = f"{study}.{i + 1}"
            make_ct(d / f"{i}.dcm", uid, size=OBJECT, study=study)
            uids.append(uid)
        out.append((study, d, uids))
    return out


RETENTION = f"[retention]\nkeep_free_percent = {KEEP_FREE}\n"


def serve(server_factory, tmp_path, store_fs, peers=None, forwards=()):
    """minipacs with [retention] on, its store on `store_fs`, its
    configuration and logs in `tmp_path`."""
    srv = conftest.serve(server_factory, tmp_path, peers, forwards, more=RETENTION, store=store_fs / "store")
    srv.fs = store_fs
    return srv


def parse_time(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def send(srv, folder):
    return subprocess.run([srv.binary, "send", "--aetitle", "MODALITY", "127.0.0.1", str(srv.port), str(folder)],
                          capture_output=True, text=True, timeout=120)


def stream(srv, studies, rate=None, stop_on_refusal=False):
    """Sends the studies one by one (a `minipacs send` each), at most `rate`
    MiB/s on average if given, sampling free space meanwhile. Returns
    (results, lowest free %, seconds, samples)."""
    sampler = FreeSpaceSampler(srv.fs)
    results = []
    t0 = time.monotonic()
    try:
        for k, (study, folder, _uids) in enumerate(studies):
            if rate:
                time.sleep(max(0.0, t0 + k * PER_STUDY * OBJECT / (rate << 20) - time.monotonic()))
            r = send(srv, folder)
            results.append((study, r))
            if stop_on_refusal and r.returncode != 0:
                break
    finally:
        sampler.stop()
    return results, sampler.lowest, time.monotonic() - t0, sampler.samples


def stored_uids(srv):
    return {p.name.split(".", 1)[1] for p in srv.stored_files()}


def check_deletions_oldest_first(deleted, studies):
    """Deleted studies appear in the audit in their sending order (least
    recently received first), each whole, with non-decreasing last
    received times."""
    order = {study: n for n, (study, _f, _u) in enumerate(studies)}
    positions = [order[d["study_instance_uid"]] for d in deleted]
    assert positions == sorted(positions), f"not oldest first: {positions}"
    assert len(set(positions)) == len(positions), "a study deleted twice"
    # Nothing newer went while an older one stayed: the deleted ones are
    # the first ones sent.
    assert positions == list(range(len(positions))), f"an older study was kept: {positions}"
    received = [parse_time(d["last_received"]) for d in deleted]
    assert received == sorted(received), [d["last_received"] for d in deleted]
    for d in deleted:
        assert d["objects"] == PER_STUDY, d
        assert d["bytes"] >= PER_STUDY * OBJECT, d
        assert d["reason"] == f"free space below {KEEP_FREE} %", d
        assert d["patient_id"] == "MP0001", d


class Destination:
    """A pynetdicom storage SCP that records each SOP Instance UID it
    receives with the wall-clock time it answered it."""

    def __init__(self, aetitle="PACS"):
        self.port = free_port()
        self.received = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=aetitle)
        ae.maximum_pdu_size = 0
        for c in StoragePresentationContexts:
            ae.add_supported_context(c.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event):
        with self.lock:
            self.received.setdefault(event.request.AffectedSOPInstanceUID, time.time())
        return 0x0000

    def snapshot(self):
        with self.lock:
            return dict(self.received)

    def stop(self):
        self.server.shutdown()


# --- the tests -------------------------------------------------------------

def test_a_stream_with_the_destination_up_never_fills_the_store(small_fs, server_factory, tmp_path):
    """4 x the filesystem's size in studies, forwarded to a destination
    that is up: delivered studies are deleted oldest first, each only after
    all its objects reached the destination, free space never goes below
    the reserve and no object is refused."""
    dest = Destination()
    try:
        srv = serve(server_factory, tmp_path, small_fs, {"PACS": dest.port}, [{"to": "PACS"}])
        n = 4 * FS_MIB // PER_STUDY
        studies = make_studies(tmp_path / "src", n, "6")
        results, lowest, elapsed, samples = stream(srv, studies, rate=RATE)
        refused = [(s, r.stderr[-300:]) for s, r in results if r.returncode != 0]
        all_uids = {u for _s, _f, uids in studies for u in uids}
        wait_until(lambda: set(dest.snapshot()) >= all_uids, 60,
                   why=lambda: f"{len(dest.snapshot())} of {len(all_uids)} delivered\n{srv.logs()[-3000:]}")
        time.sleep(1)  # a last sweep
        deleted = audit(srv, "deleted")
        got = dest.snapshot()
        print(f"\n{n} studies ({n * PER_STUDY} MiB) into a {FS_MIB} MiB store in {elapsed:.1f} s "
              f"({n * PER_STUDY / elapsed:.1f} MiB/s); {len(deleted)} studies deleted; lowest free space "
              f"{lowest:.1f} % ({samples} samples); now {free_percent(srv.fs):.1f} %; {len(refused)} refused")
        assert not refused, refused
        assert lowest >= RESERVE, f"free space fell to {lowest:.1f} %"
        # The store cannot hold the stream: most of it was deleted.
        assert len(deleted) >= n - FS_MIB // PER_STUDY, len(deleted)
        check_deletions_oldest_first(deleted, studies)
        by_study = {s: uids for s, _f, uids in studies}
        lag = []
        for d in deleted:
            uids = by_study[d["study_instance_uid"]]
            missing = [u for u in uids if u not in got]
            assert not missing, f"deleted before delivery: {missing}"
            when = parse_time(d["time"])
            for u in uids:
                assert got[u] <= when + 0.01, f"{u} reached the destination {got[u] - when:.3f} s after its deletion"
                lag.append(when - got[u])
        print(f"delivery to deletion: min {min(lag):.2f} s, max {max(lag):.2f} s")
        # What is deleted is gone; the rest is all there.
        gone = {u for d in deleted for u in by_study[d["study_instance_uid"]]}
        assert stored_uids(srv) == all_uids - gone
        assert free_percent(srv.fs) >= RESERVE
    finally:
        dest.stop()


def test_with_the_destination_down_nothing_is_deleted_and_the_reserve_refuses(small_fs, server_factory, tmp_path):
    """The only destination is down: no study may be deleted, so none is;
    once the store is at its reserve, objects are refused with A700, and
    the log and the status line say retention cannot make room."""
    dead = free_port()
    srv = serve(server_factory, tmp_path, small_fs, {"PACS": dead}, [{"to": "PACS"}])
    n = 2 * FS_MIB // PER_STUDY
    studies = make_studies(tmp_path / "src", n, "7")
    results, lowest, elapsed, _samples = stream(srv, studies, stop_on_refusal=True)
    refused = [r for _s, r in results if r.returncode != 0]
    accepted = len(results) - len(refused)
    print(f"\ndestination down: {accepted} studies accepted, then refused after {elapsed:.1f} s; "
          f"free space {free_percent(srv.fs):.1f} % (lowest {lowest:.1f} %)")
    assert refused, "the store never refused anything"
    # Refused at the reserve, not before.
    assert free_percent(srv.fs) < RESERVE, free_percent(srv.fs)
    assert "A700" in refused[0].stderr, refused[0].stderr[-2000:]
    # The store filled up to the reserve first (each study is ~4 % of it).
    assert accepted >= (FS_MIB * (100 - KEEP_FREE) // 100) // PER_STUDY, accepted
    # Still refused a moment later: nothing was made room for.
    time.sleep(1)
    again = send(srv, studies[-1][1])
    assert again.returncode != 0 and "A700" in again.stderr, again.stderr[-2000:]
    srv.wait_log("retention cannot make room")
    wait_until(lambda: "retention" in (srv.status_path.read_text() if srv.status_path.exists() else ""), 10,
               why=lambda: srv.status_path.read_text() if srv.status_path.exists() else "no status file")
    status = srv.status_path.read_text()
    print(f"status: {status.strip()}")
    assert audit(srv, "deleted") == []
    kept = {u for _s, _f, uids in studies[:accepted] for u in uids}
    assert stored_uids(srv) >= kept


def test_without_forward_rules_the_oldest_studies_go(small_fs, server_factory, tmp_path, minipacs):
    """No [[forward]] rule: `config check` says retention deletes outright,
    and it does, oldest first, with nothing refused."""
    (tmp_path / "probe").mkdir()
    probe = write_config(tmp_path / "probe", more=RETENTION)
    r = subprocess.run([minipacs, "config", "check", str(probe)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    print(f"\nconfig check: {out.strip()}")
    assert r.returncode == 0, out
    assert "note: [retention] without any [[forward]] rule" in out, out
    srv = serve(server_factory, tmp_path, small_fs)
    n = 3 * FS_MIB // PER_STUDY
    studies = make_studies(tmp_path / "src", n, "8")
    results, lowest, elapsed, samples = stream(srv, studies, rate=RATE)
    refused = [(s, r.stderr[-300:]) for s, r in results if r.returncode != 0]
    time.sleep(1)
    deleted = audit(srv, "deleted")
    print(f"{n} studies ({n * PER_STUDY} MiB) in {elapsed:.1f} s ({n * PER_STUDY / elapsed:.1f} MiB/s); "
          f"{len(deleted)} deleted; lowest free space {lowest:.1f} % ({samples} samples); {len(refused)} refused")
    assert not refused, refused
    assert lowest >= RESERVE, f"free space fell to {lowest:.1f} %"
    assert len(deleted) >= n - FS_MIB // PER_STUDY, len(deleted)
    check_deletions_oldest_first(deleted, studies)
    by_study = {s: uids for s, _f, uids in studies}
    all_uids = {u for _s, _f, uids in studies for u in uids}
    gone = {u for d in deleted for u in by_study[d["study_instance_uid"]]}
    assert stored_uids(srv) == all_uids - gone
    assert free_percent(srv.fs) >= KEEP_FREE - 2 * PER_STUDY * 100 / FS_MIB
