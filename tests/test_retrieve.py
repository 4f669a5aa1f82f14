"""C-MOVE and C-GET served from the index, against real peers.

One server for the module holds a generated corpus (two patients, three
studies, series in three transfer syntaxes, deflate included) stored with
dcmtk's storescu. It is retrieved with dcmtk's movescu (to a dcmtk
storescp +B, a bit-preserving destination named in [[peer]]) and getscu
(into a folder), and with pynetdicom; every retrieved data set must be
byte-identical to the one minipacs stored, and the counts must be those
computed here from the corpus. Orthanc, Debian's real PACS, then queries
minipacs through its REST API and pulls a study into itself with C-MOVE.
"""

import json
import pathlib
import signal
import subprocess
import time
import urllib.request

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet as PATIENT_ROOT_GET,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND,
    StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE,
)

from conftest import Orthanc, Server, dataset_bytes, dcmtk, dcmtk_env, free_port, open_for_other_user, wait_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

# patient id, [(study, [(sop class, transfer syntax, instances)])]
CORPUS = [
    ("RET001", [[(CT, ExplicitVRLittleEndian, 3), (CT, ImplicitVRLittleEndian, 2)],
                [(MR, DeflatedExplicitVRLittleEndian, 2)]]),
    ("RET002", [[(MR, ExplicitVRLittleEndian, 4)]]),
]


def generate(folder):
    """Writes the corpus; returns one record per file."""
    records = []
    for pid, studies in CORPUS:
        for s, series_list in enumerate(studies):
            study = generate_uid()
            for n, (sop_class, ts, count) in enumerate(series_list):
                series = generate_uid()
                for i in range(count):
                    meta = FileMetaDataset()
                    meta.MediaStorageSOPClassUID = sop_class
                    meta.MediaStorageSOPInstanceUID = generate_uid()
                    meta.TransferSyntaxUID = ts
                    ds = Dataset()
                    ds.file_meta = meta
                    ds.SOPClassUID = sop_class
                    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
                    ds.PatientName = f"Retrieve^{pid}"
                    ds.PatientID = pid
                    ds.StudyInstanceUID = study
                    ds.SeriesInstanceUID = series
                    ds.Modality = "CT" if sop_class == CT else "MR"
                    ds.StudyDate = "20240101"
                    ds.SeriesNumber = n + 1
                    ds.InstanceNumber = i + 1
                    ds.Rows = ds.Columns = 64
                    ds.BitsAllocated = ds.BitsStored = 16
                    ds.HighBit = 15
                    ds.PixelRepresentation = 0
                    ds.SamplesPerPixel = 1
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    # Several PDUs' worth for some, odd-ended deflate for others.
                    ds.PixelData = bytes((j * (i + 7)) % 251 for j in range(64 * 64 * 2))
                    path = folder / f"{pid}-{s}-{n}-{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    records.append({"path": path, "patient": pid, "study": study, "series": series,
                                    "instance": ds.SOPInstanceUID, "ts": str(ts), "sop_class": sop_class})
    return records


def stored_data_sets(store):
    """{SOP Instance UID: data set bytes} of every object minipacs holds."""
    out = {}
    for path in pathlib.Path(store).rglob("*"):
        if path.is_file() and not path.name.startswith("index.sqlite") and not path.name.startswith("."):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[ds.SOPInstanceUID] = dataset_bytes(path)
    return out


def received_data_sets(folder):
    out = {}
    for path in pathlib.Path(folder).rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[ds.SOPInstanceUID] = dataset_bytes(path)
    return out


