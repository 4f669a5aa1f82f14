"""The index of what the store holds (issue 13, part 1): wired into the
store, caught up at start, rebuilt when lost, `minipacs index rebuild`.

The servers here are started as root (the machine and CI are): the keeper
hands the store to an unprivileged worker as a descriptor, and the worker
cannot traverse pytest's 0700 folders to the store's path, so these tests
also prove that the index is opened through the store's descriptor. The
rows are read with Python's sqlite3, read-only, and compared with what
pydicom reads from the stored files.
"""

import os
import pathlib
import pwd
import shutil
import signal
import sqlite3
import subprocess
import threading
import time

import pydicom

from conftest import Server, dcmtk, dcmtk_env, make_ct

INDEX = "index.sqlite"


def instances_by_cfind(port):
    """Every SOP Instance UID the server answers for, walking Study Root
    C-FIND from studies to series to instances on one association."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established

    def find(**keys):
        ds = Dataset()
        for k, v in keys.items():
            setattr(ds, k, v)
        found = []
        for status, identifier in assoc.send_c_find(ds, FIND):
            assert status is not None and status.Status in (0x0000, 0xFF00), status
            if status.Status == 0xFF00:
                found.append(identifier)
        return found

    instances = set()
    try:
        for study in find(QueryRetrieveLevel="STUDY", StudyInstanceUID=""):
            for series in find(QueryRetrieveLevel="SERIES", StudyInstanceUID=study.StudyInstanceUID,
                               SeriesInstanceUID=""):
                for image in find(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study.StudyInstanceUID,
                                  SeriesInstanceUID=series.SeriesInstanceUID, SOPInstanceUID=""):
                    instances.add(image.SOPInstanceUID)
    finally:
        assoc.release()
    return instances


def index_rows(store):
    """{relative path: (SOP Instance, SOP Class, Study, Series, Patient ID,
    transfer syntax, size)} as the index has them (read-only)."""
    uri = f"file:{pathlib.Path(store) / INDEX}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        rows = conn.execute(
            """SELECT i.path, i.sop_instance_uid, i.sop_class_uid, st.study_instance_uid,
                      se.series_instance_uid, p.patient_id, i.transfer_syntax, i.size
               FROM instance i JOIN series se ON i.series = se.id
               JOIN study st ON se.study = st.id JOIN patient p ON st.patient = p.id"""
        ).fetchall()
    finally:
        conn.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def file_rows(srv, skip=()):
    """The same, computed independently from the stored files (pydicom)."""
    out = {}
    for p in srv.stored_files():
        if str(p.relative_to(srv.store)) in skip:
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out[str(p.relative_to(srv.store))] = (
            ds.SOPInstanceUID,
            ds.SOPClassUID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.PatientID,
            ds.file_meta.TransferSyntaxUID,
            p.stat().st_size,
        )
    return out


def corpus(folder, n, prefix="1.2.826.0.1.3680043.10.90", studies=3, size=2048):
    folder.mkdir(parents=True, exist_ok=True)
    return [
        make_ct(folder / f"{i}.dcm", f"{prefix}.{i}", size=size,
                study=f"{prefix}.100.{i % studies}")
        for i in range(n)
    ]


def storescu(srv, files, check=True):
    r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *map(str, files)],
                       capture_output=True, text=True, env=dcmtk_env())
    if check:
        assert r.returncode == 0, r.stderr + srv.logs()[-3000:]
    return r


def test_stored_objects_have_rows_matching_their_files(server_factory, tmp_path):
    srv = server_factory()
    files = corpus(tmp_path / "src", 6)
    storescu(srv, files)
    # In the index once storescu has its A-RELEASE-RP: no wait needed.
    rows = index_rows(srv.store)
    assert rows == file_rows(srv)
    assert len(rows) == 6
    assert {r[2] for r in rows.values()} == {f"1.2.826.0.1.3680043.10.90.100.{i}" for i in range(3)}
    # Root start: the worker is not root, cannot traverse the store's path
    # (pytest's folders are 0700 root), and made the index as itself.
    worker = srv.worker_pid()
    assert worker != srv.proc.pid
    worker_uid = os.stat(f"/proc/{worker}").st_uid
    assert worker_uid != 0
    parent = srv.store.parent
    assert parent.stat().st_uid == 0 and parent.stat().st_mode & 0o077 == 0
    assert (srv.store / INDEX).stat().st_uid == worker_uid


def test_study_layout_rows_name_their_subfolders(server_factory, tmp_path):
    srv = server_factory(["--layout", "study"])
    storescu(srv, corpus(tmp_path / "src", 4, prefix="1.2.826.0.1.3680043.10.91"))
    rows = index_rows(srv.store)
    assert rows == file_rows(srv)
    assert all(path.count("/") == 2 and path.endswith(".dcm") for path in rows), rows


def worker_user():
    """The user a root start runs its worker as (minipacs, else nobody)."""
    try:
        return pwd.getpwnam("minipacs")
    except KeyError:
        return pwd.getpwnam("nobody")


def acknowledged(output):
    """The files storescu -v was told are stored (status Success)."""
    acked, current = [], None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_9_during_a_stream_then_restart_indexes_every_acknowledged_object(minipacs, tmp_path):
    store = tmp_path / "store"
    files = corpus(tmp_path / "src", 400, prefix="1.2.826.0.1.3680043.10.92", studies=7, size=8192)
    uid_of = {str(f): f"1.2.826.0.1.3680043.10.92.{i}" for i, f in enumerate(files)}
    srv = Server(minipacs, store).start()
    out = {}

    def send():
        r = subprocess.run([dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(srv.port),
                            *map(str, files)], capture_output=True, text=True, env=dcmtk_env())
        out["text"] = r.stdout + r.stderr

    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while len(srv.stored_files()) < 60:
            assert time.monotonic() < deadline, srv.logs()[-3000:]
            time.sleep(0.005)
        worker = srv.worker_pid()
        os.kill(worker, signal.SIGKILL)
        srv.proc.kill()
        srv.proc.wait()
    finally:
        sender.join(timeout=60)
        srv.stop()
    acked = acknowledged(out["text"])
    assert 60 <= len(acked) < len(files), out["text"][-2000:]
    again = Server(minipacs, store, port=srv.port).start()
    try:
        again.wait_log("index level with the store")
        rows = index_rows(store)
        stored = {str(p.relative_to(store)) for p in again.stored_files()}
        # No row lacks its file, and no file lacks its row.
        assert set(rows) == stored
        indexed = {r[0] for r in rows.values()}
        missing = [f for f in acked if uid_of[f] not in indexed]
        assert missing == [], missing
        assert rows == file_rows(again)
        # And a viewer finds every acknowledged object by C-FIND.
        found = instances_by_cfind(again.port)
        assert {uid_of[f] for f in acked} <= found
        assert found == indexed
    finally:
        assert again.stop() == 0, again.logs()[-3000:]


def test_a_deleted_index_is_rebuilt_with_the_same_rows(minipacs, tmp_path):
    store = tmp_path / "store"
    srv = Server(minipacs, store).start()
    try:
        storescu(srv, corpus(tmp_path / "src", 8, prefix="1.2.826.0.1.3680043.10.93"))
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    before = index_rows(store)
    assert len(before) == 8
    again = Server(minipacs, store, port=srv.port).start()
    try:
        answers = instances_by_cfind(again.port)
    finally:
        assert again.stop() == 0, again.logs()[-3000:]
    assert len(answers) == 8
    for p in store.iterdir():
        if p.name.startswith(INDEX):
            p.unlink()
    again = Server(minipacs, store, port=srv.port).start()
    try:
        logs = again.wait_log("index level with the store")
        assert "indexing the store's files anew" in logs
        assert index_rows(store) == before
        assert instances_by_cfind(again.port) == answers
    finally:
        assert again.stop() == 0, again.logs()[-3000:]


def test_a_corrupt_index_is_moved_aside_and_rebuilt(minipacs, tmp_path):
    store = tmp_path / "store"
    srv = Server(minipacs, store).start()
    try:
        storescu(srv, corpus(tmp_path / "src", 3, prefix="1.2.826.0.1.3680043.10.94"))
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    before = index_rows(store)
    for p in store.iterdir():
        if p.name.startswith(INDEX + "-"):
            p.unlink()
    (store / INDEX).write_bytes(b"this is not a database" * 400)
    again = Server(minipacs, store, port=srv.port).start()
    try:
        again.wait_log("index level with the store")
        assert "index unusable" in again.logs()
        assert (store / (INDEX + ".unusable")).exists()
        assert index_rows(store) == before
    finally:
        assert again.stop() == 0, again.logs()[-3000:]


def test_a_store_made_without_an_index_is_indexed_at_first_start(minipacs, tmp_path):
    store = tmp_path / "store"
    src = corpus(tmp_path / "src", 5, prefix="1.2.826.0.1.3680043.10.95")
    (store / "copied" / "deeper").mkdir(parents=True)
    for i, f in enumerate(src):
        shutil.copy(f, store / ("copied/deeper" if i % 2 else "") / f"CT.{i}")
    (store / "earlier.txt").write_text("not an object\n")
    # A store the worker's user owns (a root start never takes a folder
    # from its owner).
    worker = worker_user()
    for p in [store, *store.rglob("*")]:
        os.chown(p, worker.pw_uid, worker.pw_gid)
    srv = Server(minipacs, store).start()
    try:
        logs = srv.wait_log("index level with the store")
        assert "not_indexable=1" in logs, logs[-2000:]
        rows = index_rows(store)
        assert rows == file_rows(srv, skip={"earlier.txt"})
        assert len(rows) == 5
        # And what arrives next is indexed beside them.
        storescu(srv, corpus(tmp_path / "more", 1, prefix="1.2.826.0.1.3680043.10.96"))
        assert len(index_rows(store)) == 6
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]


def test_index_rebuild_is_refused_while_serving_and_works_when_stopped(minipacs, tmp_path):
    store = tmp_path / "store"
    srv = Server(minipacs, store).start()
    try:
        storescu(srv, corpus(tmp_path / "src", 5, prefix="1.2.826.0.1.3680043.10.97"))
        before = index_rows(store)
        r = subprocess.run([minipacs, "index", "rebuild", "--output-directory", str(store)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert f"the store {store} is in use by a running minipacs server: stop it first" in r.stderr, r.stderr
        assert index_rows(store) == before
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    r = subprocess.run([minipacs, "index", "rebuild", "--output-directory", str(store)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rebuilt: 5 object(s) from 5 file(s)" in r.stdout, r.stdout
    assert index_rows(store) == before
    # Run as root on the worker's store: the new index stays the worker's,
    # so the next (root) start can write to it.
    assert (store / INDEX).stat().st_uid == store.stat().st_uid != 0
    again = Server(minipacs, store, port=srv.port).start()
    try:
        storescu(again, corpus(tmp_path / "more", 1, prefix="1.2.826.0.1.3680043.10.98"))
        assert len(index_rows(store)) == 6
        assert "not indexed" not in again.logs()
    finally:
        assert again.stop() == 0, again.logs()[-3000:]
