"""C-FIND served from the index, against real peers.

One server for the module: a generated corpus (several patients, studies,
series, dates, names) and pydicom's character-set files are stored with
dcmtk's storescu, then queried with dcmtk's findscu and with pynetdicom at
every level and with every matching kind. Each expected answer is computed
here, independently, from the corpus as pydicom reads it.
"""

import json
import pathlib
import subprocess
import time

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from conftest import Server, dcmtk, dcmtk_env, open_for_other_user


def serve(minipacs, store, extra=()):
    """A server whose worker can reach the store by its path: SQLite opens
    the index by path, and a root start hands the worker only descriptors,
    so pytest's 0700 folders are opened for traversal."""
    open_for_other_user(store)
    return Server(minipacs, store, list(extra)).start()

CHARSET_FILES = ["chrX1.dcm", "chrH31.dcm", "chrFren.dcm", "chrGerm.dcm", "chrRuss.dcm", "chrGreek.dcm"]

PATIENTS = [
    # id, name, birth date, sex, [(study date, study time, description, [(modality, n instances)])]
    ("FIND001", "Doe^Jane", "19700101", "F", [("20200105", "083000", "CT head", [("CT", 3), ("CT", 1)]),
                                              ("20210310", "141500", "MR knee", [("MR", 2)])]),
    ("FIND002", "Doe^John", "19651231", "M", [("20200601", "120000", "Chest", [("CR", 1), ("CT", 2)])]),
    ("FIND003", "Smith^Anna", "19900715", "F", [("20191120", "235959", "Abdomen", [("US", 2)])]),
    ("FIND004", "smith^bob", "20010203", "M", [("20220101", "000000", "Spine", [("MR", 1), ("MR", 1)])]),
]

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "CR": "1.2.840.10008.5.1.4.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.6.1"}


def generate(folder):
    """Writes the generated corpus; returns the paths."""
    paths = []
    for pid, name, birth, sex, studies in PATIENTS:
        for s, (date, time, desc, series_list) in enumerate(studies):
            study_uid = generate_uid()
            for n, (modality, count) in enumerate(series_list):
                series_uid = generate_uid()
                for i in range(count):
                    meta = FileMetaDataset()
                    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
                    meta.MediaStorageSOPInstanceUID = generate_uid()
                    meta.TransferSyntaxUID = ExplicitVRLittleEndian
                    ds = Dataset()
                    ds.file_meta = meta
                    ds.SpecificCharacterSet = "ISO_IR 100"
                    ds.SOPClassUID = meta.MediaStorageSOPClassUID
                    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
                    ds.StudyDate = date
                    ds.SeriesDate = date
                    ds.StudyTime = time
                    ds.AccessionNumber = f"ACC{pid[-3:]}{s}"
                    ds.Modality = modality
                    ds.ReferringPhysicianName = "Ref^Doctor"
                    ds.StudyDescription = desc
                    ds.SeriesDescription = f"{desc} series {n + 1}"
                    ds.PatientName = name
                    ds.PatientID = pid
                    ds.PatientBirthDate = birth
                    ds.PatientSex = sex
                    ds.BodyPartExamined = "HEAD" if "head" in desc else "OTHER"
                    ds.StudyInstanceUID = study_uid
                    ds.SeriesInstanceUID = series_uid
                    ds.StudyID = f"S{s + 1}"
                    ds.SeriesNumber = n + 1
                    ds.InstanceNumber = i + 1
                    path = folder / f"{pid}-{s}-{n}-{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    paths.append(path)
    return paths


def charset_file(name):
    """One of pydicom's character-set test files (not in get_testdata_file's folder)."""
    root = pathlib.Path(pydicom.__file__).parent / "data"
    return next(root.rglob(name))


def text(value):
    return "" if value is None else str(value)


