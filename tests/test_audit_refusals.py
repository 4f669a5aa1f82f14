"""Connections turned away leave a line in the audit trail, with the reason.

"Who tried to send to this device and was refused, and why" must have an
answer on disk as durable as "what was received": a wrong called AE title
(A-ASSOCIATE-RJ) and a failed TLS handshake (a client certificate from
another CA, something that is not TLS at all, plain DICOM on the TLS port)
each write an `association` line to `audit.jsonl`.
"""

import json
import socket
import ssl
import subprocess
import time

import pytest

from conftest import Server, dcmtk, dcmtk_env, free_port, wait_port


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"


@pytest.fixture
def audited(minipacs, tmp_path):
    """A TLS server with its log folder under tmp_path, a client certificate
    from its CA and one from an unrelated CA."""
    ca, other = tmp_path / "ca", tmp_path / "other-ca"
    run([minipacs, "ca", "new", str(ca)])
    run([minipacs, "ca", "new", str(other), "--name", "Some Other CA"])
    certs = {}
    for name, issuer in [("localhost", ca), ("client", ca), ("stranger", other)]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        run([minipacs, "ca", "issue", str(issuer), "--name", name, "--cert", str(cert), "--key", str(key)])
        certs[name] = (key, cert)
    logs = tmp_path / "logs"
    cfg = tmp_path / "minipacs.toml"
    cfg.write_text(f'log_directory = "{logs}"\n')
    tls_port = free_port()
    key, cert = certs["localhost"]
    srv = Server(minipacs, tmp_path / "store", ["--config", str(cfg), "--tls", str(key), str(cert),
                                                 "--tls-port", str(tls_port), "--add-cert-file", str(ca / "cacert.pem")])
    srv.start()
    wait_port(tls_port, srv.proc)
    srv.tls_port = tls_port
    yield srv, logs, certs, ca / "cacert.pem"
    assert srv.stop() == 0, srv.logs()[-3000:]


def audit_line(logs, match, timeout=10):
    """The first audit line for which `match` holds, waiting for it."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        path = logs / "audit.jsonl"
        seen = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
        for line in seen:
            if match(line):
                return line
        time.sleep(0.1)
    raise AssertionError(f"no matching audit line in {seen}")


def test_a_wrong_called_ae_title_is_audited_with_its_reason(audited):
    srv, logs, _, _ = audited
    r = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "WRONG", "127.0.0.1", str(srv.port)],
                       capture_output=True, text=True, env=dcmtk_env())
    assert r.returncode != 0, "the association should have been rejected"
    line = audit_line(logs, lambda l: l.get("outcome") == "rejected")
    assert line["event"] == "association"
    assert line["called_ae"] == "WRONG"
    assert line["calling_ae"] == "ECHOSCU"
    assert line["reason"] == "called AE title not recognized"
    assert line["peer"].startswith("127.0.0.1:")
    assert line["tls_version"] is None
    assert line["time"].endswith("Z")
    # The right AE title still gets in, and is not recorded as rejected.
    r = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port)], capture_output=True,
                       env=dcmtk_env())
    assert r.returncode == 0, r.stderr
    released = audit_line(logs, lambda l: l.get("outcome") == "released")
    assert "reason" not in released


def tls_client(port, cacert, identity):
    """Connects with a client certificate; returns the error, if any, seen
    by the time the server has judged the certificate."""
    ctx = ssl.create_default_context(cafile=str(cacert))
    ctx.check_hostname = False
    ctx.load_cert_chain(certfile=str(identity[1]), keyfile=str(identity[0]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                # Under TLS 1.3 the client's handshake ends before the server
                # has checked the client certificate: its verdict comes next.
                tls.recv(1)
    except (ssl.SSLError, ConnectionError, socket.timeout) as e:
        return e
    return None


def test_failed_tls_handshakes_are_audited_with_the_error(audited):
    srv, logs, certs, cacert = audited
    failed = lambda l: l.get("outcome") == "tls_failed"

    # A client certificate from another CA.
    assert tls_client(srv.tls_port, cacert, certs["stranger"]) is not None
    line = audit_line(logs, failed)
    assert line["event"] == "association"
    assert line["peer"].startswith("127.0.0.1:")
    assert "certificate" in line["reason"].lower() or "issuer" in line["reason"].lower(), line
    assert line["time"].endswith("Z")

    # Not TLS at all: an HTTP request on the TLS port.
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            s.recv(100)
        except ConnectionError:
            pass
    audit_line(logs, lambda l: failed(l) and l["reason"] != line["reason"])

    # Plain DICOM on the TLS port.
    r = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.tls_port)], capture_output=True,
                       env=dcmtk_env())
    assert r.returncode != 0
    audit_line(logs, lambda l: failed(l) and "plain DICOM" in l["reason"])

    # A certificate from the right CA still gets through the handshake and
    # leaves no tls_failed line of its own.
    before = len([l for l in (logs / "audit.jsonl").read_text().splitlines() if '"tls_failed"' in l])
    assert tls_client_ok(srv.tls_port, cacert, certs["client"])
    time.sleep(0.5)
    after = len([l for l in (logs / "audit.jsonl").read_text().splitlines() if '"tls_failed"' in l])
    assert after == before


def tls_client_ok(port, cacert, identity):
    ctx = ssl.create_default_context(cafile=str(cacert))
    ctx.check_hostname = False
    ctx.load_cert_chain(certfile=str(identity[1]), keyfile=str(identity[0]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version() in ("TLSv1.2", "TLSv1.3")


def test_the_status_file_reports_the_log_writers(audited):
    srv, logs, _, _ = audited
    deadline = time.monotonic() + 10
    text = ""
    while "log writers:" not in text and time.monotonic() < deadline:
        time.sleep(0.2)
        path = logs / "status.txt"
        text = path.read_text() if path.exists() else ""
    print("\nstatus.txt:", text)
    status, writers = text.splitlines()[:2]
    assert "association(s)" in status and "free" in status, status
    assert "log line(s) dropped" not in status, "nothing was lost, so the status line says nothing"
    assert writers == ("log writers: service log: 0 line(s) dropped, 0 cut, 0 I/O error(s); "
                       "audit trail: 0 line(s) dropped, 0 cut, 0 I/O error(s)"), writers