class Storescp:
    """A dcmtk storescp +B: the C-MOVE destination, keeping bytes as received."""

    def __init__(self, folder, aetitle="DEST"):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aetitle = aetitle
        self.log = open(self.folder.parent / f"storescp-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", "+xa", "-aet", aetitle, "-od", str(self.folder), str(self.port)],
            stdout=self.log, stderr=self.log, env=dcmtk_env())
        wait_port(self.port, self.proc)

    def clear(self):
        for p in self.folder.iterdir():
            p.unlink()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pacs(minipacs, tmp_path_factory):
    """minipacs holding the corpus, a storescp destination named in [[peer]]."""
    root = tmp_path_factory.mktemp("retrieve")
    corpus = root / "corpus"
    corpus.mkdir()
    records = generate(corpus)
    dest = Storescp(root / "dest")
    orthanc_port = free_port()
    slow_port = free_port()
    cfg = root / "minipacs.toml"
    cfg.write_text(
        f'log_directory = "{root / "logs"}"\n'
        f'[[peer]]\naetitle = "DEST"\nhost = "127.0.0.1"\nport = {dest.port}\n'
        f'[[peer]]\naetitle = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
        f'[[peer]]\naetitle = "SLOW"\nhost = "127.0.0.1"\nport = {slow_port}\n')
    store = root / "store"
    open_for_other_user(store)
    srv = Server(minipacs, store, ["--config", str(cfg)]).start()
    srv.audit_path = root / "logs" / "audit.jsonl"
    srv.orthanc_port = orthanc_port
    srv.slow_port = slow_port
    try:
        r = subprocess.run(
            [dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *(str(r["path"]) for r in records)],
            capture_output=True, text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stdout + r.stderr
        stored = stored_data_sets(store)
        assert len(stored) == len(records)
        yield srv, records, stored, dest
    finally:
        dest.stop()
        code = srv.stop()
        assert code == 0, srv.logs()[-3000:]


def movescu(srv, dest_ae, *keys, model="-S"):
    args = [dcmtk("movescu"), model, "-aec", "MINIPACS", "-aem", dest_ae]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(srv.port)]
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=120)


def test_movescu_at_every_level_sends_byte_identical_data_sets(pacs):
    srv, records, stored, dest = pacs
    study = records[0]["study"]
    cases = [
        (["0008,0052=STUDY", f"0020,000D={study}"], [r for r in records if r["study"] == study], "-S"),
        (["0008,0052=PATIENT", "0010,0020=RET002"], [r for r in records if r["patient"] == "RET002"], "-P"),
        (["0008,0052=SERIES", f"0020,000D={study}", f"0020,000E={records[3]['series']}"],
         [r for r in records if r["series"] == records[3]["series"]], "-S"),
        (["0008,0052=IMAGE", f"0020,000D={study}", f"0020,000E={records[0]['series']}",
          f"0008,0018={records[1]['instance']}"], [records[1]], "-S"),
    ]
    for keys, expected, model in cases:
        dest.clear()
        r = movescu(srv, "DEST", *keys, model=model)
        assert r.returncode == 0, r.stdout + r.stderr
        got = received_data_sets(dest.folder)
        assert sorted(got) == sorted(e["instance"] for e in expected), keys
        for uid, data in got.items():
            assert data == stored[uid], f"{uid} changed on the way"


def test_an_unknown_destination_gets_a801_and_nothing_leaves(pacs):
    srv, records, _stored, dest = pacs
    dest.clear()
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = records[0]["study"]
        statuses = [s.Status for s, _ in assoc.send_c_move(ds, "STRANGER", STUDY_ROOT_MOVE) if s]
        assert statuses == [0xA801], [hex(s) for s in statuses]
    finally:
        assoc.release()
    assert list(dest.folder.iterdir()) == []