def record(path):
    """What the index should say about one file, read independently."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "PatientID": text(ds.get("PatientID")),
        "PatientName": text(ds.get("PatientName")),
        "PatientBirthDate": text(ds.get("PatientBirthDate")),
        "StudyInstanceUID": text(ds.get("StudyInstanceUID")),
        "StudyDate": text(ds.get("StudyDate")),
        "StudyTime": text(ds.get("StudyTime")),
        "AccessionNumber": text(ds.get("AccessionNumber")),
        "SeriesInstanceUID": text(ds.get("SeriesInstanceUID")),
        "Modality": text(ds.get("Modality")),
        "SeriesNumber": text(ds.get("SeriesNumber")),
        "SOPInstanceUID": text(ds.get("SOPInstanceUID")),
        "SOPClassUID": text(ds.get("SOPClassUID")),
    }


@pytest.fixture(scope="module")
def pacs(minipacs, tmp_path_factory):
    """A server holding the corpus, and the corpus's records."""
    root = tmp_path_factory.mktemp("find")
    corpus = root / "corpus"
    corpus.mkdir()
    files = generate(corpus)
    for name in CHARSET_FILES:
        files.append(charset_file(name))
    cfg = root / "minipacs.toml"
    cfg.write_text(f'log_directory = "{root / "logs"}"\n')
    srv = serve(minipacs, root / "store", ["--config", str(cfg)])
    srv.audit_path = root / "logs" / "audit.jsonl"
    try:
        r = subprocess.run(
            [dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *map(str, files)],
            capture_output=True, text=True, env=dcmtk_env(),
        )
        assert r.returncode == 0, r.stdout + r.stderr
        records = [record(p) for p in files]
        yield srv, records
    finally:
        code = srv.stop()
        assert code == 0, srv.logs()[-3000:]


def association(srv, *models):
    ae = AE(ae_title="FINDER")
    for model in models or (STUDY_ROOT, PATIENT_ROOT):
        ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="MINIPACS")
    assert assoc.is_established
    return assoc


def query(assoc, model, **keys):
    """Sends one C-FIND; returns (identifiers, final status)."""
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    found = []
    final = None
    for status, identifier in assoc.send_c_find(ds, model):
        assert status is not None, "no response"
        if status.Status in (0xFF00, 0xFF01):
            found.append(identifier)
        else:
            final = status
    return found, final


def distinct(records, key, where=lambda r: True):
    return sorted({r[key] for r in records if where(r)})


def values(found, key):
    return sorted(text(ds.get(key)) for ds in found)


