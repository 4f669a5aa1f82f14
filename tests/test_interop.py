"""minipacs against real peers: dcmtk and pynetdicom, in both roles."""

import subprocess
import threading

import pytest

from conftest import (
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    make_ct,
    meta_of,
    uid_text,
    wait_port,
)


def test_dcmtk_echoscu(server):
    r = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(server.port)],
        capture_output=True,
        env=dcmtk_env(),
    )
    assert r.returncode == 0, r.stderr
    server.wait_log("C-ECHO")


def test_dcmtk_storescu_byte_exact_with_meta(server, tmp_path):
    src = make_ct(tmp_path / "ct.dcm", "1.2.826.0.1.3680043.10.99.1")
    r = subprocess.run(
        [dcmtk("storescu"), "-aec", "MINIPACS", "-aet", "MODALITY1", "127.0.0.1", str(server.port), str(src)],
        capture_output=True,
        env=dcmtk_env(),
    )
    assert r.returncode == 0, r.stderr
    stored = server.stored_files()
    assert [p.name for p in stored] == ["CT.1.2.826.0.1.3680043.10.99.1"]
    assert dataset_bytes(stored[0]) == dataset_bytes(src)
    meta = meta_of(stored[0])
    assert uid_text(meta[0x0002]) == "1.2.840.10008.5.1.4.1.1.2"
    assert uid_text(meta[0x0003]) == "1.2.826.0.1.3680043.10.99.1"
    assert uid_text(meta[0x0010]) == "1.2.840.10008.1.2.1"
    assert meta[0x0016].strip() == b"MODALITY1"
    # dcmdump parses what we wrote.
    dump = subprocess.run([dcmtk("dcmdump"), "-q", str(stored[0])], capture_output=True, text=True)
    assert dump.returncode == 0 and "Test^Minipacs" in dump.stdout


