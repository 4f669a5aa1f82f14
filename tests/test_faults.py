"""Faults at the protocol edge and on the disk.

Each case ends in an abort, a rejection or a failure status; never a crash,
never a file under a final name that is not a complete acknowledged object;
and the server goes on serving the next sender.
"""

import os
import signal
import struct
import subprocess
import time

import pytest

import dul
from conftest import Server, dataset_bytes, dcmtk, dcmtk_env, make_ct


def assert_still_serving(server):
    assert server.alive(), server.logs()[-2000:]
    r = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert r.returncode == 0, r.stderr


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def associated(server, **kwargs):
    c = dul.Connection(server.port)
    pdu_type, _ = c.associate(**kwargs)
    assert pdu_type == 0x02, "expected A-ASSOCIATE-AC"
    return c


def read_abort(c):
    """Reads until an A-ABORT arrives or the connection closes; returns the
    abort's (source, reason), or None if it only closed."""
    while True:
        pdu_type, body = c.read_pdu()
        if pdu_type is None:
            return None
        if pdu_type == 0x07:
            return body[2], body[3]


DATASET = b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00" + b"\x00" * 200000


@pytest.mark.parametrize("how", ["abort", "close"])
def test_peer_gone_mid_object_leaves_nothing(server, how):
    c = associated(server)
    c.send(dul.pdata(3, True, True, dul.c_store_rq(1, dul.CT_IMAGE, "1.2.3.4.5")))
    c.send(dul.pdata(3, False, False, DATASET[:100000]))
    assert wait_until(lambda: len(server.temp_files()) == 1)
    if how == "abort":
        c.send(dul.ABORT)
    c.close()
    assert wait_until(lambda: not server.temp_files()), server.temp_files()
    assert server.stored_files() == []
    assert_still_serving(server)
    assert "1.2.3.4.5" not in "".join(p.name for p in server.stored_files())