def test_every_level_and_matching_kind_with_pynetdicom(pacs):
    srv, records = pacs
    assoc = association(srv)
    try:
        # Universal match, study level: every study, with the standard keys.
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                             PatientName="", ModalitiesInStudy="", NumberOfStudyRelatedInstances="")
        assert final.Status == 0x0000
        assert values(found, "StudyInstanceUID") == distinct(records, "StudyInstanceUID")
        for ds in found:
            assert ds.QueryRetrieveLevel == "STUDY"
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert ds.RetrieveAETitle == "MINIPACS"
            mine = [r for r in records if r["StudyInstanceUID"] == ds.StudyInstanceUID]
            assert int(ds.NumberOfStudyRelatedInstances) == len({r["SOPInstanceUID"] for r in mine})
            modalities = ds.ModalitiesInStudy
            modalities = [modalities] if isinstance(modalities, str) else list(modalities)
            assert sorted(m for m in modalities if m) == distinct(mine, "Modality", lambda r: r["Modality"])

        # Wildcards on a person name, case-insensitively.
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="SMITH*")
        assert final.Status == 0x0000
        want = distinct(records, "StudyInstanceUID", lambda r: r["PatientName"].lower().startswith("smith"))
        assert values(found, "StudyInstanceUID") == want and len(want) == 2
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="Doe^J?n*")
        assert values(found, "StudyInstanceUID") == distinct(
            records, "StudyInstanceUID", lambda r: r["PatientName"] in ("Doe^Jane",))

        # Single value (exact) and an unknown key, returned empty.
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                         AccessionNumber="ACC0011", InstitutionName="")
        assert values(found, "StudyInstanceUID") == distinct(
            records, "StudyInstanceUID", lambda r: r["AccessionNumber"] == "ACC0011")
        assert len(found) == 1 and "InstitutionName" in found[0] and found[0].InstitutionName in ("", None)

        # Date ranges: closed, open at each end; a time range.
        for rng, test in [("20200101-20201231", lambda d: "20200101" <= d <= "20201231"),
                          ("20210101-", lambda d: d >= "20210101"),
                          ("-20191231", lambda d: d and d <= "20191231")]:
            found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="", StudyDate=rng)
            assert values(found, "StudyInstanceUID") == distinct(
                records, "StudyInstanceUID", lambda r: test(r["StudyDate"])), rng
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                         StudyTime="080000-130000", PatientID="FIND*")
        assert values(found, "StudyInstanceUID") == distinct(
            records, "StudyInstanceUID",
            lambda r: r["PatientID"].startswith("FIND") and "080000" <= r["StudyTime"] <= "130000")

        # UID list.
        uids = distinct(records, "StudyInstanceUID")[:2]
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID=uids)
        assert values(found, "StudyInstanceUID") == uids

        # ModalitiesInStudy matches a study with any series of it.
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="", ModalitiesInStudy="MR")
        assert values(found, "StudyInstanceUID") == distinct(
            records, "StudyInstanceUID", lambda r: r["Modality"] == "MR")

        # Patient level (Patient Root), with the derived counts.
        found, final = query(assoc, PATIENT_ROOT, QueryRetrieveLevel="PATIENT", PatientID="FIND*",
                             PatientName="", NumberOfPatientRelatedStudies="", PatientBirthDate="19650101-19751231")
        assert final.Status == 0x0000
        want = distinct(records, "PatientID",
                        lambda r: r["PatientID"].startswith("FIND") and "19650101" <= r["PatientBirthDate"] <= "19751231")
        assert values(found, "PatientID") == want == ["FIND001", "FIND002"]
        for ds in found:
            assert int(ds.NumberOfPatientRelatedStudies) == len(
                distinct(records, "StudyInstanceUID", lambda r: r["PatientID"] == ds.PatientID))

        # Series level needs the study (Study Root), and the patient too (Patient Root).
        study = distinct(records, "StudyInstanceUID", lambda r: r["PatientID"] == "FIND001" and r["StudyDate"] == "20200105")[0]
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="SERIES", StudyInstanceUID=study,
                             SeriesInstanceUID="", Modality="", SeriesNumber="", NumberOfSeriesRelatedInstances="")
        assert final.Status == 0x0000
        assert values(found, "SeriesInstanceUID") == distinct(
            records, "SeriesInstanceUID", lambda r: r["StudyInstanceUID"] == study)
        for ds in found:
            assert int(ds.NumberOfSeriesRelatedInstances) == len(
                [r for r in records if r["SeriesInstanceUID"] == ds.SeriesInstanceUID])
        found, _ = query(assoc, PATIENT_ROOT, QueryRetrieveLevel="SERIES", PatientID="FIND001",
                         StudyInstanceUID=study, SeriesInstanceUID="", SeriesNumber="1")
        assert len(found) == 1 and str(found[0].SeriesNumber) == "1"

        # Image level.
        series = sorted(values(found, "SeriesInstanceUID"))[0]
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study,
                             SeriesInstanceUID=series, SOPInstanceUID="", SOPClassUID="", InstanceNumber="")
        assert final.Status == 0x0000
        assert values(found, "SOPInstanceUID") == distinct(
            records, "SOPInstanceUID", lambda r: r["SeriesInstanceUID"] == series)
        assert len(found) == 3

        # Hierarchy: SERIES without the study is refused with a status.
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="SERIES", SeriesInstanceUID="")
        assert not found and final.Status == 0xA900
    finally:
        assoc.release()


