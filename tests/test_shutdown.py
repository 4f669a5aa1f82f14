"""Stopping the service: SIGINT and SIGTERM end it with status 0 within a
bound, whatever its peers do, started as root (keeper + worker) and as a
normal user (one process).

What a stop must do (app/src/shutdown.rs): stop accepting, drop
connections that have not associated and abort idle associations at once,
let an object in flight finish and be answered 0000, and exit; a stalled
sender is cut off at `shutdown_timeout` (its object leaves no file); a
second signal cuts the graceful phase short.
"""

import os
import pathlib
import pwd
import signal
import socket
import subprocess
import time

import pytest

import dul
from conftest import Server, dataset_bytes, free_port, wait_port

DATASET = b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00" + os.urandom(300000)
# Well under the graceful bound these tests configure (30 s): a stop that
# waited for the bound instead of for the work would miss it.
PROMPT = 5.0

# keeper: started as root, a root keeper and an unprivileged worker;
# one-process: started as a normal user (nobody), no privilege separation.
MODES = ["keeper", "one-process"]
SIGNALS = [signal.SIGTERM, signal.SIGINT]


_started = []


@pytest.fixture(autouse=True)
def _no_server_left():
    """A failed test leaves no server running."""
    yield
    while _started:
        srv = _started.pop()
        if srv.alive():
            srv.proc.kill()
            srv.proc.wait()