def test_kill_9_mid_object_then_restart_sweeps(minipacs, tmp_path):
    store = tmp_path / "store"
    srv = Server(minipacs, store).start()
    try:
        c = associated(srv)
        c.send(dul.pdata(3, True, True, dul.c_store_rq(1, dul.CT_IMAGE, "1.2.3.4.6")))
        c.send(dul.pdata(3, False, False, DATASET[:100000]))
        assert wait_until(lambda: len(srv.temp_files()) == 1)
        worker = srv.worker_pid()
        srv.proc.kill()
        srv.proc.wait()
        c.close()
        # The worker dies with its keeper (as systemd would kill the whole
        # service); a restart comes after it is gone.
        assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"))
        # The crash leaves a temp file, and nothing under a final name.
        assert len(srv.temp_files()) == 1
        assert srv.stored_files() == []
    finally:
        srv.stop()
    again = Server(minipacs, store, port=srv.port).start()
    try:
        assert again.temp_files() == []
        again.wait_log("removed temp files left by an earlier crash")
        src = make_ct(tmp_path / "after.dcm", "1.2.826.0.1.3680043.10.80.1")
        r = subprocess.run(
            [dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(again.port), str(src)],
            capture_output=True,
            env=dcmtk_env(),
        )
        assert r.returncode == 0
        assert [p.name for p in again.stored_files()] == ["CT.1.2.826.0.1.3680043.10.80.1"]
    finally:
        assert again.stop() == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, mounted for the test (CI runs as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (this test needs root): {r.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_the_object_and_harms_nothing(server_factory, minipacs, small_fs, tmp_path):
    srv = server_factory(["--free-space-reserve", "0"], store=small_fs / "store")
    first = make_ct(tmp_path / "first.dcm", "1.2.826.0.1.3680043.10.81.1", size=300000)
    big = make_ct(tmp_path / "big.dcm", "1.2.826.0.1.3680043.10.81.2", size=6 * 1024 * 1024)
    third = make_ct(tmp_path / "third.dcm", "1.2.826.0.1.3680043.10.81.3", size=300000)

    def send(src):
        return subprocess.run([minipacs, "send", "127.0.0.1", str(srv.port), str(src)], capture_output=True, text=True)

    assert send(first).returncode == 0
    r = send(big)
    assert r.returncode != 0
    assert "status A700" in r.stderr, r.stderr
    # Nothing partial is visible, the temp file is gone, the first object
    # is intact, and the next object is stored.
    assert wait_until(lambda: not srv.temp_files())
    assert [p.name for p in srv.stored_files()] == ["CT.1.2.826.0.1.3680043.10.81.1"]
    assert dataset_bytes(srv.stored_files()[0]) == dataset_bytes(first)
    assert send(third).returncode == 0
    assert dataset_bytes(srv.store / "CT.1.2.826.0.1.3680043.10.81.3") == dataset_bytes(third)
    # dcmtk sees the refusal as Out of Resources.
    r = subprocess.run(
        [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(big)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert "Refused: OutOfResources" in r.stderr, r.stderr
    # The association survives a failed object: in one association, a
    # too-big object fails and the next one is stored.
    c = associated(srv)
    assert c.store(3, dul.CT_IMAGE, "1.2.3.4.10", b"\0" * (6 << 20)) == 0xA700
    assert c.store(3, dul.CT_IMAGE, "1.2.3.4.11", DATASET[:1000], message_id=2) == 0
    assert c.release() == 0x06
    assert "CT.1.2.3.4.11" in [p.name for p in srv.stored_files()]
    assert "CT.1.2.3.4.10" not in [p.name for p in srv.stored_files()]
    assert wait_until(lambda: not srv.temp_files())


def test_free_space_reserve_refuses_before_full(server_factory, minipacs, small_fs, tmp_path):
    (small_fs / "filler").write_bytes(b"\0" * (3 * 1024 * 1024))
    srv = server_factory(["--free-space-reserve", "50"], store=small_fs / "store")
    src = make_ct(tmp_path / "x.dcm", "1.2.826.0.1.3680043.10.82.1")
    r = subprocess.run([minipacs, "send", "127.0.0.1", str(srv.port), str(src)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "A700" in r.stderr and "reserve" in r.stderr, r.stderr
    assert srv.stored_files() == []


def _pdata_oversized(server):
    c = associated(server)
    c.send(struct.pack(">BBI", 0x04, 0, 0x7FFFFFF0) + b"\0" * 64)
    return c, True


def _wrong_context(server):
    c = associated(server)
    c.send(dul.pdata(99, True, True, dul.c_echo_rq()))
    return c, True


def _data_without_command(server):
    c = associated(server)
    c.send(dul.pdata(3, False, True, b"\0" * 16))
    return c, True


def _unknown_type_in_association(server):
    c = associated(server)
    c.send(struct.pack(">BBI", 0x09, 0, 4) + b"\0" * 4)
    return c, True


def _pdv_longer_than_pdu(server):
    c = associated(server)
    body = struct.pack(">IBB", 1000, 3, 3) + b"\0" * 10
    c.send(struct.pack(">BBI", 0x04, 0, len(body)) + body)
    return c, True


def _pdata_before_association(server):
    c = dul.Connection(server.port)
    c.send(dul.pdata(1, True, True, dul.c_echo_rq()))
    return c, True


def _truncated_header(server):
    c = dul.Connection(server.port)
    c.send(b"\x01\x00\x00")
    c.sock.shutdown(1)
    return c, False


def _absurd_associate_length(server):
    c = dul.Connection(server.port)
    c.send(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * 100)
    return c, False


def _unknown_first_pdu(server):
    c = dul.Connection(server.port)
    c.send(struct.pack(">BBI", 0x0A, 0, 4) + b"\0" * 4)
    return c, False


def _garbage_associate_rq(server):
    c = dul.Connection(server.port)
    c.send(struct.pack(">BBI", 0x01, 0, 40) + os.urandom(40))
    return c, True


def _tls_client_hello(server):
    c = dul.Connection(server.port)
    c.send(bytes.fromhex("160301020001") + os.urandom(200))
    return c, False


MALFORMED = {
    "p-data-longer-than-max-pdu": _pdata_oversized,
    "wrong-presentation-context": _wrong_context,
    "data-without-command": _data_without_command,
    "unknown-pdu-type-in-association": _unknown_type_in_association,
    "pdv-longer-than-its-pdu": _pdv_longer_than_pdu,
    "p-data-before-association": _pdata_before_association,
    "truncated-header": _truncated_header,
    "absurd-associate-rq-length": _absurd_associate_length,
    "unknown-first-pdu": _unknown_first_pdu,
    "garbage-associate-rq": _garbage_associate_rq,
    "tls-on-plain-port": _tls_client_hello,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_pdus(server, case):
    c, expect_abort = MALFORMED[case](server)
    abort = read_abort(c)
    if expect_abort:
        assert abort is not None, "expected an A-ABORT before the close"
        assert abort[0] == 2, "the provider aborts"
    c.close()
    assert server.stored_files() == []
    assert_still_serving(server)
    if case == "tls-on-plain-port":
        server.wait_log("TLS handshake (ClientHello) received on a plain DICOM port")


def test_hostile_uid_gets_failure_status_and_no_path(server, tmp_path):
    c = associated(server)
    for msg_id, uid in enumerate(["../../../tmp/evil", "1.2/../../x", ".hidden", "1.2.3" + "4" * 70], start=1):
        status = c.store(3, dul.CT_IMAGE, uid, DATASET[:2000], message_id=msg_id)
        assert status == 0xC000, hex(status)
    # The association goes on: a proper object is stored afterwards.
    assert c.store(3, dul.CT_IMAGE, "1.2.3.4.7", DATASET[:2000], message_id=9) == 0
    assert c.release() == 0x06
    assert [p.name for p in server.stored_files()] == ["CT.1.2.3.4.7"]
    assert not (tmp_path / "evil").exists() and not pathlib_exists("/tmp/evil")


def pathlib_exists(p):
    return os.path.exists(p)


def test_sop_class_mismatch_is_refused(server):
    c = associated(server)
    status = c.store(3, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.8", DATASET[:2000])
    assert status == 0xA900
    c.release()
    assert server.stored_files() == []


def test_acse_timeout_closes_silent_connections(server_factory):
    srv = server_factory(["--acse-timeout", "1"])
    c = dul.Connection(srv.port)
    started = time.monotonic()
    assert c.closed_by_peer(timeout=5)
    assert 0.8 < time.monotonic() - started < 4
    assert_still_serving(srv)


def test_dimse_timeout_aborts_idle_associations(server_factory):
    srv = server_factory(["--dimse-timeout", "1"])
    c = associated(srv)
    started = time.monotonic()
    assert read_abort(c) is not None
    assert 0.8 < time.monotonic() - started < 4
    assert_still_serving(srv)


def test_silent_connections_cannot_lock_out_a_sender(minipacs, tmp_path):
    cfg = tmp_path / "small-pending.toml"
    cfg.write_text("max_pending_connections = 8\nacse_timeout = 60\n")
    srv = Server(minipacs, tmp_path / "store", ["--config", str(cfg)]).start()
    try:
        idle = [dul.Connection(srv.port) for _ in range(40)]
        time.sleep(0.2)
        started = time.monotonic()
        assert_still_serving(srv)
        assert time.monotonic() - started < 3
        for c in idle:
            c.close()
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_the_object_in_flight(server_factory):
    srv = server_factory()
    busy = associated(srv)
    idle = associated(srv)
    busy.send(dul.pdata(3, True, True, dul.c_store_rq(1, dul.CT_IMAGE, "1.2.3.4.9")))
    busy.send(dul.pdata(3, False, False, DATASET[:100000]))
    assert wait_until(lambda: len(srv.temp_files()) == 1)
    srv.proc.send_signal(signal.SIGTERM)
    # The idle association is aborted; the busy one may finish its object.
    assert read_abort(idle) is not None
    time.sleep(0.3)
    busy.send(dul.pdata(3, False, True, DATASET[100000:]))
    assert dul.status_of(busy.read_command()) == 0
    assert srv.proc.wait(timeout=10) == 0
    assert [p.name for p in srv.stored_files()] == ["CT.1.2.3.4.9"]
    assert dataset_bytes(srv.stored_files()[0]) == DATASET
