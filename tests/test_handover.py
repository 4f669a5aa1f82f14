"""The keeper hands the worker its folders as descriptors and never takes a
folder from its owner (issue 12, item 1).

These run as root, with a normal user made by the test, as in the founding
article: a store owned by that user, mode 0755, served by a root start.
"""

import os
import pathlib
import pwd
import socket
import subprocess

import pytest

from conftest import Server, dcmtk, dcmtk_env, free_port, is_index_file, make_ct

OWNER = "mpxowner"


@pytest.fixture(scope="module")
def users():
    """(the worker's default user minipacs, a normal user owning a store)."""
    assert os.geteuid() == 0, "these tests need root, as CI has"
    for name, system in (("minipacs", True), (OWNER, False)):
        try:
            pwd.getpwnam(name)
        except KeyError:
            flags = ["--system", "--no-create-home"] if system else ["--no-create-home"]
            subprocess.run(["useradd", *flags, "--shell", "/usr/sbin/nologin", name], check=True)
    return pwd.getpwnam("minipacs"), pwd.getpwnam(OWNER)


def snapshot(top):
    """Every entry under `top` (itself included) with owner, group and mode."""
    top = pathlib.Path(top)
    out = {}
    for p in [top, *top.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(top))] = (st.st_uid, st.st_gid, st.st_mode)
    return out


def config(tmp_path, logs):
    cfg = tmp_path / "handover.toml"
    cfg.write_text(f'log_directory = "{logs}"\n')
    return cfg


def article_store(tmp_path, owner):
    """/reserve/playground/pacs of the article: the owner's, 0755, under a
    root folder the worker cannot traverse (pytest's are 0700)."""
    store = tmp_path / "reserve" / "playground" / "pacs"
    store.mkdir(parents=True)
    (store / "earlier.txt").write_text("the owner's own file\n")
    os.chown(store / "earlier.txt", owner.pw_uid, owner.pw_gid)
    os.chown(store, owner.pw_uid, owner.pw_gid)
    os.chmod(store, 0o755)
    return store


def start_refused(minipacs, store, extra, timeout=20):
    cmd = [minipacs, "serve", "--port", str(free_port()), "--output-directory", str(store), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def send(tmp_path, srv, uid):
    src = make_ct(tmp_path / f"{uid}.dcm", uid)
    r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(src)],
                       capture_output=True, text=True, env=dcmtk_env())
    assert r.returncode == 0, r.stderr + srv.logs()[-3000:]


def test_another_users_store_is_refused_with_the_fix_and_left_as_it_was(minipacs, users, tmp_path):
    worker, owner = users
    store = article_store(tmp_path, owner)
    logs = tmp_path / "logs"
    before = snapshot(tmp_path / "reserve")
    r = start_refused(minipacs, store, ["--config", str(config(tmp_path, logs))])
    assert r.returncode != 0
    print(r.stderr)
    message = r.stderr
    assert f"store folder {store} belongs to user {OWNER} (mode 0755)" in message, message
    assert "the worker runs as user minipacs, who cannot write to it" in message, message
    assert f"--user {OWNER}" in message and "--output-directory" in message, message
    assert snapshot(tmp_path / "reserve") == before
    assert not logs.exists(), "a refused start made the log folder"


def test_another_users_store_is_used_as_it_is_with_user_owner(minipacs, users, tmp_path):
    worker, owner = users
    store = article_store(tmp_path, owner)
    logs = tmp_path / "logs"
    srv = Server(minipacs, store, ["--user", OWNER, "--config", str(config(tmp_path, logs))])
    srv.start()
    try:
        send(tmp_path, srv, "1.2.826.0.1.3680043.10.70.1")
        send(tmp_path, srv, "1.2.826.0.1.3680043.10.70.2")
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    st = store.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (owner.pw_uid, owner.pw_gid, 0o755)
    names = sorted(p.name for p in store.iterdir())
    # The index is the worker's too (its -wal and -shm may outlive the stop).
    assert "index.sqlite" in names, names
    assert (store / "index.sqlite").stat().st_uid == owner.pw_uid
    names = [n for n in names if not is_index_file(n)]
    assert names == [".incoming", ".lock", "CT.1.2.826.0.1.3680043.10.70.1", "CT.1.2.826.0.1.3680043.10.70.2",
                     "earlier.txt"], names
    assert (store / "CT.1.2.826.0.1.3680043.10.70.1").stat().st_uid == owner.pw_uid
    assert (store / "earlier.txt").stat().st_uid == owner.pw_uid
    # Never both: it stored, so it did not refuse.
    assert "cannot write to it" not in srv.logs()


