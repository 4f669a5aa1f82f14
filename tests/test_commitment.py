"""Storage commitment (issue 14), against real peers.

As SCU: objects stored into minipacs are forwarded to Orthanc by a rule
with `commit = true`; minipacs then asks Orthanc for storage commitment
and Orthanc answers on a new association; every queue entry must end
`done` with a `committed` audit line.

As SCP: a pynetdicom modality asks minipacs to commit what it stored and
receives the report on its own association, or (when it released it) on a
new association minipacs opens to the modality's `[[peer]]` entry, also
after a restart of minipacs in between (the request is kept in the index).
Orthanc, as a requester through its REST API, checks the same from the
other side.
"""

import json
import pathlib
import sqlite3
import subprocess
import threading
import time

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

from conftest import (
    Orthanc,
    audit,
    dcmtk,
    dcmtk_env,
    free_port,
    kill_9,
    make_ct,
    queue_list,
    serve,
    start_unmanaged,
    wait_until,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT_INSTANCE = 0x0112
ROOT_UID = "1.2.826.0.1.3680043.10.141"


# --- helpers ---------------------------------------------------------------

def corpus(folder, n, tag, size=2048):
    """n small CT objects in one study; returns [(path, SOP Instance UID)]."""
    folder.mkdir(parents=True, exist_ok=True)
    study = f"{ROOT_UID}.{tag}"
    out = []
    for i in range(n):
        uid = f"{study}.{i + 1}"
        out.append((make_ct(folder / f"CT{i}.dcm", uid, size=size, study=study), uid))
    return out


def storescu(port, files, aet="STORESCU"):
    r = subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "MINIPACS", "127.0.0.1", str(port),
                        *(str(f) for f in files)], capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def pending_commitments(store):
    """The commitment requests minipacs still has to report (its index)."""
    db = sqlite3.connect(f"file:{pathlib.Path(store) / 'index.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT requester, transaction_uid, attempts, reason FROM commitment").fetchall()
    finally:
        db.close()


def commitment_request(transaction, references):
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def references_of(sequence):
    return sorted((str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in sequence)


class Reports:
    """Collects the N-EVENT-REPORTs a pynetdicom handler receives, with the
    association (its remote AE title, whether we requested it) each came on."""

    def __init__(self):
        self.got = []
        self.arrived = threading.Event()
        self.lock = threading.Lock()

    def handler(self, event):
        info = event.event_information
        with self.lock:
            self.got.append({
                "event_type": event.request.EventTypeID,
                "sop_class": str(event.request.AffectedSOPClassUID),
                "sop_instance": str(event.request.AffectedSOPInstanceUID),
                "info": info,
                "remote_ae": event.assoc.remote["ae_title"],
                "our_association": event.assoc.is_requestor,
                "time": time.monotonic(),
            })
        self.arrived.set()
        return 0x0000, None

    def wait(self, timeout):
        assert self.arrived.wait(timeout), f"no N-EVENT-REPORT within {timeout} s"
        with self.lock:
            return list(self.got)


def modality_ae(aetitle="MODALITY"):
    ae = AE(ae_title=aetitle)
    ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.dimse_timeout = 30
    ae.acse_timeout = 10
    return ae


def modality_scp(port, reports, aetitle="MODALITY"):
    """The modality's own SCP: it accepts minipacs taking the SCP role of
    the commitment class (the report on a new association)."""
    ae = AE(ae_title=aetitle)
    ae.add_supported_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                             scu_role=True, scp_role=True)
    return ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])


def store_with_pynetdicom(assoc, files):
    for path in files:
        status = assoc.send_c_store(pydicom.dcmread(path))
        assert status and status.Status == 0x0000, status


def ask(port, references, transaction, aetitle="MODALITY"):
    """Opens an association as `aetitle`, sends one N-ACTION and releases
    the association as soon as it is answered, never answering a report
    sent on it: one that comes before the release is held until the
    association is released (pynetdicom then sends no response), one that
    comes during it is ignored. Returns whether one came."""
    released = threading.Event()
    offered = []

    def hold(_event):
        offered.append(time.monotonic())
        released.wait(10)
        return 0x0110, None

    assoc = modality_ae(aetitle).associate("127.0.0.1", port, ae_title="MINIPACS",
                                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, hold)])
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_action(commitment_request(transaction, references), 1,
                                             StorageCommitmentPushModel, COMMITMENT_INSTANCE)
    finally:
        assoc.release()
        released.set()
    assert status and status.Status == 0x0000, status
    return bool(offered)


def check_report(report, transaction, committed, failed):
    """An N-EVENT-REPORT of storage commitment: event type 1 when all
    committed, 2 with failures; the instances in the right sequences."""
    assert report["sop_class"] == str(StorageCommitmentPushModel)
    assert report["sop_instance"] == COMMITMENT_INSTANCE
    info = report["info"]
    assert str(info.TransactionUID) == transaction
    assert report["event_type"] == (2 if failed else 1), report["event_type"]
    assert references_of(info.get("ReferencedSOPSequence", [])) == sorted(committed)
    got_failed = info.get("FailedSOPSequence", [])
    assert references_of(got_failed) == sorted(failed)
    for item in got_failed:
        assert item.FailureReason == NO_SUCH_OBJECT_INSTANCE, hex(item.FailureReason)