def test_getscu_into_a_folder_byte_identical(pacs, tmp_path):
    srv, records, stored, _dest = pacs
    study = records[0]["study"]
    out = tmp_path / "got"
    out.mkdir()
    r = subprocess.run(
        [dcmtk("getscu"), "-S", "-aec", "MINIPACS", "-od", str(out), "-k", "0008,0052=STUDY",
         "-k", f"0020,000D={study}", "127.0.0.1", str(srv.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = received_data_sets(out)
    expected = sorted(rec["instance"] for rec in records if rec["study"] == study)
    assert sorted(got) == expected, r.stdout + r.stderr
    for uid, data in got.items():
        assert data == stored[uid]


def test_pynetdicom_get_counts_and_a_refused_sub_operation(pacs):
    """C-GET with pynetdicom, which takes the SCP role for CT only: the MR
    objects of the patient have no context to go on and are failed; the
    final status is B000 with their UIDs in the Failed SOP Instance UID List."""
    srv, records, stored, _dest = pacs
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(PATIENT_ROOT_GET)
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, ts)
    roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = "RET001"
        responses = [(s, i) for s, i in assoc.send_c_get(ds, PATIENT_ROOT_GET) if s]
    finally:
        assoc.release()
    mine = [r for r in records if r["patient"] == "RET001"]
    cts = sorted(r["instance"] for r in mine if r["sop_class"] == CT)
    mrs = sorted(r["instance"] for r in mine if r["sop_class"] == MR)
    assert sorted(received) == cts
    for uid, data in received.items():
        assert data == stored[uid]
    # A pending response after each sub-operation but the last, whose
    # counts the final response carries (as dcmqrscp).
    pending = [s for s, _ in responses if s.Status == 0xFF00]
    assert len(pending) == len(mine) - 1
    assert pending[0].NumberOfRemainingSuboperations == len(mine) - 1
    final, identifier = responses[-1]
    assert final.Status == 0xB000, hex(final.Status)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (len(cts), len(mrs))
    failed = identifier.FailedSOPInstanceUIDList
    failed = [failed] if isinstance(failed, str) else list(failed)
    assert sorted(failed) == mrs


def slow_destination(port, seconds, received):
    """A pynetdicom storage SCP "SLOW" on `port` that takes `seconds` per
    object and appends each SOP Instance UID to `received`; returns the
    server (call .shutdown())."""

    def on_store(event):
        time.sleep(seconds)
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    slow = AE(ae_title="SLOW")
    slow.supported_contexts = [c for c in StoragePresentationContexts]
    for c in slow.supported_contexts:
        c.transfer_syntax = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    return slow.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])


def test_cancel_ends_a_move_with_fe00(pacs):
    """A C-CANCEL-RQ sent after the first pending response ends the move
    with FE00. The destination (pynetdicom) takes 0.3 s per object, so the
    cancel arrives while most of them are still to go."""
    srv, records, _stored, _dest = pacs
    received = []
    scp = slow_destination(srv.slow_port, 0.3, received)
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = "\\".join(sorted({r["study"] for r in records}))
        statuses = []
        for status, _ in assoc.send_c_move(ds, "SLOW", STUDY_ROOT_MOVE, msg_id=7):
            if status is None:
                break
            statuses.append(status)
            if status.Status == 0xFF00 and len(statuses) == 1:
                assoc.send_c_cancel(7, query_model=STUDY_ROOT_MOVE)
    finally:
        assoc.release()
        scp.shutdown()
    final = statuses[-1]
    assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
    assert final.NumberOfCompletedSuboperations < len(records) - 2
    assert final.NumberOfRemainingSuboperations > 0
    assert len(received) == final.NumberOfCompletedSuboperations


def one_study(folder, study, n, size):
    """n CT objects of one study (one series) in `folder`; returns their paths."""
    from conftest import make_ct

    folder.mkdir()
    return [make_ct(folder / f"{i}.dcm", f"{study}.{i}", size=size, study=study) for i in range(n)]


def serve_with_peer(minipacs, root, aetitle, port):
    """minipacs with its store and logs under `root` and one [[peer]]."""
    cfg = root / "minipacs.toml"
    cfg.write_text(f'log_directory = "{root / "logs"}"\n'
                   f'[[peer]]\naetitle = "{aetitle}"\nhost = "127.0.0.1"\nport = {port}\n')
    store = root / "store"
    open_for_other_user(store)
    return Server(minipacs, store, ["--config", str(cfg)]).start()