def test_a_store_under_a_0700_root_folder_works_and_the_worker_reaches_only_its_folders(minipacs, users, tmp_path):
    worker, _ = users
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    store, logs = private / "store", private / "logs"
    srv = Server(minipacs, store, ["--config", str(config(tmp_path, logs))])
    srv.start()
    try:
        send(tmp_path, srv, "1.2.826.0.1.3680043.10.71.1")
        # The worker holds the store and log folders (and files in them),
        # sockets, /dev/null and the test's capture of its output: nothing
        # else of the filesystem.
        fds = [os.readlink(p) for p in pathlib.Path(f"/proc/{srv.worker_pid()}/fd").iterdir()]
        paths = [f for f in fds if f.startswith("/") and f not in ("/dev/null", str(srv.log_path))]
        assert any(f == str(store) for f in paths), fds
        assert any(f == str(logs) for f in paths), fds
        assert all(f.startswith((str(store), str(logs))) for f in paths), fds
        logs_text = srv.wait_log(f"made {store} for user minipacs")
        assert f"made {logs} for user minipacs" in logs_text
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    assert (private.stat().st_mode & 0o7777, private.stat().st_uid) == (0o700, 0)
    assert (store / "CT.1.2.826.0.1.3680043.10.71.1").stat().st_uid == worker.pw_uid
    assert store.stat().st_uid == worker.pw_uid
    # The worker's file log and audit trail are in the log folder.
    assert (logs / "minipacs.log").stat().st_uid == worker.pw_uid
    assert "1.2.826.0.1.3680043.10.71.1" in (logs / "audit.jsonl").read_text()


def test_a_root_start_that_cannot_bind_changes_nothing_on_disk(minipacs, users, tmp_path):
    worker, owner = users
    # A store the worker could use (another user's, but open to all) and a
    # store and log folder that do not exist yet.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, owner.pw_uid, owner.pw_gid)
    os.chmod(shared, 0o777)
    (shared / ".incoming").mkdir()
    os.chown(shared / ".incoming", owner.pw_uid, owner.pw_gid)
    os.chmod(shared / ".incoming", 0o700)
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        for store in (shared, tmp_path / "new-store"):
            before = snapshot(tmp_path)
            logs = tmp_path / "new-logs"
            cmd = [minipacs, "serve", "--port", str(port), "--output-directory", str(store),
                   "--config", str(config(tmp_path, logs))]
            before = snapshot(tmp_path)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            assert r.returncode != 0
            assert "Address already in use" in r.stderr, r.stderr
            assert snapshot(tmp_path) == before, r.stderr
            assert not logs.exists() and not (tmp_path / "new-store").exists()
    finally:
        busy.close()


def test_switching_user_after_a_root_run_is_refused_not_silent(minipacs, users, tmp_path):
    worker, owner = users
    logs = tmp_path / "logs"
    cfg = config(tmp_path, logs)
    srv = Server(minipacs, tmp_path / "store", ["--config", str(cfg)])
    srv.start()
    send(tmp_path, srv, "1.2.826.0.1.3680043.10.72.1")
    assert srv.stop() == 0, srv.logs()[-3000:]
    assert logs.stat().st_uid == worker.pw_uid
    before = snapshot(logs)
    # The same log folder for a worker running as another user: it cannot
    # write there, so the service says so and starts nothing.
    r = start_refused(minipacs, tmp_path / "store2", ["--user", OWNER, "--config", str(cfg)])
    assert r.returncode != 0
    message = r.stderr
    assert f"log folder {logs} belongs to user minipacs" in message, message
    assert f"the worker runs as user {OWNER}, who cannot write to it" in message, message
    assert "--user minipacs" in message and "log_directory" in message, message
    assert snapshot(logs) == before
    assert not (tmp_path / "store2").exists(), "a refused start made the store"


def test_a_worker_owned_log_folder_gets_back_files_an_earlier_user_left(minipacs, users, tmp_path):
    """A log folder of the worker's own user holding a log another user
    wrote: the file is given to the worker (and that is logged), so the file
    log does not fall back to stderr."""
    worker, owner = users
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, owner.pw_uid, owner.pw_gid)
    os.chmod(logs, 0o750)
    (logs / "minipacs.log").write_text("an earlier run's line\n")
    os.chown(logs / "minipacs.log", worker.pw_uid, worker.pw_gid)
    os.chmod(logs / "minipacs.log", 0o640)
    store = tmp_path / "store"
    srv = Server(minipacs, store, ["--user", OWNER, "--config", str(config(tmp_path, logs))])
    srv.start()
    try:
        text = srv.wait_log(f"gave {logs / 'minipacs.log'} (owned by minipacs) to user {OWNER}")
        assert "file log unavailable" not in text
    finally:
        assert srv.stop() == 0, srv.logs()[-3000:]
    assert (logs / "minipacs.log").stat().st_uid == owner.pw_uid
    assert "listening" in (logs / "minipacs.log").read_text()