# --- minipacs as storage commitment SCU ------------------------------------

def test_forwarded_objects_are_committed_by_orthanc(server_factory, tmp_path):
    """20 objects stored by storescu, forwarded to Orthanc with commit =
    true: Orthanc holds them all, and after its report (on a new
    association) every queue entry is `done`, each with a `delivered` then
    a `committed` audit line."""
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"minipacs": ("MINIPACS", port)}, sync=False, verbose=True)
    try:
        srv = serve(server_factory, tmp_path / "mp", port=port, peers={"ORTHANC": orthanc.dicom},
                    forwards=[{"to": "ORTHANC", "commit": True}])
        files = corpus(tmp_path / "src", 20, "1")
        uids = sorted(u for _, u in files)
        t0 = time.monotonic()
        storescu(srv.port, [f for f, _ in files])

        def committed():
            return sorted(a["sop_instance_uid"] for a in audit(srv, "forward") if a.get("outcome") == "committed")

        wait_until(lambda: committed() == uids, 60,
                   why=lambda: f"committed {len(committed())} of 20\n{srv.logs()[-3000:]}\n{orthanc.logs()[-3000:]}")
        elapsed = time.monotonic() - t0
        held = orthanc.instances()
        assert sorted(held) == uids
        for uid in uids:
            assert orthanc.rest("GET", f"/instances/{held[uid]}")["MainDicomTags"]["SOPInstanceUID"] == uid
        entries = queue_list(srv)
        assert sorted(e["sop_instance_uid"] for e in entries) == uids
        assert {e["state"] for e in entries} == {"done"}, [(e["sop_instance_uid"], e["state"]) for e in entries]
        assert {e["destination"] for e in entries} == {"ORTHANC"}
        lines = audit(srv, "forward")
        for uid in uids:
            outcomes = [a["outcome"] for a in lines if a["sop_instance_uid"] == uid]
            assert outcomes == ["delivered", "committed"], (uid, outcomes)
        logs = srv.logs()
        assert "storage commitment asked" in logs
        assert "storage commitment report" in logs
        print(f"\n20 objects stored, forwarded and committed by Orthanc in {elapsed:.2f} s; "
              f"{logs.count('storage commitment asked')} commitment request(s)")
    finally:
        orthanc.stop()


# --- minipacs as storage commitment SCP ------------------------------------