def test_character_set_names_are_found_by_their_unicode_value(pacs):
    srv, records = pacs
    assoc = association(srv, STUDY_ROOT)
    try:
        for name in CHARSET_FILES:
            ds = pydicom.dcmread(charset_file(name))
            ds.decode()
            unicode_name = str(ds.PatientName)
            q = Dataset()
            q.SpecificCharacterSet = "ISO_IR 192"
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = ""
            q.PatientName = unicode_name
            found = [i for s, i in assoc.send_c_find(q, STUDY_ROOT) if s.Status in (0xFF00, 0xFF01)]
            assert ds.StudyInstanceUID in [f.StudyInstanceUID for f in found], (name, unicode_name)
            for f in found:
                f.decode()
            assert unicode_name in [str(f.PatientName) for f in found], name
        # A Latin-1 query finds the UTF-8-stored name (chrGerm: "Äneas^Rüdiger").
        german = pydicom.dcmread(charset_file("chrGerm.dcm"))
        german.decode()
        q = Dataset()
        q.SpecificCharacterSet = "ISO_IR 100"
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.PatientName = str(german.PatientName).split("^")[0] + "*"
        found = [i for s, i in assoc.send_c_find(q, STUDY_ROOT) if s.Status in (0xFF00, 0xFF01)]
        assert german.StudyInstanceUID in [f.StudyInstanceUID for f in found]
    finally:
        assoc.release()


def findscu(srv, tmp_path, model_flag, *keys):
    out = tmp_path / f"rsp{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [dcmtk("findscu"), model_flag, "-aec", "MINIPACS", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    r = subprocess.run([*args, "127.0.0.1", str(srv.port)], capture_output=True, text=True, env=dcmtk_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())], r.stdout + r.stderr


def test_dcmtk_findscu_at_every_level(pacs, tmp_path):
    srv, records = pacs
    found, _ = findscu(srv, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=FIND00?", "PatientName")
    assert values(found, "PatientID") == ["FIND001", "FIND002", "FIND003", "FIND004"]
    found, _ = findscu(srv, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                       "PatientName=doe*", "StudyDate=20200101-20201231")
    assert values(found, "StudyInstanceUID") == distinct(
        records, "StudyInstanceUID",
        lambda r: r["PatientName"].lower().startswith("doe") and r["StudyDate"].startswith("2020"))
    study = found[0].StudyInstanceUID
    found, _ = findscu(srv, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                       "SeriesInstanceUID", "Modality=CT")
    assert values(found, "SeriesInstanceUID") == distinct(
        records, "SeriesInstanceUID", lambda r: r["StudyInstanceUID"] == study and r["Modality"] == "CT")
    series = found[0].SeriesInstanceUID
    pid = [r["PatientID"] for r in records if r["StudyInstanceUID"] == study][0]
    found, _ = findscu(srv, tmp_path, "-P", "QueryRetrieveLevel=IMAGE", f"PatientID={pid}",
                       f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}", "SOPInstanceUID")
    assert values(found, "SOPInstanceUID") == distinct(
        records, "SOPInstanceUID", lambda r: r["SeriesInstanceUID"] == series)


def raw_find(conn, message_id, identifier, cancel=False):
    """One C-FIND on a raw association (tests/dul.py), on context 1; with
    `cancel`, its C-CANCEL-RQ goes out in the same write as the request,
    so it is waiting when the answer begins. Returns (final status, number
    of pending responses)."""
    import dul

    message = (dul.pdata(1, True, True, dul.c_find_rq(message_id, STUDY_ROOT)) +
               dul.pdata(1, False, True, identifier))
    if cancel:
        message += dul.pdata(1, True, True, dul.c_cancel_rq(message_id))
    conn.send(message)
    return conn.read_find_answer()


def test_a_cancel_sent_with_the_request_ends_the_answer_with_fe00(minipacs, tmp_path):
    """A series of 1,500 instances, and a C-CANCEL-RQ sent in the same write
    as the request, so that it is waiting when the answer begins: FE00
    before the answer is done, and the association goes on to answer the
    same query whole. (This test sent the cancel on pynetdicom's first
    pending response; with the index's connections kept between queries
    the whole answer now leaves within a few milliseconds, before such a
    cancel arrives. A cancel arriving between two matches is dimse's
    a_cancel_while_matches_are_sent_ends_with_fe00_within_one_response.)"""
    import dul
    from pynetdicom.dsutils import encode

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(1500):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS["CT"]
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SOP_CLASS["CT"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.Modality = "MANY", "Many^Images", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        path = corpus / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    cfg = tmp_path / "minipacs.toml"
    cfg.write_text(f'log_directory = "{tmp_path / "logs"}"\n')
    srv = serve(minipacs, tmp_path / "store", ["--config", str(cfg), "--no-fsync"])
    try:
        r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *map(str, files)],
                           capture_output=True, text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stdout + r.stderr
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = ""
        q.InstanceNumber = ""
        identifier = encode(q, True, True)
        conn = dul.Connection(srv.port, timeout=60)
        pdu_type, _ = conn.associate(called="MINIPACS", calling="FINDSCU",
                                     contexts=[(1, STUDY_ROOT, [dul.IMPLICIT_LE])])
        assert pdu_type == 0x02
        try:
            final, pending = raw_find(conn, 42, identifier, cancel=True)
            assert final == 0xFE00, (hex(final), pending)
            assert pending < 1500
            # Still usable afterwards, and the whole answer is there.
            final, pending = raw_find(conn, 43, identifier)
            assert (final, pending) == (0x0000, 1500)
        finally:
            conn.release()
        logs = srv.wait_log("status=FE00")
        assert "C-FIND" in logs
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]