def test_a_stop_mid_move_answers_with_the_rest_failed_then_the_service_exits(minipacs, tmp_path):
    """SIGTERM during a C-MOVE to a slow destination (0.2 s per object): the
    service offers no more objects, so the move ends after those already
    handed over (the one in progress and at most two opened ahead) with
    B000, the objects not sent counted as failed, and the service exits at
    once, not when the 40 objects (8 s) would have been sent."""
    study = "1.2.826.0.1.3680043.10.72.40"
    files = one_study(tmp_path / "corpus", study, 40, size=1024)
    slow_port = free_port()
    srv = serve_with_peer(minipacs, tmp_path, "SLOW", slow_port)
    received = []
    scp = slow_destination(slow_port, 0.2, received)
    try:
        r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port),
                            *map(str, files)], capture_output=True, text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stdout + r.stderr
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(STUDY_ROOT_MOVE)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
        assert assoc.is_established
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study
        statuses = []
        for status, _ in assoc.send_c_move(ds, "SLOW", STUDY_ROOT_MOVE):
            if not status:
                break
            statuses.append(status)
            if status.Status == 0xFF00 and len(statuses) == 2:
                srv.proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
        # The service ends the association after the final response: wait
        # for its exit first (a release racing that abort would wait for
        # pynetdicom's ACSE timeout).
        code = srv.proc.wait(timeout=20)
        exited_after = time.monotonic() - stopped_at
        if assoc.is_established:
            assoc.abort()
    finally:
        scp.shutdown()
        if srv.proc.poll() is None:
            srv.stop()
    assert code == 0, srv.logs()[-3000:]
    final = statuses[-1]
    assert final.Status == 0xB000, [hex(s.Status) for s in statuses]
    completed = final.NumberOfCompletedSuboperations
    assert 2 <= completed < 40
    assert final.NumberOfFailedSuboperations == 40 - completed
    assert len(received) == completed
    assert exited_after < 4, f"the service took {exited_after:.1f} s to exit"
    assert "the service is stopping" in srv.logs()


def test_each_retrieve_is_audited(pacs):
    srv, records, _stored, _dest = pacs
    movescu(srv, "DEST", "0008,0052=PATIENT", "0010,0020=RET002", model="-P")
    deadline = time.monotonic() + 10
    lines = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in srv.audit_path.read_text().splitlines()]
        moves = [line for line in lines if line.get("event") == "retrieve" and line.get("operation") == "C-MOVE"]
        if moves:
            break
        time.sleep(0.1)
    assert moves, lines[-5:]
    last = moves[-1]
    assert last["destination"] == "DEST"
    assert last["level"] == "PATIENT"
    assert last["completed"] == 4 and last["failed"] == 0
    assert last["status"] == "0000"


def test_orthanc_queries_minipacs_and_pulls_a_study_with_c_move(pacs, tmp_path):
    srv, records, stored, _dest = pacs
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=srv.orthanc_port,
                      modalities={"minipacs": ("MINIPACS", srv.port)}, check_called_aet=False)
    try:
        assert orthanc.rest("POST", "/modalities/minipacs/echo", {}) == {}
        study = records[0]["study"]
        q = orthanc.rest("POST", "/modalities/minipacs/query",
                         {"Level": "Study", "Query": {"PatientID": "RET001", "StudyInstanceUID": ""}})
        answers = orthanc.rest("GET", f"/queries/{q['ID']}/answers?expand")
        found = [a["0020,000d"]["Value"] for a in answers]
        assert sorted(found) == sorted({r["study"] for r in records if r["patient"] == "RET001"})
        index = found.index(study)
        orthanc.rest("POST", f"/queries/{q['ID']}/answers/{index}/retrieve",
                     {"TargetAet": "ORTHANC", "Synchronous": True})
        instances = orthanc.rest("GET", "/instances?expand")
        got = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)
        assert got == sorted(r["instance"] for r in records if r["study"] == study)
        for i in instances:
            raw = urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http}/instances/{i['ID']}/file").read()
            path = tmp_path / "from-orthanc.dcm"
            path.write_bytes(raw)
            assert dataset_bytes(path) == stored[i["MainDicomTags"]["SOPInstanceUID"]]
    finally:
        orthanc.stop()


