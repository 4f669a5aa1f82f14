"""Store and forward (issue 14), against real peers.

Objects stored into minipacs by dcmtk's storescu are queued by the
`[[forward]]` rules and sent on by one worker per destination. The
destinations here are real: Orthanc (Debian's PACS) as the hospital PACS,
a dcmtk storescp, and pynetdicom storage SCPs that take their time,
accept only some SOP classes, or are not there at all. Every test looks at
what arrived at the destination (byte-exact where it says so), at the
queue through `minipacs queue` and the index, and at the audit trail.
"""

import pathlib
import sqlite3
import subprocess
import threading
import time

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt

from conftest import (
    Orthanc,
    audit,
    config_text,
    data_set_offset,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    kill_9,
    make_ct,
    queue,
    queue_list,
    serve,
    start_unmanaged,
    wait_until,
)
from test_retrieve import Storescp

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
ROOT_UID = "1.2.826.0.1.3680043.10.140"


# --- objects ---------------------------------------------------------------

def corpus(folder, n, tag, studies=1, modality="CT", size=2048):
    """n small objects in `folder`, spread over `studies` studies; CT by
    default, MR with modality="MR". Returns [(path, SOP Instance UID)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        study = f"{ROOT_UID}.{tag}.{i % studies}"
        uid = f"{study}.{i}"
        path = make_ct(folder / f"{modality}{i}.dcm", uid, size=size, study=study)
        if modality != "CT":
            ds = pydicom.dcmread(path)
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MR
            ds.Modality = modality
            ds.save_as(path, enforce_file_format=True)
        out.append((path, uid))
    return out


def storescu(port, files, aet="STORESCU"):
    r = subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "MINIPACS", "127.0.0.1", str(port),
                        *(str(f) for f in files)], capture_output=True, text=True, env=dcmtk_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def data_set_of(part10):
    """The data set bytes of Part-10 bytes (everything after group 0002)."""
    return part10[data_set_offset(None, part10):]


# --- minipacs with forwarding rules ----------------------------------------

def queue_status(srv):
    """`minipacs queue status` as {destination: (queued, sent, done, failed)}."""
    lines = queue(srv, "status").splitlines()
    assert lines[0].split()[:5] == ["destination", "queued", "sent", "done", "failed"], lines
    return {f[0]: tuple(int(x) for x in f[1:5]) for f in (line.split() for line in lines[1:])}


def counts(srv):
    """{(destination, state): entries}, read from the index (read-only)."""
    db = sqlite3.connect(f"file:{srv.store / 'index.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return {(d, s): n for d, s, n in
                db.execute("SELECT destination, state, count(*) FROM forward GROUP BY 1, 2")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def wait_audited(srv, n, timeout=20):
    wait_until(lambda: len(audit(srv, "forward")) >= n, timeout,
               why=lambda: f"{len(audit(srv, 'forward'))} forward audit lines, wanted {n}")
    return audit(srv, "forward")


def stored_data_sets(srv):
    """{SOP Instance UID: data set bytes} of what minipacs stored."""
    return {p.name.split(".", 1)[1]: dataset_bytes(p) for p in srv.stored_files()}


# --- destinations ----------------------------------------------------------

class Scp:
    """A pynetdicom storage SCP that records what it receives (SOP Instance
    UID and data set bytes exactly as received), optionally taking `delay`
    seconds per object and accepting only the SOP classes `only`."""

    def __init__(self, aetitle, delay=0.0, only=None, port=None):
        self.port = port or free_port()
        self.delay = delay
        self.received = []
        self.associations = 0
        self.lock = threading.Lock()
        ae = AE(ae_title=aetitle)
        for c in StoragePresentationContexts:
            if only is None or c.abstract_syntax in only:
                ae.add_supported_context(c.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self.on_store), (evt.EVT_ACCEPTED, self.on_accepted)])

    def on_accepted(self, _event):
        with self.lock:
            self.associations += 1

    def on_store(self, event):
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.received.append((event.request.AffectedSOPInstanceUID, event.request.DataSet.getvalue()))
        return 0x0000

    def uids(self):
        with self.lock:
            return [u for u, _ in self.received]

    def stop(self):
        self.server.shutdown()


# --- the tests -------------------------------------------------------------

def test_300_objects_forwarded_to_orthanc_byte_identical(server_factory, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", aetitle="PACS", sync=False, http_timeout=60)
    try:
        srv = serve(server_factory, tmp_path / "mp", {"PACS": orthanc.dicom}, [{"to": "PACS"}])
        files = corpus(tmp_path / "src", 300, "1", studies=4)
        started = time.monotonic()
        storescu(srv.port, [f for f, _ in files])
        stored_in = time.monotonic() - started
        wait_until(lambda: counts(srv).get(("PACS", "done"), 0) == 300, 120,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        forwarded_in = time.monotonic() - started
        print(f"\n300 objects: stored in {stored_in:.2f} s, all forwarded to Orthanc {forwarded_in:.2f} s after storescu started")

        assert queue_status(srv) == {"PACS": (0, 0, 300, 0)}
        # The store's folder names the queue as well as the configuration.
        r = subprocess.run([srv.binary, "queue", "--output-directory", str(srv.store), "status"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == queue(srv, "status"), r.stdout + r.stderr
        entries = queue_list(srv)
        assert len(entries) == 300
        assert {e["sop_instance_uid"] for e in entries} == {u for _, u in files}
        for e in entries:
            assert (e["destination"], e["state"], e["status"], e["attempts"]) == ("PACS", "done", "0000", 0), e
            assert e["sop_class_uid"] == CT
            assert (srv.store / e["path"]).is_file() or pathlib.Path(e["path"]).is_file(), e
        assert len({e["study_instance_uid"] for e in entries}) == 4

        stored = stored_data_sets(srv)
        assert sorted(stored) == sorted(u for _, u in files)
        at_orthanc = orthanc.instances()
        assert sorted(at_orthanc) == sorted(stored)
        for uid, oid in at_orthanc.items():
            assert data_set_of(orthanc.rest("GET", f"/instances/{oid}/file", raw=True)) == stored[uid], uid

        lines = wait_audited(srv, 300)
        assert len(lines) == 300, lines[-3:]
        assert {line["sop_instance_uid"] for line in lines} == set(stored)
        for line in lines:
            assert (line["destination"], line["outcome"], line["status"], line["reason"], line["attempts"]) == \
                ("PACS", "delivered", "0000", None, 1), line
            assert line["sop_class_uid"] == CT
        logs = srv.logs()
        assert logs.count("forwarded") >= 300
        assert "forward destination unavailable" not in logs
    finally:
        orthanc.stop()


def test_orthanc_stopped_mid_stream_gets_everything_when_back(server_factory, tmp_path):
    """A modality sends 200 objects in 20 associations of 10, a quarter of
    a second apart; Orthanc is stopped once it has 20 of them and started
    again 20 s later: by then the worker has failed several times with
    growing pauses (2, 4, 8, 16 s less jitter), not in a loop. Every object
    arrives, each is delivered once as far as minipacs knows, and the status
    line and the log say what happened."""
    orthanc = Orthanc(tmp_path / "orthanc", aetitle="PACS", sync=True, http_timeout=60)
    down_for = 20
    total = 200
    try:
        srv = serve(server_factory, tmp_path / "mp", {"PACS": orthanc.dicom}, [{"to": "PACS"}])
        objects = corpus(tmp_path / "src", total, "2", studies=3)
        fed = []

        def feed():
            for i in range(0, total, 10):
                storescu(srv.port, [f for f, _ in objects[i:i + 10]])
                fed.append(i + 10)
                time.sleep(0.25)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            wait_until(lambda: orthanc.count() >= 20, 30, why=lambda: f"{counts(srv)}")
            orthanc.stop()
        finally:
            feeder.join(timeout=60)
        stopped = time.monotonic()
        at_stop = counts(srv)
        print(f"\nOrthanc stopped with {at_stop.get(('PACS', 'done'), 0)} of {total} delivered")
        assert fed[-1] == total
        assert at_stop.get(("PACS", "queued"), 0) > 0, "Orthanc took everything before it was stopped"

        # While Orthanc is away: the entries wait, the oldest says why, the
        # status line says since when.
        wait_until(lambda: "PACS retrying since" in (srv.status_path.read_text() if srv.status_path.exists() else ""),
                   10, why=lambda: srv.status_path.read_text() if srv.status_path.exists() else "no status file")
        time.sleep(max(0, down_for - (time.monotonic() - stopped)))
        waiting = queue_list(srv, "--state", "queued")
        assert waiting and len(waiting) == at_stop[("PACS", "queued")], (len(waiting), at_stop)
        tried = [e for e in waiting if e["attempts"] > 0]
        assert tried, waiting[:3]
        assert any("refused" in (e["reason"] or "").lower() for e in tried), tried
        status = queue_status(srv)["PACS"]
        assert status[0] == len(waiting) and status[3] == 0, status
        assert srv.logs().count("forward destination unavailable") == 1

        orthanc.start()
        back = time.monotonic()
        wait_until(lambda: counts(srv).get(("PACS", "done"), 0) == total, 60,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        print(f"down {back - stopped:.1f} s; everything delivered {time.monotonic() - back:.1f} s after Orthanc was back")
        assert sorted(orthanc.instances()) == sorted(u for _, u in objects)
        assert queue_status(srv) == {"PACS": (0, 0, total, 0)}

        lines = wait_audited(srv, total)
        assert len(lines) == total and all(line["outcome"] == "delivered" for line in lines)
        assert len({line["sop_instance_uid"] for line in lines}) == total, "an object was delivered twice"
        # Attempts that failed while Orthanc was away: a handful of rounds
        # of growing pauses, not a retry loop.
        retries = sum(line["attempts"] - 1 for line in lines)
        print(f"failed attempts while Orthanc was away: {retries}")
        assert 3 <= retries <= 8, retries
        logs = srv.wait_log("forward destination back")
        assert logs.count("forward destination unavailable") == 1
        assert logs.count("forward destination back") == 1
        wait_until(lambda: "PACS ok" in srv.status_path.read_text(), 10, why=lambda: srv.status_path.read_text())
    finally:
        orthanc.stop()


def test_kill_9_mid_forward_then_restart_delivers_everything(minipacs, tmp_path):
    """minipacs (keeper and worker) killed with SIGKILL while it forwards to
    a destination that takes 50 ms per object: after a restart every object
    arrives, byte-identical, and the ones sent twice are no more than were
    in flight unrecorded (a batch: 64)."""
    dest = Scp("SLOWPACS", delay=0.05)
    root = tmp_path / "mp"
    try:
        files = corpus(tmp_path / "src", 200, "4", studies=2)
        srv = serve(start_unmanaged(minipacs), root, {"SLOWPACS": dest.port}, [{"to": "SLOWPACS"}])
        try:
            storescu(srv.port, [f for f, _ in files])
            stored = stored_data_sets(srv)
            wait_until(lambda: len(dest.uids()) >= 40, 30, why=lambda: srv.logs()[-3000:])
            kill_9(srv)
        finally:
            srv.stop()
        before = len(dest.uids())
        print(f"\nkilled after {before} of 200 objects had arrived")
        assert before < 200, "everything was sent before the kill"
        again = serve(start_unmanaged(minipacs, port=srv.port), root, {"SLOWPACS": dest.port},
                      [{"to": "SLOWPACS"}])
        try:
            wait_until(lambda: counts(again).get(("SLOWPACS", "done"), 0) == 200, 60,
                       why=lambda: f"{counts(again)}\n{again.logs()[-3000:]}")
            assert queue_status(again) == {"SLOWPACS": (0, 0, 200, 0)}
        finally:
            assert again.stop() == 0, again.logs()[-3000:]
    finally:
        dest.stop()
    uids = dest.uids()
    assert set(uids) == set(stored), "an object never arrived"
    duplicates = len(uids) - len(set(uids))
    print(f"sent twice after the restart: {duplicates}")
    assert duplicates <= 64, duplicates
    for uid, data in dest.received:
        assert data == stored[uid], f"{uid} changed on the way"


def test_a_dead_destination_does_not_slow_the_others(server_factory, tmp_path):
    """The same objects go to a dcmtk storescp from a minipacs that forwards
    only there, and from one that also forwards everything to a peer that
    refuses connections and to one that accepts them but never answers.
    Interleaved runs, best of three each: the second is not markedly slower.
    The dead destinations' entries wait, the refused one's with the reason."""
    n = 300
    fast = Storescp(tmp_path / "fast", aetitle="FAST")
    silent = socket_that_never_answers()
    dead_port = free_port()
    try:
        alone = serve(server_factory, tmp_path / "alone", {"FAST": fast.port}, [{"to": "FAST"}])
        beside = serve(server_factory, tmp_path / "beside",
                       {"FAST": fast.port, "DEAD": dead_port, "SILENT": silent.getsockname()[1]},
                       [{"to": "FAST"}, {"to": "DEAD"}, {"to": "SILENT"}])
        times = {"alone": [], "beside": []}
        for run in range(3):
            for name, srv in (("alone", alone), ("beside", beside)):
                files = corpus(tmp_path / f"src-{name}-{run}", n, f"5.{run}.{int(name == 'beside')}")
                started = time.monotonic()
                storescu(srv.port, [f for f, _ in files])
                wait_until(lambda: counts(srv).get(("FAST", "done"), 0) == n * (run + 1), 60, every=0.005,
                           why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
                times[name].append(time.monotonic() - started)
        best = {k: min(v) for k, v in times.items()}
        print(f"\n{n} objects stored and forwarded to FAST: alone {best['alone']:.2f} s, beside two dead "
              f"destinations {best['beside']:.2f} s (ratio {best['beside'] / best['alone']:.2f}; "
              f"all runs {times})")
        assert best["beside"] < 1.5 * best["alone"]

        status = queue_status(beside)
        assert status["FAST"] == (0, 0, 3 * n, 0), status
        assert status["DEAD"][0] == 3 * n and status["DEAD"][2] == 0, status
        assert status["SILENT"][0] == 3 * n and status["SILENT"][2] == 0, status
        dead = queue_list(beside, "--destination", "DEAD")
        assert all(e["state"] == "queued" for e in dead)
        tried = [e for e in dead if e["attempts"] > 0]
        assert tried and all("refused" in e["reason"].lower() for e in tried), tried[:3]
        assert "DEAD retrying since" in beside.status_path.read_text()
        assert "forward destination unavailable" in beside.logs()
        assert "FAST retrying" not in beside.status_path.read_text()
        assert queue_status(alone) == {"FAST": (0, 0, 3 * n, 0)}
    finally:
        fast.stop()
        silent.close()


def socket_that_never_answers():
    """A listening socket nobody accepts from: connections complete (the
    kernel's backlog) and then hear nothing."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def test_a_refused_sop_class_fails_for_good_and_retry_requeues_it(server_factory, tmp_path):
    """A destination that takes CT only: the CT objects are done, the MR ones
    failed with a reason at the first attempt and not tried again; `queue
    retry --destination` puts them back and they fail again (now on an
    association where no context at all was accepted)."""
    dest = Scp("CTONLY", only={CT})
    try:
        srv = serve(server_factory, tmp_path / "mp", {"CTONLY": dest.port}, [{"to": "CTONLY"}])
        cts = corpus(tmp_path / "ct", 10, "6.1")
        mrs = corpus(tmp_path / "mr", 10, "6.2", modality="MR")
        storescu(srv.port, [f for pair in zip(cts, mrs) for f, _ in pair])
        wait_until(lambda: counts(srv) == {("CTONLY", "done"): 10, ("CTONLY", "failed"): 10}, 30,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        assert sorted(dest.uids()) == sorted(u for _, u in cts)

        def check_failed():
            failed = queue_list(srv, "--state", "failed")
            assert sorted(e["sop_instance_uid"] for e in failed) == sorted(u for _, u in mrs)
            for e in failed:
                assert e["attempts"] == 1, e
                assert e["status"] is None, e
                assert "does not take SOP class" in e["reason"] and MR in e["reason"], e
            return failed

        check_failed()
        associations = dest.associations
        # Several backoff periods later: no retry loop, nothing new sent.
        time.sleep(7)
        failed = check_failed()
        assert dest.associations == associations
        assert queue_status(srv) == {"CTONLY": (0, 0, 10, 10)}
        lines = wait_audited(srv, 20)
        bad = [line for line in lines if line["outcome"] == "failed"]
        assert sorted(line["sop_instance_uid"] for line in bad) == sorted(u for _, u in mrs)
        assert all(line["status"] is None and "does not take SOP class" in line["reason"] for line in bad), bad[0]
        assert all(line["attempts"] == 1 for line in bad)

        # Nothing to retry: exit 1.
        done_id = queue_list(srv, "--state", "done")[0]["id"]
        assert "0 entries" in queue(srv, "retry", str(done_id), code=1)
        queue(srv, "retry", "--destination", "NOBODY", code=1)
        assert "10 entries queued again" in queue(srv, "retry", "--destination", "CTONLY")
        assert queue_status(srv)["CTONLY"][0] == 10
        wait_until(lambda: counts(srv).get(("CTONLY", "failed"), 0) == 10, 20,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        check_failed()
        assert len(wait_audited(srv, 30)) == 30
        assert sorted(dest.uids()) == sorted(u for _, u in cts), "an MR object reached the destination"

        # One retried by id, one forgotten.
        queue(srv, "retry", str(failed[0]["id"]))
        wait_until(lambda: counts(srv).get(("CTONLY", "failed"), 0) == 10, 20, why=lambda: f"{counts(srv)}")
        assert "forgotten" in queue(srv, "forget", str(failed[1]["id"]))
        queue(srv, "forget", str(failed[1]["id"]), code=1)
        assert queue_status(srv) == {"CTONLY": (0, 0, 10, 9)}
    finally:
        dest.stop()


def test_calling_and_modality_filters(server_factory, tmp_path):
    """Rules by sender (`calling`), by modality, and by both: each
    destination is queued exactly the objects its rule matches, and gets
    them."""
    dests = {ae: Scp(ae) for ae in ("BYAE", "BYMOD", "BOTH", "ALL")}
    try:
        srv = serve(server_factory, tmp_path / "mp", {ae: d.port for ae, d in dests.items()}, [
            {"to": "BYAE", "calling": ["US1", "CR2"]},
            {"to": "BYMOD", "modality": ["MR"]},
            {"to": "BOTH", "calling": ["US1"], "modality": ["CT"]},
            {"to": "ALL"},
        ])
        sent = {}  # (calling AE, modality) -> UIDs
        for n, (aet, modality) in enumerate([("US1", "CT"), ("OTHER", "CT"), ("OTHER", "MR"), ("CR2", "MR"),
                                             ("US1", "MR")]):
            objs = corpus(tmp_path / f"src{n}", 3, f"7.{n}", modality=modality)
            storescu(srv.port, [f for f, _ in objs], aet=aet)
            sent[(aet, modality)] = {u for _, u in objs}
        want = {
            "BYAE": sent[("US1", "CT")] | sent[("CR2", "MR")] | sent[("US1", "MR")],
            "BYMOD": sent[("OTHER", "MR")] | sent[("CR2", "MR")] | sent[("US1", "MR")],
            "BOTH": sent[("US1", "CT")],
            "ALL": set().union(*sent.values()),
        }
        total = sum(len(v) for v in want.values())
        wait_until(lambda: sum(counts(srv).values()) == total
                   and all(counts(srv).get((ae, "done"), 0) == len(v) for ae, v in want.items()), 30,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        for ae, uids in want.items():
            assert {e["sop_instance_uid"] for e in queue_list(srv, "--destination", ae)} == uids, ae
            assert sorted(dests[ae].uids()) == sorted(uids), ae
    finally:
        for d in dests.values():
            d.stop()


def test_a_rule_added_live_queues_what_is_stored_after_it(server_factory, tmp_path):
    """A configuration dropped with a new [[forward]] rule is applied while
    serving: objects stored before it are not queued, those after it are
    queued and delivered; dropped again without the rule, nothing more is
    queued."""
    dest = Scp("LATE")
    root = tmp_path / "mp"
    drop = root / "drop"
    drop.mkdir(parents=True)
    # The port in the file too: the command line's would not survive a
    # restart on the dropped file (and the file's differing would cause one).
    port = free_port()
    more = f'port = {port}\ndrop_directory = "{drop}"\n'
    try:
        srv = serve(server_factory, root, {"LATE": dest.port}, [], more=more, port=port)
        before = corpus(tmp_path / "before", 5, "8.1")
        storescu(srv.port, [f for f, _ in before])

        def apply(text):
            result = drop / "minipacs.toml.result"
            if result.exists():
                result.unlink()
            (drop / "minipacs.toml").write_text(text)
            wait_until(result.exists, 15, why="the drop was never answered")
            assert result.read_text().startswith("APPLIED\n"), result.read_text()
            assert "without a restart" in result.read_text(), result.read_text()

        apply(config_text(root, {"LATE": dest.port}, [{"to": "LATE"}], more))
        after = corpus(tmp_path / "after", 5, "8.2")
        storescu(srv.port, [f for f, _ in after])
        wait_until(lambda: counts(srv).get(("LATE", "done"), 0) == 5, 20,
                   why=lambda: f"{counts(srv)}\n{srv.logs()[-3000:]}")
        assert sorted(dest.uids()) == sorted(u for _, u in after)
        assert {e["sop_instance_uid"] for e in queue_list(srv)} == {u for _, u in after}

        apply(config_text(root, {"LATE": dest.port}, [], more))
        last = corpus(tmp_path / "last", 3, "8.3")
        storescu(srv.port, [f for f, _ in last])
        time.sleep(1)
        assert counts(srv) == {("LATE", "done"): 5}
        assert len(dest.uids()) == 5
    finally:
        dest.stop()
