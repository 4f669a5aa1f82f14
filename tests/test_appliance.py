"""The appliance service: privilege separation and systemd notification.

These run as root (CI does): the server is started as root with a real
`minipacs` user, made from the package's own sysusers.d file, and a
root-only TLS key, as on the device.
"""

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, Server, dcmtk, dcmtk_env, free_port, make_ct, wait_port

SYSUSERS = ROOT / "hal-config" / "sysusers.d" / "minipacs.conf"


@pytest.fixture(scope="module")
def minipacs_user():
    """The `minipacs` system user, made the way the package makes it."""
    assert os.geteuid() == 0, "these tests need root, as CI has"
    try:
        return pwd.getpwnam("minipacs")
    except KeyError:
        pass
    if shutil.which("systemd-sysusers") and SYSUSERS.exists():
        subprocess.run(["systemd-sysusers", str(SYSUSERS)], check=True)
    else:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "minipacs"], check=True)
    return pwd.getpwnam("minipacs")


def proc_status(pid):
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.split()
    return out


@pytest.fixture
def pki(minipacs, tmp_path):
    """A CA and a server certificate whose key is root-only (0600 root)."""
    ca = tmp_path / "ca"
    subprocess.run([minipacs, "ca", "new", str(ca)], check=True, capture_output=True)
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    subprocess.run([minipacs, "ca", "issue", str(ca), "--name", "localhost", "--cert", str(cert), "--key", str(key)],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    assert key.stat().st_uid == 0
    return {"ca": ca, "cacert": ca / "cacert.pem", "key": key, "cert": cert}


def test_worker_is_unprivileged_and_port_104_is_served(minipacs, minipacs_user, pki, tmp_path):
    tls_port = free_port()
    srv = Server(minipacs, tmp_path / "store", ["--tls", str(pki["key"]), str(pki["cert"]), "--tls-port", str(tls_port),
                                                 "--add-cert-file", str(pki["cacert"]), "--user", "minipacs"], port=104)
    srv.start()
    try:
        keeper, worker = srv.proc.pid, srv.worker_pid()
        assert worker != keeper
        st = proc_status(worker)
        assert st["Uid"] == [str(minipacs_user.pw_uid)] * 4
        assert st["Gid"] == [str(minipacs_user.pw_gid)] * 4
        assert st["Groups"] == [str(minipacs_user.pw_gid)]
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(st[cap][0], 16) == 0, (cap, st[cap])
        assert st["NoNewPrivs"] == ["1"]
        assert proc_status(keeper)["Uid"][0] == "0"
        # The worker cannot open the key file: as its user, reading fails,
        # and it holds no descriptor to it.
        r = subprocess.run(["setpriv", f"--reuid={minipacs_user.pw_uid}", f"--regid={minipacs_user.pw_gid}", "--clear-groups",
                            "cat", str(pki["key"])], capture_output=True)
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        fds = [os.readlink(p) for p in pathlib.Path(f"/proc/{worker}/fd").iterdir()]
        assert str(pki["key"]) not in fds
        # Port 104 (privileged) is served by the unprivileged worker.
        r = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", "104"], capture_output=True, env=dcmtk_env())
        assert r.returncode == 0, r.stderr
        src = make_ct(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.40.1")
        r = subprocess.run([dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", "104", str(src)], capture_output=True,
                           text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stderr + srv.logs()[-3000:]
        stored = srv.store / "CT.1.2.826.0.1.3680043.10.40.1"
        assert stored.stat().st_uid == minipacs_user.pw_uid
        # A certificate reload still works: the keeper reads the root-only
        # key and hands the new set to the worker.
        before = served_serial(tls_port, pki)
        subprocess.run([minipacs, "ca", "issue", str(pki["ca"]), "--name", "localhost", "--cert", str(pki["cert"]),
                        "--key", str(pki["key"])], check=True, capture_output=True)
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        after = before
        while after == before and time.monotonic() < deadline:
            time.sleep(0.2)
            after = served_serial(tls_port, pki)
        assert after != before
        srv.wait_log("sending it to the worker")
    finally:
        assert srv.stop() == 0


def served_serial(port, pki):
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki["cacert"]))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return der


class NotifySocket:
    """A real sd_notify datagram socket, as systemd provides."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))
        return self.messages

    def lines(self):
        return [m for _, m in self.messages]

    def wait_for(self, line, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if line in self.lines():
                return True
            self.drain(0.2)
        return False


def test_sd_notify_sequence_and_watchdog(minipacs, minipacs_user, pki, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    os.environ["NOTIFY_SOCKET"] = notify.path
    os.environ["WATCHDOG_USEC"] = "2000000"
    tls_port = free_port()
    try:
        srv = Server(minipacs, tmp_path / "store", ["--tls", str(pki["key"]), str(pki["cert"]), "--tls-port", str(tls_port),
                                                     "--add-cert-file", str(pki["cacert"])]).start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
        del os.environ["WATCHDOG_USEC"]
    try:
        assert notify.wait_for("READY=1")
        src = make_ct(tmp_path / "n.dcm", "1.2.826.0.1.3680043.10.41.1")
        subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(src)], check=True,
                       capture_output=True, env=dcmtk_env())
        notify.drain(3)
        lines = notify.lines()
        statuses = [l for l in lines if l.startswith("STATUS=")]
        assert any("1 object(s) stored" in s and "free" in s for s in statuses), statuses
        pings = [t for t, l in notify.messages if l == "WATCHDOG=1"]
        assert len(pings) >= 2, lines
        # A stuck event loop misses the watchdog: stop the worker.
        worker = srv.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        notify.messages.clear()
        notify.drain(3)
        assert "WATCHDOG=1" not in notify.lines(), "pinged while the worker was stopped"
        os.kill(worker, signal.SIGCONT)
        assert notify.wait_for("WATCHDOG=1", seconds=5)
        # Reload: RELOADING=1 then READY=1.
        notify.messages.clear()
        srv.proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING=1")
        assert notify.wait_for("READY=1")
        lines = notify.lines()
        assert lines.index("RELOADING=1") < len(lines) - 1 - lines[::-1].index("READY=1")
        notify.messages.clear()
    finally:
        code = srv.stop()
    assert code == 0
    notify.drain(1)
    assert "STOPPING=1" in notify.lines()
    sequence = [l.split("=")[0] for l in notify.lines() if not l.startswith(("STATUS", "WATCHDOG"))]
    print("\nsd_notify after SIGTERM:", notify.lines())
    assert sequence[-1] == "STOPPING" or "STOPPING" in sequence


def echo_ok(port, aet="MINIPACS"):
    r = subprocess.run([dcmtk("echoscu"), "-aec", aet, "127.0.0.1", str(port)], capture_output=True, env=dcmtk_env())
    return r.returncode == 0


def wait_file(path, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def dropping(minipacs, tmp_path):
    """A server whose configuration file names a drop folder."""
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    cfg = tmp_path / "minipacs.toml"
    cfg.write_text(
        f'port = {port}\noutput_directory = "{tmp_path / "store"}"\nlog_directory = "{tmp_path / "logs"}"\n'
        f'drop_directory = "{drop}"\n'
    )
    srv = Server(minipacs, tmp_path / "store", ["--config", str(cfg)], port=port)
    srv.start()
    yield srv, drop, cfg
    srv.stop()


@pytest.mark.parametrize(
    "text, verdict, detail",
    [
        ("port = \n", "REJECTED", "line 1"),
        ("max_associations = 0\n", "REJECTED", "max_associations"),
        ('[tls]\nkey = "/nonexistent/privkey.pem"\ncert = "/nonexistent/fullchain.pem"\n', "ROLLED BACK", "/nonexistent/privkey.pem"),
    ],
    ids=["bad-syntax", "bad-value", "unappliable"],
)
def test_config_drop_refused(dropping, text, verdict, detail):
    srv, drop, cfg = dropping
    before = cfg.read_text()
    (drop / "minipacs.toml").write_text(text)
    result = wait_file(drop / "minipacs.toml.result")
    assert result.startswith(verdict + "\n"), result
    assert detail in result, result
    assert (drop / "minipacs.toml.rejected").read_text() == text
    assert cfg.read_text() == before, "the last-good configuration was touched"
    assert srv.alive() and echo_ok(srv.port)


def test_config_drop_applied_live_keeps_associations(dropping, tmp_path):
    import dul

    srv, drop, cfg = dropping
    worker = srv.worker_pid()
    held = dul.Connection(srv.port)
    assert held.associate()[0] == 0x02
    text = cfg.read_text() + 'aetitle = "BEDSIDE"\nmax_associations = 4\n'
    (drop / "minipacs.toml").write_text(text)
    result = wait_file(drop / "minipacs.toml.result")
    assert result.startswith("APPLIED\n") and "without a restart" in result, result
    assert cfg.read_text() == text
    deadline = time.monotonic() + 10
    while not echo_ok(srv.port, "BEDSIDE") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert echo_ok(srv.port, "BEDSIDE")
    assert not echo_ok(srv.port, "MINIPACS")
    # Nothing in flight was dropped: the association opened before goes on.
    assert held.echo() == 0
    assert held.store(3, dul.CT_IMAGE, "1.2.3.6.1", b"\x08\x00\x16\x00UI\x02\x001\x00" * 50) == 0
    assert held.release() == 0x06
    assert srv.worker_pid() == worker, "the worker was restarted"
    srv.wait_log("configuration applied without a restart")


def test_config_drop_applied_with_port_change(dropping, tmp_path):
    srv, drop, cfg = dropping
    new_port = free_port()
    text = cfg.read_text().replace(f"port = {srv.port}", f"port = {new_port}") + 'aetitle = "BEDSIDE"\n'
    (drop / "minipacs.toml").write_text(text)
    result = wait_file(drop / "minipacs.toml.result")
    assert result.startswith("APPLIED\n"), result
    assert cfg.read_text() == text, "the new configuration is the last-good one"
    wait_port(new_port, srv.proc, timeout=20)
    deadline = time.monotonic() + 10
    while not echo_ok(new_port, "BEDSIDE") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert echo_ok(new_port, "BEDSIDE")
    assert not echo_ok(new_port, "MINIPACS"), "the old AE title still answers"
    assert srv.alive(), "the service is the same process, restarted in place"
    srv.port = new_port


def test_log_bundle_by_trigger_and_command(dropping, minipacs, tmp_path):
    import tarfile

    srv, drop, cfg = dropping
    src = make_ct(tmp_path / "b.dcm", "1.2.826.0.1.3680043.10.42.1")
    subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(src)], check=True,
                   capture_output=True, env=dcmtk_env())
    time.sleep(2.5)  # one status report
    (drop / "collect-logs").write_text("")
    deadline = time.monotonic() + 15
    bundles = []
    while not bundles and time.monotonic() < deadline:
        bundles = sorted(drop.glob("minipacs-logs-*.tar.gz"))
        time.sleep(0.2)
    assert bundles, "no bundle written for the trigger"
    assert not (drop / "collect-logs").exists()
    out = tmp_path / "by-command.tar.gz"
    r = subprocess.run([minipacs, "logs", "collect", "--config", str(cfg), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for bundle in (bundles[0], out):
        with tarfile.open(bundle) as tar:
            names = tar.getnames()
            print(f"\n{bundle.name}: {names}")
            for needed in ("MANIFEST.txt", "config.toml", "versions.txt", "disk.txt", "status.txt"):
                assert needed in names, (needed, names)
            assert any(n.startswith("logs/") and n.endswith("minipacs.log") for n in names), names
            assert any(n.endswith("audit.jsonl") for n in names), names
            assert any(n.endswith("keeper.log") for n in names), names
            audit = [tar.extractfile(n).read().decode() for n in names if n.endswith("audit.jsonl")][0]
            assert "1.2.826.0.1.3680043.10.42.1" in audit
            status = tar.extractfile("status.txt").read().decode()
            assert "stored" in status, status
        assert bundle.stat().st_size < 50 << 20
    assert srv.alive()


def test_tls_key_is_redacted_in_bundle(minipacs, pki, tmp_path):
    import tarfile

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'log_directory = "{tmp_path / "logs"}"\n[tls]\nkey = "{pki["key"]}"\ncert = "{pki["cert"]}"\n'
                   f'ca_files = ["{pki["cacert"]}"]\n')
    out = tmp_path / "bundle.tar.gz"
    r = subprocess.run([minipacs, "logs", "collect", "--config", str(cfg), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    assert str(pki["key"]).encode() not in blob
    assert b"PRIVATE KEY" not in blob


def test_activity_led_blinks_through_the_keeper(minipacs, minipacs_user, tmp_path):
    """The LED file is root's (as in sysfs); the keeper opens it and the
    unprivileged worker blinks it on each stored object."""
    led_dir = tmp_path / "leds" / "ACT"
    led_dir.mkdir(parents=True)
    (led_dir / "trigger").write_text("mmc0\n")
    brightness = led_dir / "brightness"
    brightness.write_text("")
    os.chmod(brightness, 0o644)
    cfg = tmp_path / "led.toml"
    cfg.write_text(f'activity_led = "{brightness}"\nuser = "minipacs"\n')
    srv = Server(minipacs, tmp_path / "store", ["--config", str(cfg)]).start()
    try:
        assert (led_dir / "trigger").read_text() == "none", "the kernel trigger was not switched off"
        src = make_ct(tmp_path / "l.dcm", "1.2.826.0.1.3680043.10.43.1")
        subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(src)], check=True,
                       capture_output=True, env=dcmtk_env())
        deadline = time.monotonic() + 5
        while brightness.read_text() != "0\n" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert brightness.read_text() == "0\n", "the LED was not blinked (on, then off)"
        assert brightness.stat().st_uid == 0
    finally:
        assert srv.stop() == 0


UNIT = ROOT / "hal-config" / "systemd" / "minipacs.service"
TMPFILES = ROOT / "hal-config" / "tmpfiles.d" / "minipacs.conf"


def unit_capabilities():
    """The unit's CapabilityBoundingSet=, as setpriv names them."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]
    raise AssertionError("the unit has no CapabilityBoundingSet=")


def test_keeper_with_the_units_capabilities_serves_the_folders_tmpfiles_made(minipacs, minipacs_user, tmp_path):
    """As on the image: the folders made by the package's tmpfiles.d (the
    store the worker's, 0750), the keeper uid 0 but with only the unit's
    capabilities (no CAP_DAC_OVERRIDE: it cannot write in the worker's
    folders). It must still take the store's lock and hand it over (the
    image's first boot failed here: "opening .../store/.lock: Permission
    denied")."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):  # tmpfiles resolves owners in --root
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store = root / "var" / "lib" / "minipacs" / "store"
    assert store.stat().st_uid == minipacs_user.pw_uid
    caps = ",".join(["-all", *(f"+{c}" for c in unit_capabilities())])
    srv = Server(minipacs, store, ["--user", "minipacs", "--log-directory", str(root / "var" / "log" / "minipacs")],
                 prefix=["setpriv", f"--bounding-set={caps}", "--inh-caps=-all"])
    srv.start()
    try:
        assert proc_status(srv.proc.pid)["CapEff"] != ["000001ffffffffff"]
        src = make_ct(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.41.1")
        r = subprocess.run([dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port), str(src)],
                           capture_output=True, text=True, env=dcmtk_env())
        assert r.returncode == 0, r.stderr + srv.logs()[-3000:]
        assert (store / "CT.1.2.826.0.1.3680043.10.41.1").stat().st_uid == minipacs_user.pw_uid
    finally:
        assert srv.stop() == 0