def test_wrong_called_ae_is_rejected(server):
    r = subprocess.run(
        [dcmtk("echoscu"), "-aec", "SOMEONE", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert r.returncode != 0
    assert "Rejected" in (r.stdout + r.stderr)
    server.wait_log("called AE title not recognized")


def test_minipacs_echo_and_send_to_dcmtk_storescp(minipacs, tmp_path):
    port = free_port()
    out = tmp_path / "scp"
    out.mkdir()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "+B", "+xa", "-aet", "PACS", "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, scp)
        r = subprocess.run([minipacs, "echo", "--call", "PACS", "127.0.0.1", str(port)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        src_dir = tmp_path / "src"
        src_dir.mkdir()
        sources = [make_ct(src_dir / f"{i}.dcm", f"1.2.826.0.1.3680043.10.98.{i}") for i in range(5)]
        r = subprocess.run(
            [minipacs, "send", "--call", "PACS", "127.0.0.1", str(port), str(src_dir)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert "sent 5 object(s)" in r.stdout
        received = {dataset_bytes(p) for p in out.iterdir()}
        assert received == {dataset_bytes(p) for p in sources}
    finally:
        scp.terminate()
        scp.wait()


def test_send_reports_failure_when_refused(minipacs, server, tmp_path):
    # A wrong called AE title: the association is rejected, exit is non-zero.
    src = make_ct(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.97.1")
    r = subprocess.run(
        [minipacs, "send", "--call", "NOPE", "127.0.0.1", str(server.port), str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "rejected" in r.stderr


def test_pynetdicom_as_sender(server, tmp_path):
    from pydicom import dcmread
    from pynetdicom import AE

    src = make_ct(tmp_path / "p.dcm", "1.2.826.0.1.3680043.10.96.1")
    ds = dcmread(src)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    stored = server.stored_files()
    assert len(stored) == 1
    back = dcmread(stored[0])
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    assert meta_of(stored[0])[0x0016].strip() == b"PYNETDICOM"


def test_pynetdicom_as_receiver(minipacs, tmp_path):
    """minipacs send -> pynetdicom SCP that keeps the raw data set bytes."""
    from pynetdicom import AE, evt, StoragePresentationContexts

    received = []
    lock = threading.Lock()

    def on_store(event):
        with lock:
            received.append(
                (event.request.AffectedSOPInstanceUID, bytes(event.request.DataSet.getvalue()), event.context.transfer_syntax)
            )
        return 0x0000

    ae = AE(ae_title="PYSCP")
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        sources = [make_ct(tmp_path / f"{i}.dcm", f"1.2.826.0.1.3680043.10.95.{i}", size=300000) for i in range(3)]
        r = subprocess.run([minipacs, "echo", "--call", "PYSCP", "127.0.0.1", str(port)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [minipacs, "send", "--call", "PYSCP", "127.0.0.1", str(port), *map(str, sources)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        scp.shutdown()
    assert sorted(uid for uid, _, _ in received) == [f"1.2.826.0.1.3680043.10.95.{i}" for i in range(3)]
    by_uid = {uid: data for uid, data, _ in received}
    for i, src in enumerate(sources):
        assert by_uid[f"1.2.826.0.1.3680043.10.95.{i}"] == dataset_bytes(src)


def test_unsupported_abstract_syntax_refused_per_context(server):
    from dul import Connection, IMPLICIT_LE, VERIFICATION

    c = Connection(server.port)
    find = "1.2.840.10008.5.1.4.31"  # Modality Worklist FIND: not served here
    pdu_type, body = c.associate(contexts=[(1, VERIFICATION, [IMPLICIT_LE]), (3, find, [IMPLICIT_LE])])
    assert pdu_type == 0x02  # A-ASSOCIATE-AC
    results = _context_results(body)
    assert results == {1: 0, 3: 3}  # accepted; abstract syntax not supported
    assert c.echo() == 0
    assert c.release() == 0x06


def _context_results(ac_body):
    import struct

    pos = 68
    out = {}
    while pos < len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, pos)
        if item_type == 0x21:
            out[ac_body[pos + 4]] = ac_body[pos + 6]
        pos += 4 + length
    return out


@pytest.mark.parametrize("layout", ["flat", "study"])
def test_layouts_and_duplicates(server_factory, minipacs, tmp_path, layout):
    srv = server_factory(["--layout", layout])
    src = make_ct(tmp_path / "d.dcm", "1.2.826.0.1.3680043.10.94.1", study="1.2.826.0.1.3680043.10.94", series="1.2.826.0.1.3680043.10.94.5")
    for _ in range(2):
        r = subprocess.run([minipacs, "send", "127.0.0.1", str(srv.port), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    names = [str(p.relative_to(srv.store)) for p in srv.stored_files()]
    if layout == "flat":
        assert names == ["CT.1.2.826.0.1.3680043.10.94.1", "CT.1.2.826.0.1.3680043.10.94.1_1"]
    else:
        d = "1.2.826.0.1.3680043.10.94/1.2.826.0.1.3680043.10.94.5/"
        assert names == [d + "1.2.826.0.1.3680043.10.94.1.dcm", d + "1.2.826.0.1.3680043.10.94.1_1.dcm"]
    for p in srv.stored_files():
        assert dataset_bytes(p) == dataset_bytes(src)


def test_overwrite_replaces(server_factory, minipacs, tmp_path):
    srv = server_factory(["--overwrite"])
    a = make_ct(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.93.1")
    b = make_ct(tmp_path / "b.dcm", "1.2.826.0.1.3680043.10.93.1")
    for src in (a, b):
        r = subprocess.run([minipacs, "send", "127.0.0.1", str(srv.port), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    stored = srv.stored_files()
    assert len(stored) == 1
    assert dataset_bytes(stored[0]) == dataset_bytes(b)


def test_calling_ae_allowlist(server_factory, tmp_path):
    cfg = tmp_path / "allow.toml"
    cfg.write_text('[[allow]]\naetitle = "MODALITY1"\nhost = "127.0.0.1"\n\n[[allow]]\naetitle = "ELSEWHERE"\nhost = "192.0.2.1"\n')
    srv = server_factory(["--config", str(cfg)])

    def echo(aet):
        return subprocess.run(
            [dcmtk("echoscu"), "-aet", aet, "-aec", "MINIPACS", "127.0.0.1", str(srv.port)],
            capture_output=True, text=True, env=dcmtk_env(),
        )

    assert echo("MODALITY1").returncode == 0
    r = echo("ELSEWHERE")  # allowed, but only from another host
    assert r.returncode != 0 and "Rejected" in r.stdout + r.stderr
    r = echo("STRANGER")
    assert r.returncode != 0
    srv.wait_log("calling AE title not allowed")