def uid_of(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise KeyError("Uid")


def start(minipacs, tmp_path, mode, shutdown_timeout=30, more=""):
    """A server started as root or as nobody, on a configuration file in
    etc/ (which it may replace, as the last-good one) that names its store,
    logs and port, so that a restart on that file alone serves the same."""
    assert os.geteuid() == 0, "these tests start the server as root and as nobody"
    store, logs, etc, drop = (tmp_path / n for n in ("store", "logs", "etc", "drop"))
    # As root, the keeper makes the store and log folders for its worker
    # (it would refuse root's own); as nobody, they are made for nobody.
    for folder in (store, logs, etc, drop) if mode == "one-process" else (etc, drop):
        folder.mkdir()
    port = free_port()
    cfg = etc / "minipacs.toml"
    cfg.write_text(
        f'port = {port}\noutput_directory = "{store}"\nlog_directory = "{logs}"\n'
        f"shutdown_timeout = {shutdown_timeout}\n{more}"
    )
    prefix = ()
    if mode == "one-process":
        nobody = pwd.getpwnam("nobody")
        for path in (store, logs, etc, drop, cfg):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    srv = Server(minipacs, store, ["--config", str(cfg)], port=port, prefix=prefix)
    _started.append(srv)
    srv.start()
    if mode == "keeper":
        assert uid_of(srv.proc.pid) == 0
        worker = srv.worker_pid()
        assert worker != srv.proc.pid and uid_of(worker) != 0
    else:
        assert uid_of(srv.proc.pid) == pwd.getpwnam("nobody").pw_uid
        assert srv.worker_pid() == srv.proc.pid, "one process, no worker"
        assert "running unprivileged as one process" in srv.logs()
    return srv


def associated(srv):
    c = dul.Connection(srv.port)
    pdu_type, _ = c.associate()
    assert pdu_type == 0x02, "expected A-ASSOCIATE-AC"
    return c


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def exit_code_within(srv, seconds):
    """The server's exit status, asserting it came within `seconds`."""
    try:
        return srv.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        raise AssertionError(f"still running {seconds} s after the stop:\n{srv.logs()[-3000:]}")


def begin_object(srv, sop_instance):
    """An association with an object half sent; returns it once the
    server has the object's temp file open."""
    busy = associated(srv)
    busy.send(dul.pdata(3, True, True, dul.c_store_rq(1, dul.CT_IMAGE, sop_instance)))
    busy.send(dul.pdata(3, False, False, DATASET[:100000]))
    assert wait_until(lambda: len(srv.temp_files()) == 1), srv.logs()[-2000:]
    return busy


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("mode", MODES)
def test_idle_service_stops_at_once(minipacs, tmp_path, mode, sig):
    srv = start(minipacs, tmp_path, mode)
    idle = associated(srv)
    assert idle.echo() == 0
    silent = dul.Connection(srv.port)  # never sends its A-ASSOCIATE-RQ
    time.sleep(0.2)
    started = time.monotonic()
    srv.proc.send_signal(sig)
    assert exit_code_within(srv, PROMPT) == 0
    elapsed = time.monotonic() - started
    assert idle.closed_by_peer(timeout=1)
    assert silent.closed_by_peer(timeout=1)
    logs = srv.logs()
    assert "stop requested" in logs and "stopped" in logs, logs[-2000:]
    print(f"\n{mode} {sig.name}: exited 0 in {elapsed:.2f} s")


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("mode", MODES)
def test_object_in_flight_is_stored_then_the_service_exits(minipacs, tmp_path, mode, sig):
    srv = start(minipacs, tmp_path, mode)
    idle = associated(srv)
    busy = begin_object(srv, "1.2.3.4.11")
    srv.proc.send_signal(sig)
    # The idle association is aborted, new connections are refused...
    assert idle.closed_by_peer(timeout=PROMPT)
    assert wait_until(lambda: not _connectable(srv.port), timeout=PROMPT)
    # ...and the object still arrives, slowly, and is stored.
    rest = DATASET[100000:]
    for i in range(0, len(rest), 20000):
        assert srv.alive(), f"exited with an object in flight:\n{srv.logs()[-2000:]}"
        busy.send(dul.pdata(3, False, i + 20000 >= len(rest), rest[i : i + 20000]))
        time.sleep(0.1)
    assert dul.status_of(busy.read_command()) == 0
    answered = time.monotonic()
    assert exit_code_within(srv, PROMPT) == 0
    print(f"\n{mode} {sig.name}: exited 0 {time.monotonic() - answered:.2f} s after the object's 0000")
    assert [p.name for p in srv.stored_files()] == ["CT.1.2.3.4.11"]
    assert dataset_bytes(srv.stored_files()[0]) == DATASET
    assert srv.temp_files() == []


@pytest.mark.parametrize("mode", MODES)
def test_stalled_sender_is_cut_off_at_the_bound(minipacs, tmp_path, mode):
    srv = start(minipacs, tmp_path, mode, shutdown_timeout=2)
    busy = begin_object(srv, "1.2.3.4.12")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert exit_code_within(srv, 2 + PROMPT) == 0
    elapsed = time.monotonic() - started
    assert 1.8 < elapsed, f"did not wait for the object in flight ({elapsed:.2f} s)"
    assert busy.closed_by_peer(timeout=1)
    assert srv.stored_files() == [] and srv.temp_files() == []
    print(f"\n{mode}: stalled sender cut off, exited 0 in {elapsed:.2f} s (bound 2 s)")


@pytest.mark.parametrize("mode", MODES)
def test_second_signal_cuts_the_graceful_phase_short(minipacs, tmp_path, mode):
    srv = start(minipacs, tmp_path, mode, shutdown_timeout=30)
    busy = begin_object(srv, "1.2.3.4.13")
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert srv.alive(), "the first signal waits for the object in flight"
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    assert exit_code_within(srv, 3) == 0
    print(f"\n{mode}: second SIGINT, exited 0 in {time.monotonic() - started:.2f} s")
    assert busy.closed_by_peer(timeout=1)
    assert srv.stored_files() == [] and srv.temp_files() == []


@pytest.mark.parametrize("mode", MODES)
def test_restart_by_drop_finishes_the_object_in_flight_first(minipacs, tmp_path, mode):
    drop = tmp_path / "drop"
    srv = start(minipacs, tmp_path, mode, more=f'drop_directory = "{drop}"\n')
    pid = srv.proc.pid
    busy = begin_object(srv, "1.2.3.4.14")
    cfg = tmp_path / "etc" / "minipacs.toml"
    new_port = free_port()
    text = cfg.read_text().replace(f"port = {srv.port}", f"port = {new_port}")
    (drop / "minipacs.toml").write_text(text)
    result = (drop / "minipacs.toml.result")
    assert wait_until(result.exists, timeout=10), srv.logs()[-2000:]
    assert result.read_text().startswith("APPLIED\n"), result.read_text()
    # The restart waits for the object: send the rest, slowly.
    time.sleep(0.5)
    rest = DATASET[100000:]
    for i in range(0, len(rest), 50000):
        busy.send(dul.pdata(3, False, i + 50000 >= len(rest), rest[i : i + 50000]))
        time.sleep(0.1)
    assert dul.status_of(busy.read_command()) == 0
    wait_port(new_port, srv.proc, timeout=20)
    srv.port = new_port
    c = associated(srv)
    assert c.echo() == 0
    c.release()
    assert srv.proc.pid == pid and srv.alive(), "restarted in place (exec), same PID"
    assert [p.name for p in srv.stored_files()] == ["CT.1.2.3.4.14"]
    assert dataset_bytes(srv.stored_files()[0]) == DATASET
    assert srv.stop(signal.SIGTERM, timeout=PROMPT) == 0


def _connectable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