def test_allow_entries_grant_only_their_services(minipacs, tmp_path):
    """A modality that may only store, a viewer that may only query and
    retrieve with C-GET: each is refused the rest at negotiation."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = generate(corpus)[:3]
    cfg = tmp_path / "minipacs.toml"
    cfg.write_text(
        f'log_directory = "{tmp_path / "logs"}"\n'
        '[[allow]]\naetitle = "MODALITY"\nservices = ["store"]\n'
        '[[allow]]\naetitle = "VIEWER"\nservices = ["find", "get"]\n')
    store = tmp_path / "store"
    open_for_other_user(store)
    srv = Server(minipacs, store, ["--config", str(cfg)]).start()
    try:
        files = [str(r["path"]) for r in records]
        store_as = lambda ae: subprocess.run(
            [dcmtk("storescu"), "-aet", ae, "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *files],
            capture_output=True, text=True, env=dcmtk_env())
        r = store_as("MODALITY")
        assert r.returncode == 0, r.stdout + r.stderr
        # The viewer may not store: no context is acceptable, so its
        # association is rejected, and nothing more is stored.
        before = len(stored_data_sets(store))
        r = store_as("VIEWER")
        assert r.returncode != 0, r.stdout + r.stderr
        assert len(stored_data_sets(store)) == before

        # The modality may not query: its FIND context is refused.
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
        assert assoc.is_established
        accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
        assoc.release()
        assert accepted == {CTImageStorage}

        # The viewer queries and gets.
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
        assert assoc.is_established
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        found = [i for s, i in assoc.send_c_find(ds, STUDY_ROOT_FIND) if s and s.Status == 0xFF00]
        assoc.release()
        assert sorted(i.StudyInstanceUID for i in found) == sorted({r["study"] for r in records})
        out = tmp_path / "got"
        out.mkdir()
        r = subprocess.run(
            [dcmtk("getscu"), "-S", "-aet", "VIEWER", "-aec", "MINIPACS", "-od", str(out),
             "-k", "0008,0052=STUDY", "-k", f"0020,000D={records[0]['study']}", "127.0.0.1", str(srv.port)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(received_data_sets(out)) == sorted(r["instance"] for r in records)
    finally:
        code = srv.stop()
        assert code == 0, srv.logs()[-3000:]


def test_a_study_of_1000_objects_is_retrieved_in_bounded_memory(minipacs, tmp_path):
    """C-GET and C-MOVE of a 1,000-object study: every object arrives, and
    the worker's peak RSS stays within 24 MiB (nothing is proportional to
    the number of objects: files are opened a few at a time and streamed)."""
    study = "1.2.826.0.1.3680043.10.71.1000"
    corpus = tmp_path / "corpus"
    one_study(corpus, study, 1000, size=4096)
    dest = Storescp(tmp_path / "dest", aetitle="BIGDEST")
    srv = serve_with_peer(minipacs, tmp_path, "BIGDEST", dest.port)
    try:
        r = subprocess.run([dcmtk("storescu"), "+sd", "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(corpus)],
                           capture_output=True, text=True, env=dcmtk_env(), timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out = tmp_path / "got"
        out.mkdir()
        r = subprocess.run(
            [dcmtk("getscu"), "-S", "-aec", "MINIPACS", "-od", str(out), "-k", "0008,0052=STUDY",
             "-k", f"0020,000D={study}", "127.0.0.1", str(srv.port)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert len(list(out.iterdir())) == 1000
        r = movescu(srv, "BIGDEST", "0008,0052=STUDY", f"0020,000D={study}")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert len(list(dest.folder.iterdir())) == 1000
        peak_kib = srv.status("VmHWM")
        print(f"\nworker peak RSS after retrieving 2 x 1,000 objects: {peak_kib / 1024:.1f} MiB")
        assert peak_kib <= 24 * 1024, f"peak RSS {peak_kib} KiB"
    finally:
        dest.stop()
        code = srv.stop()
        assert code == 0, srv.logs()[-3000:]