def test_malformed_identifiers_get_failure_statuses_and_the_association_stays(pacs):
    srv, _records = pacs
    assoc = association(srv)
    try:
        found, final = query(assoc, STUDY_ROOT, StudyInstanceUID="")
        assert not found and final.Status == 0xA900
        assert "Level" in str(final.get("ErrorComment", ""))
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="WARD", StudyInstanceUID="")
        assert not found and final.Status == 0xA900
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="PATIENT", PatientID="")
        assert not found and final.Status == 0xA900
        found, final = query(assoc, PATIENT_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        assert not found and final.Status == 0xA900
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
        assert final.Status == 0 and found
    finally:
        assoc.release()
    assert assoc.is_released


def test_each_find_is_audited(pacs):
    srv, _records = pacs
    assoc = association(srv, STUDY_ROOT)
    try:
        found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", PatientName="Doe*", StudyInstanceUID="")
        assert final.Status == 0 and len(found) == 3
    finally:
        assoc.release()
    srv.wait_log("C-FIND")
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in srv.audit_path.read_text().splitlines()]
        finds = [r for r in lines if r["event"] == "find"]
        if any(r["level"] == "STUDY" and r["matches"] == 3 and "Doe*" in r["keys"]
               and r["calling_ae"] == "FINDER" and r["status"] == "0000" for r in finds):
            break
        assert time.monotonic() < deadline, finds[-5:]
        time.sleep(0.05)


def test_max_find_results_caps_the_answer(minipacs, tmp_path):
    srv = serve(minipacs, tmp_path / "store", ["--config", str(_config(tmp_path))])
    try:
        (tmp_path / "corpus").mkdir()
        files = generate(tmp_path / "corpus")
        r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), *map(str, files)],
                           capture_output=True, text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stdout + r.stderr
        assoc = association(srv, STUDY_ROOT)
        try:
            found, final = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
            assert len(found) == 2 and final.Status == 0xA700
        finally:
            assoc.release()
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]


def _config(tmp_path):
    path = tmp_path / "minipacs.toml"
    path.write_text(f'max_find_results = 2\nlog_directory = "{tmp_path / "logs"}"\n')
    return path
