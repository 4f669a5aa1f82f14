"""DICOM over TLS against real peers, with real certificates.

Certificates come from `minipacs ca` (the dcmtk_ca.pl replacement) and, for
the cases that must prove interoperability with the old way, from the
openssl command line as dcmtk_ca.pl makes them.
"""

import os
import pathlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

import dul
from conftest import Server, dataset_bytes, dcmtk, dcmtk_env, free_port, make_ct, wait_port

OPENSSL = "/usr/bin/openssl"


def run(cmd, **kwargs):
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture(scope="session")
def pki(minipacs, tmp_path_factory):
    """A CA made by `minipacs ca new`, an EC server and client certificate,
    an RSA client certificate, and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = root / "ca"
    run([minipacs, "ca", "new", str(ca)])
    out = {"ca": ca, "cacert": ca / "cacert.pem", "root": root}
    for name, extra in [("server", []), ("client", []), ("rsaclient", ["--rsa"])]:
        cert, key = root / f"{name}.pem", root / f"{name}.key"
        run([minipacs, "ca", "issue", str(ca), "--cert", str(cert), "--key", str(key), "--name", "localhost" if name == "server" else name, *extra])
        out[name] = (key, cert)
    other = root / "other-ca"
    run([minipacs, "ca", "new", str(other), "--name", "Some Other CA"])
    cert, key = root / "stranger.pem", root / "stranger.key"
    run([minipacs, "ca", "issue", str(other), "--cert", str(cert), "--key", str(key), "--name", "stranger"])
    out["stranger"] = (key, cert)
    return out


def openssl_cert(pki, name, days="30", rsa=True, pkcs1=True):
    """A certificate the way dcmtk_ca.pl makes them: an openssl RSA key
    (traditional PKCS#1 PEM), a request, signed by the CA with openssl."""
    root = pki["root"]
    key, csr, cert = root / f"{name}.key", root / f"{name}.csr", root / f"{name}.pem"
    if rsa:
        run([OPENSSL, "genrsa", "-out", str(key), "2048"])
        if pkcs1:
            run([OPENSSL, "rsa", "-in", str(key), "-out", str(key), "-traditional"])
    else:
        run([OPENSSL, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)])
    run([OPENSSL, "req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}"])
    ext = root / f"{name}.ext"
    ext.write_text("basicConstraints=CA:false\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run([OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(pki["cacert"]), "-CAkey", str(pki["ca"] / "private" / "cakey.pem"),
         "-CAcreateserial", "-days", days, "-extfile", str(ext), "-out", str(cert)])
    return key, cert


def tls_server(server_factory, pki, identity=None, extra=()):
    key, cert = identity or pki["server"]
    tls_port = free_port()
    srv = server_factory(["--tls", str(key), str(cert), "--tls-port", str(tls_port), "--add-cert-file", str(pki["cacert"]), *extra])
    wait_port(tls_port, srv.proc)
    srv.tls_port = tls_port
    return srv


