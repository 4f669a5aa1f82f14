"""Concurrency, the association cap, and one very large object."""

import hashlib
import time
import os
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor

import dul
from conftest import data_set_offset, dataset_bytes, dcmtk, dcmtk_env, make_ct


def test_eight_dcmtk_senders_at_once(server, tmp_path):
    """8 storescu processes x 50 objects, concurrently: every object is
    acknowledged and stored byte-exact."""
    folders = []
    sources = []
    for s in range(8):
        d = tmp_path / f"sender{s}"
        d.mkdir()
        folders.append(d)
        for i in range(50):
            sources.append(make_ct(d / f"{i}.dcm", f"1.2.826.0.1.3680043.10.70.{s}.{i}", size=20000))

    def run(folder):
        return subprocess.run(
            [dcmtk("storescu"), "-aec", "MINIPACS", "+sd", "127.0.0.1", str(server.port), str(folder)],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, folders))
    for r in results:
        assert r.returncode == 0, r.stderr
    stored = {p.name: dataset_bytes(p) for p in server.stored_files()}
    assert len(stored) == 400
    for src in sources:
        uid = src.parent.name.replace("sender", "")
        name = f"CT.1.2.826.0.1.3680043.10.70.{uid}.{src.stem}"
        assert stored[name] == dataset_bytes(src)
    deadline = time.monotonic() + 10
    while server.logs().count("C-STORE") < 400 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.logs().count("C-STORE") >= 400


def test_association_cap_rejects_transiently_while_others_go_on(server_factory):
    srv = server_factory(["--max-associations", "2"])
    held = []
    for _ in range(2):
        c = dul.Connection(srv.port)
        pdu_type, _ = c.associate()
        assert pdu_type == 0x02
        held.append(c)
    # One more: A-ASSOCIATE-RJ, result 2 (rejected-transient), source 3
    # (service provider, presentation), reason 2 (local limit exceeded).
    extra = dul.Connection(srv.port)
    pdu_type, body = extra.associate()
    assert pdu_type == 0x03
    assert (body[1], body[2], body[3]) == (2, 3, 2)
    extra.close()
    r = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert r.returncode != 0 and "Rejected Transient" in r.stdout + r.stderr, r.stdout + r.stderr
    # The associations in progress carry on.
    for i, c in enumerate(held):
        assert c.store(3, dul.CT_IMAGE, f"1.2.3.5.{i}", b"\x08\x00\x16\x00UI\x02\x001\x00" * 100) == 0
        assert c.release() == 0x06
    # And a slot is free again.
    r = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port)],
        capture_output=True,
        env=dcmtk_env(),
    )
    assert r.returncode == 0


def _write_big_object(path, pixel_bytes):
    """A Secondary Capture Part-10 file whose pixel data is `pixel_bytes`
    long, written as a sparse file: the header by hand, then a hole."""

    def el(group, elem, vr, value):
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    sop_class = b"1.2.840.10008.5.1.4.1.1.7"
    sop_instance = b"1.2.826.0.1.3680043.10.60.1"
    meta_body = (
        struct.pack("<HH", 2, 1) + b"OB\0\0" + struct.pack("<I", 2) + b"\0\1"
        + el(2, 2, b"UI", sop_class)
        + el(2, 3, b"UI", sop_instance)
        + el(2, 0x10, b"UI", b"1.2.840.10008.1.2.1")
        + el(2, 0x12, b"UI", b"1.2.826.0.1.3680043.10.60")
    )
    meta = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(meta_body)) + meta_body
    ds = (
        el(8, 0x16, b"UI", sop_class)
        + el(8, 0x18, b"UI", sop_instance)
        + el(0x20, 0x0D, b"UI", b"1.2.826.0.1.3680043.10.60")
        + el(0x20, 0x0E, b"UI", b"1.2.826.0.1.3680043.10.60.2")
        + struct.pack("<HH", 0x7FE0, 0x10) + b"OB\0\0" + struct.pack("<I", pixel_bytes)
    )
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta + ds)
        # A few non-zero marks so that misplaced bytes would show.
        for offset in range(0, pixel_bytes, 256 << 20):
            f.seek(128 + 4 + len(meta) + len(ds) + offset)
            f.write(os.urandom(4096))
        f.truncate(128 + 4 + len(meta) + len(ds) + pixel_bytes)
    return path


def _sha256_of_dataset(path):
    head = dataset_bytes_head_len(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(head)
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def dataset_bytes_head_len(path):
    """Offset of the data set in a Part-10 file (reads only the header)."""
    with open(path, "rb") as f:
        return data_set_offset(path, f.read(4096))


def test_two_gib_object_in_bounded_memory(server, minipacs, tmp_path):
    src = _write_big_object(tmp_path / "big.dcm", 2 << 30)
    r = subprocess.run([minipacs, "send", "127.0.0.1", str(server.port), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak_kib = server.status("VmHWM")
    print(f"\nserver peak RSS after a 2 GiB object: {peak_kib / 1024:.1f} MiB")
    assert peak_kib <= 16 * 1024, f"peak RSS {peak_kib} KiB"
    stored = server.stored_files()
    assert [p.name for p in stored] == ["SC.1.2.826.0.1.3680043.10.60.1"]
    assert stored[0].stat().st_size - dataset_bytes_head_len(stored[0]) == src.stat().st_size - dataset_bytes_head_len(src)
    assert _sha256_of_dataset(stored[0]) == _sha256_of_dataset(src)