def test_report_on_the_request_association(server_factory, tmp_path):
    """The modality stores 2 objects, then asks for commitment of those, one
    never stored and one stored object under another SOP class, and keeps
    its association open: the report (event type 2) arrives on it."""
    srv = serve(server_factory, tmp_path / "mp")
    files = corpus(tmp_path / "src", 2, "2")
    reports = Reports()
    assoc = modality_ae().associate("127.0.0.1", srv.port, ae_title="MINIPACS",
                                    evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    try:
        store_with_pynetdicom(assoc, [f for f, _ in files])
        stored = [(CT, u) for _, u in files]
        never = (CT, f"{ROOT_UID}.2.999")
        wrong_class = (MR, files[0][1])
        transaction = generate_uid()
        t0 = time.monotonic()
        status, _ = assoc.send_n_action(commitment_request(transaction, [*stored, never, wrong_class]), 1,
                                        StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status and status.Status == 0x0000, status
        got = reports.wait(10)
        print(f"\nreport on the request's association {got[0]['time'] - t0:.3f} s after the N-ACTION")
        assert assoc.is_established
    finally:
        assoc.release()
    assert len(got) == 1, got
    assert got[0]["our_association"]
    check_report(got[0], transaction, committed=stored, failed=[never, wrong_class])
    srv.wait_log("storage commitment report delivered on the request's association")
    wait_until(lambda: pending_commitments(srv.store) == [], 5,
               why=lambda: f"still pending: {pending_commitments(srv.store)}")


def test_report_on_a_new_association_after_release(server_factory, tmp_path):
    """The modality releases right after the N-ACTION answer: minipacs opens
    an association to its [[peer]] entry, taking the SCP role, and delivers
    the report there (event type 1: all committed), once. A requester with
    no [[peer]] entry gets none, and the log says why."""
    scp_port = free_port()
    reports = Reports()
    scp = modality_scp(scp_port, reports)
    try:
        srv = serve(server_factory, tmp_path / "mp", peers={"MODALITY": scp_port})
        files = corpus(tmp_path / "src", 3, "3")
        storescu(srv.port, [f for f, _ in files], aet="MODALITY")
        stored = [(CT, u) for _, u in files]
        transaction = generate_uid()
        t0 = time.monotonic()
        offered = ask(srv.port, stored, transaction)
        got = reports.wait(10)
        elapsed = got[0]["time"] - t0
        print(f"\nreport on a new association {elapsed:.3f} s after the N-ACTION "
              f"(offered first on the released one: {offered})")
        assert len(got) == 1, got
        assert not got[0]["our_association"]
        assert got[0]["remote_ae"] == "MINIPACS"
        check_report(got[0], transaction, committed=stored, failed=[])
        srv.wait_log("storage commitment report not taken on the request's association; sending it on a new one")
        srv.wait_log("storage commitment report delivered")
        wait_until(lambda: pending_commitments(srv.store) == [], 5,
                   why=lambda: f"still pending: {pending_commitments(srv.store)}")
        # A requester that is not a [[peer]] gets no report on a new
        # association (the log says why); its request stays pending.
        stranger = generate_uid()
        ask(srv.port, stored, stranger, aetitle="STRANGER")
        srv.wait_log("STRANGER is not a [[peer]]")
        assert [(r, t) for r, t, _a, _w in pending_commitments(srv.store)] == [("STRANGER", stranger)]
        # Delivered once: nothing more comes.
        time.sleep(3)
        assert len(reports.got) == 1, reports.got
    finally:
        scp.shutdown()


def test_orthanc_asks_for_commitment_through_its_rest_api(server_factory, tmp_path):
    """Orthanc, a real requester: it asks minipacs to commit 3 stored
    objects and one it never sent; its storage commitment job shows the 3
    in Success and the other in Failures with reason 0x0112 (274)."""
    port = free_port()
    orthanc_root = tmp_path / "orthanc"
    # minipacs must know Orthanc (for the report on a new association)
    # before Orthanc starts, and Orthanc minipacs: fix both ports first.
    orthanc = Orthanc(orthanc_root, modalities={"minipacs": ("MINIPACS", port)}, sync=False, verbose=True)
    try:
        srv = serve(server_factory, tmp_path / "mp", port=port, peers={"ORTHANC": orthanc.dicom})
        files = corpus(tmp_path / "src", 3, "4")
        storescu(srv.port, [f for f, _ in files])
        stored = [[CT, u] for _, u in files]
        never = [CT, f"{ROOT_UID}.4.999"]
        t0 = time.monotonic()
        job = orthanc.rest("POST", "/modalities/minipacs/storage-commitment",
                           {"DicomInstances": [*stored, never], "Timeout": 10})
        assert job["Path"].startswith("/storage-commitment/"), job

        def answer():
            a = orthanc.rest("GET", job["Path"])
            return a if a.get("Status") not in ("Pending", None) else None

        wait_until(answer, 30, every=0.2,
                   why=lambda: f"{orthanc.rest('GET', job['Path'])}\n{srv.logs()[-3000:]}\n{orthanc.logs()[-2000:]}")
        elapsed = time.monotonic() - t0
        result = answer()
        print(f"\nOrthanc's storage commitment answered in {elapsed:.2f} s: {json.dumps(result)}")
        success = sorted((s["SOPClassUID"], s["SOPInstanceUID"]) for s in result["Success"])
        assert success == sorted(map(tuple, stored)), result
        failures = [(f["SOPClassUID"], f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]]
        assert failures == [(never[0], never[1], NO_SUCH_OBJECT_INSTANCE)], result
        assert result["Status"] == "Failure", result
        srv.wait_log("storage commitment report delivered")
        wait_until(lambda: pending_commitments(srv.store) == [], 5,
                   why=lambda: f"still pending: {pending_commitments(srv.store)}")
    finally:
        orthanc.stop()


def test_a_pending_report_survives_a_restart(minipacs, tmp_path):
    """The modality asks and releases while its own SCP is not listening,
    so minipacs cannot deliver the report; minipacs is killed (-9, keeper
    and worker), the modality's SCP starts, minipacs starts again on the
    same configuration: the report arrives, from the request kept in the
    index."""
    scp_port = free_port()
    root = tmp_path / "mp"
    files = corpus(tmp_path / "src", 2, "5")
    stored = [(CT, u) for _, u in files]
    never = (CT, f"{ROOT_UID}.5.999")
    transaction = generate_uid()
    srv = serve(start_unmanaged(minipacs), root, peers={"MODALITY": scp_port})
    try:
        storescu(srv.port, [f for f, _ in files], aet="MODALITY")
        ask(srv.port, [*stored, never], transaction)
        srv.wait_log("storage commitment report not delivered; trying again later")
        pending = pending_commitments(srv.store)
        assert [(r, t) for r, t, _a, _why in pending] == [("MODALITY", transaction)], pending
        print(f"\nbefore the kill: {pending}")
        kill_9(srv)
    finally:
        srv.stop()
    reports = Reports()
    scp = modality_scp(scp_port, reports)
    try:
        t0 = time.monotonic()
        again = serve(start_unmanaged(minipacs, port=srv.port), root, peers={"MODALITY": scp_port})
        try:
            got = reports.wait(15)
            print(f"report delivered {got[0]['time'] - t0:.2f} s after the restart began")
            assert len(got) == 1, got
            assert not got[0]["our_association"]
            check_report(got[0], transaction, committed=stored, failed=[never])
            again.wait_log("storage commitment report delivered")
            wait_until(lambda: pending_commitments(again.store) == [], 5,
                       why=lambda: f"still pending: {pending_commitments(again.store)}")
        finally:
            code = again.stop()
            assert code == 0, again.logs()[-3000:]
    finally:
        scp.shutdown()