def storescu_tls(port, identity, cacert, files, extra=()):
    key, cert = identity
    return subprocess.run(
        [dcmtk("storescu"), "+tls", str(key), str(cert), "--add-cert-file", str(cacert), *extra, "-aec", "MINIPACS", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(),
    )


def test_dcmtk_storescu_tls_to_minipacs(server_factory, pki, tmp_path):
    srv = tls_server(server_factory, pki)
    src = make_ct(tmp_path / "a.dcm", "1.2.826.0.1.3680043.10.50.1")
    r = storescu_tls(srv.tls_port, pki["client"], pki["cacert"], [src], extra=["-v"])
    assert r.returncode == 0, r.stderr
    assert dataset_bytes(srv.store / "CT.1.2.826.0.1.3680043.10.50.1") == dataset_bytes(src)
    logs = srv.wait_log("stored=1")
    line = [l for l in logs.splitlines() if "association" in l and "stored=1" in l][0]
    assert "TLSv1_3" in line or "TLSv1_2" in line
    assert "peer_cert=CN=client" in line


def test_rsa_client_certificate(server_factory, pki, tmp_path):
    srv = tls_server(server_factory, pki)
    src = make_ct(tmp_path / "r.dcm", "1.2.826.0.1.3680043.10.50.2")
    r = storescu_tls(srv.tls_port, pki["rsaclient"], pki["cacert"], [src])
    assert r.returncode == 0, r.stderr
    assert (srv.store / "CT.1.2.826.0.1.3680043.10.50.2").exists()


def test_ecdsa_server_on_tls12(server_factory, pki):
    """An ECDSA server certificate works on TLS 1.2 too."""
    srv = tls_server(server_factory, pki)
    key, cert = pki["client"]
    r = subprocess.run(
        [OPENSSL, "s_client", "-tls1_2", "-connect", f"127.0.0.1:{srv.tls_port}", "-cert", str(cert), "-key", str(key),
         "-CAfile", str(pki["cacert"]), "-verify_return_error", "-brief"],
        input="", capture_output=True, text=True, timeout=20,
    )
    assert "Protocol version: TLSv1.2" in r.stderr, r.stderr
    assert re.search(r"Ciphersuite: ECDHE-ECDSA-(AES|CHACHA)", r.stderr), r.stderr


def test_minipacs_send_tls_to_dcmtk_storescp(minipacs, pki, tmp_path):
    port = free_port()
    out = tmp_path / "scp"
    out.mkdir()
    key, cert = pki["server"]
    scp = subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(key), str(cert), "--add-cert-file", str(pki["cacert"]), "+B", "+xa", "-aet", "PACS", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, scp)
        ckey, ccert = pki["client"]
        src = [make_ct(tmp_path / f"{i}.dcm", f"1.2.826.0.1.3680043.10.51.{i}") for i in range(3)]
        tls = ["--tls", str(ckey), str(ccert), "--add-cert-file", str(pki["cacert"])]
        r = subprocess.run([minipacs, "echo", *tls, "--call", "PACS", "localhost", str(port)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([minipacs, "send", *tls, "--call", "PACS", "127.0.0.1", str(port), "--tls-server-name", "localhost", *map(str, src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert {dataset_bytes(p) for p in out.iterdir()} == {dataset_bytes(p) for p in src}
    finally:
        scp.terminate()
        scp.wait()


def _client_context(pki, identity=True):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["cacert"]))
    if identity:
        key, cert = pki["client"]
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_pynetdicom_tls_sender(server_factory, pki, tmp_path):
    from pydicom import dcmread
    from pynetdicom import AE

    srv = tls_server(server_factory, pki)
    src = make_ct(tmp_path / "p.dcm", "1.2.826.0.1.3680043.10.52.1")
    ds = dcmread(src)
    ae = AE(ae_title="PYTLS")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", srv.tls_port, ae_title="MINIPACS", tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    assert dcmread(srv.store / "CT.1.2.826.0.1.3680043.10.52.1").SOPInstanceUID == ds.SOPInstanceUID


def test_pynetdicom_tls_receiver(minipacs, pki, tmp_path):
    from pynetdicom import AE, evt, StoragePresentationContexts

    got = []

    def on_store(event):
        got.append(bytes(event.request.DataSet.getvalue()))
        return 0

    key, cert = pki["server"]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["cacert"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="PYSCP")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        src = make_ct(tmp_path / "q.dcm", "1.2.826.0.1.3680043.10.53.1")
        ckey, ccert = pki["client"]
        r = subprocess.run([minipacs, "send", "--tls", str(ckey), str(ccert), "--add-cert-file", str(pki["cacert"]), "--call", "PYSCP",
                            "localhost", str(port), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        scp.shutdown()
    assert got == [dataset_bytes(src)]


def test_sec1_ec_key_and_chacha20_preference(server_factory, pki, tmp_path):
    """A SEC1 ("EC PRIVATE KEY") server key from openssl; with
    --cipher-preference chacha20 the server picks ChaCha20-Poly1305 even
    when the client lists AES first."""
    server_id = openssl_cert(pki, "secserver", rsa=False)
    assert "BEGIN EC PRIVATE KEY" in server_id[0].read_text()
    srv = tls_server(server_factory, pki, identity=server_id, extra=["--cipher-preference", "chacha20"])
    key, cert = pki["client"]
    r = subprocess.run(
        [OPENSSL, "s_client", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
         "-connect", f"127.0.0.1:{srv.tls_port}", "-cert", str(cert), "-key", str(key), "-CAfile", str(pki["cacert"]), "-brief"],
        input="", capture_output=True, text=True, timeout=20,
    )
    assert "Ciphersuite: ECDHE-ECDSA-CHACHA20-POLY1305" in r.stderr, r.stderr


def test_anonymous_tls_when_client_certs_are_ignored(server_factory, minipacs, pki, tmp_path):
    srv = tls_server(server_factory, pki, extra=["--peer-cert", "ignore"])
    src = make_ct(tmp_path / "n.dcm", "1.2.826.0.1.3680043.10.58.1")
    r = subprocess.run([minipacs, "send", "--anonymous-tls", "--add-cert-file", str(pki["cacert"]), "localhost", str(srv.tls_port), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (srv.store / "CT.1.2.826.0.1.3680043.10.58.1").exists()
    # And the server certificate is verified: a sender trusting another CA refuses it.
    other = pki["root"] / "other-ca" / "cacert.pem"
    r = subprocess.run([minipacs, "send", "--anonymous-tls", "--add-cert-file", str(other), "localhost", str(srv.tls_port), str(src)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "certificate" in r.stderr.lower(), r.stderr


def test_openssl_made_certificates_are_accepted(server_factory, pki, tmp_path):
    """Server and client certificates made with openssl the way dcmtk_ca.pl
    makes them (RSA 2048, traditional PKCS#1 key files)."""
    server_id = openssl_cert(pki, "opensslserver")
    client_id = openssl_cert(pki, "opensslclient")
    srv = tls_server(server_factory, pki, identity=server_id)
    src = make_ct(tmp_path / "o.dcm", "1.2.826.0.1.3680043.10.54.1")
    r = storescu_tls(srv.tls_port, client_id, pki["cacert"], [src])
    assert r.returncode == 0, r.stderr
    assert (srv.store / "CT.1.2.826.0.1.3680043.10.54.1").exists()


@pytest.mark.parametrize("case", ["other-ca", "expired", "no-client-cert", "tls1.1"])
def test_refusals(server_factory, pki, tmp_path, case):
    srv = tls_server(server_factory, pki)
    src = make_ct(tmp_path / "x.dcm", "1.2.826.0.1.3680043.10.55.1")
    if case == "other-ca":
        r = storescu_tls(srv.tls_port, pki["stranger"], pki["cacert"], [src])
        assert r.returncode != 0
    elif case == "expired":
        expired = openssl_cert(pki, "expiredclient", days="-1")
        r = storescu_tls(srv.tls_port, expired, pki["cacert"], [src])
        assert r.returncode != 0
    elif case == "no-client-cert":
        r = subprocess.run(
            [dcmtk("storescu"), "+tla", "--add-cert-file", str(pki["cacert"]), "-aec", "MINIPACS", "127.0.0.1", str(srv.tls_port), str(src)],
            capture_output=True, text=True, env=dcmtk_env(),
        )
        assert r.returncode != 0
    else:
        key, cert = pki["client"]
        r = subprocess.run(
            [OPENSSL, "s_client", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-connect", f"127.0.0.1:{srv.tls_port}",
             "-cert", str(cert), "-key", str(key), "-brief"],
            input="", capture_output=True, text=True, timeout=20,
        )
        assert r.returncode != 0
        # The server answered the TLS 1.1 ClientHello with a refusal.
        assert "protocol version" in r.stderr.lower() or "alert" in r.stderr.lower(), r.stderr
    assert srv.stored_files() == []
    srv.wait_log("TLS handshake failed")
    # And it still serves a good client.
    r = storescu_tls(srv.tls_port, pki["client"], pki["cacert"], [src])
    assert r.returncode == 0, r.stderr


def test_plain_dicom_on_tls_port_is_named(server_factory, pki):
    srv = tls_server(server_factory, pki)
    r = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.tls_port)], capture_output=True, env=dcmtk_env())
    assert r.returncode != 0
    srv.wait_log("plain DICOM (A-ASSOCIATE-RQ) received on a TLS port")


def test_stalled_handshake_blocks_nobody(server_factory, pki, tmp_path):
    srv = tls_server(server_factory, pki, extra=["--acse-timeout", "2"])
    silent = [socket.create_connection(("127.0.0.1", srv.tls_port)) for _ in range(5)]
    half = socket.create_connection(("127.0.0.1", srv.tls_port))
    half.sendall(bytes.fromhex("16030100"))  # a ClientHello that never finishes
    src = make_ct(tmp_path / "s.dcm", "1.2.826.0.1.3680043.10.56.1")
    started = time.monotonic()
    r = storescu_tls(srv.tls_port, pki["client"], pki["cacert"], [src])
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 2
    for s in silent + [half]:
        s.settimeout(5)
        assert s.recv(100) == b""  # closed by the server after the timeout
        s.close()


def _served_serial(port, pki):
    ctx = _client_context(pki)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert()["serialNumber"].upper().lstrip("0")


def _issue(minipacs, pki, name):
    root = pki["root"]
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    run([minipacs, "ca", "issue", str(pki["ca"]), "--cert", str(cert), "--key", str(key), "--name", "localhost"])
    return key, cert


def test_certificate_reload_under_load(server_factory, minipacs, pki, tmp_path):
    """A sender streams objects over TLS while the certificate files are
    replaced (as certbot does, by new files renamed over the old): no object
    is lost, and new handshakes see the new certificate."""
    live = tmp_path / "live"
    live.mkdir()
    key0, cert0 = _issue(minipacs, pki, "gen0")
    shutil.copy(key0, live / "privkey.pem")
    shutil.copy(cert0, live / "fullchain.pem")
    cfg = tmp_path / "fast-reload.toml"
    cfg.write_text("[tls]\nreload_check = 1\n")
    srv = tls_server(server_factory, pki, identity=(live / "privkey.pem", live / "fullchain.pem"), extra=["--config", str(cfg)])
    first = _served_serial(srv.tls_port, pki)

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(150):
        make_ct(folder / f"{i}.dcm", f"1.2.826.0.1.3680043.10.57.{i}", size=200000)
    ckey, ccert = pki["client"]
    sender = subprocess.Popen(
        [minipacs, "send", "--tls", str(ckey), str(ccert), "--add-cert-file", str(pki["cacert"]), "localhost", str(srv.tls_port), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait = time.monotonic() + 10
    while not srv.stored_files() and time.monotonic() < wait:
        time.sleep(0.01)
    # Replace the files atomically, like certbot's symlink swap.
    key1, cert1 = _issue(minipacs, pki, "gen1")
    for src, name in [(key1, "privkey.pem"), (cert1, "fullchain.pem")]:
        tmp = live / (name + ".new")
        shutil.copy(src, tmp)
        os.replace(tmp, live / name)
    out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err
    assert len(srv.stored_files()) == 150, "an object was lost during the reload"
    deadline = time.monotonic() + 15
    second = first
    while second == first and time.monotonic() < deadline:
        time.sleep(0.3)
        second = _served_serial(srv.tls_port, pki)
    assert second != first, "new handshakes still see the old certificate"
    srv.wait_log("TLS certificate reloaded")

    # A bad new file set keeps the old certificate serving; SIGHUP reloads.
    (live / "fullchain.pem").write_text("not a certificate\n")
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert _served_serial(srv.tls_port, pki) == second
    srv.wait_log("TLS reload failed")
    shutil.copy(cert1, live / "fullchain.pem")
    srv.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert _served_serial(srv.tls_port, pki) == second
    assert srv.alive()


def _valid_from_tomorrow(pki, name):
    """A key and a certificate signed by the test CA that become valid
    tomorrow: what a device whose clock is behind (no NTP since a power cut,
    no real-time clock) makes of a certificate issued today."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki["ca"] / "private" / "cakey.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(pki["cacert"].read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    tomorrow = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(tomorrow)
        .not_valid_after(tomorrow + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = pki["root"] / f"{name}.key", pki["root"] / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, tomorrow.strftime("%Y-%m-%dT")


def test_a_client_certificate_from_the_future_is_blamed_on_the_clock(server_factory, pki, tmp_path):
    srv = tls_server(server_factory, pki)
    key, cert, day = _valid_from_tomorrow(pki, "futureclient")
    src = make_ct(tmp_path / "f.dcm", "1.2.826.0.1.3680043.10.58.1")
    r = storescu_tls(srv.tls_port, (key, cert), pki["cacert"], [src])
    assert r.returncode != 0
    logs = srv.wait_log("set [time] ntp")
    line = next(l for l in logs.splitlines() if "set [time] ntp" in l)
    assert "TLS handshake failed: the clock reads " in line, line
    assert f"the client certificate is valid from {day}" in line, line
    assert srv.stored_files() == []


def test_a_server_certificate_from_the_future_is_blamed_on_the_clock(minipacs, pki, tmp_path):
    key, cert, day = _valid_from_tomorrow(pki, "futureserver")
    r = subprocess.run(
        [minipacs, "serve", "--port", str(free_port()), "--tls", str(key), str(cert), "--tls-port", str(free_port()),
         "--add-cert-file", str(pki["cacert"]), "--output-directory", str(tmp_path / "store"), "--log-directory", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode != 0
    assert f"{cert}: the clock reads " in r.stderr, r.stderr
    assert f"the certificate is valid from {day}" in r.stderr and "set [time] ntp" in r.stderr, r.stderr
