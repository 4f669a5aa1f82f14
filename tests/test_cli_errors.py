"""Errors a new user meets in the first fifteen minutes name the fix, and
`serve --help` says what the defaults are.

Each test runs the real binary and asserts that the message names what to
change (an option, a key, a command), not only what went wrong.
"""

import os
import re
import shutil
import socket
import subprocess

import pytest

from conftest import dcmtk, dcmtk_env, free_port, make_ct

OPENSSL = "/usr/bin/openssl"


def run(cmd, timeout=30, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def identity(minipacs, tmp_path_factory):
    """A server key and certificate from `minipacs ca`, and the same key
    encrypted with a passphrase (as `openssl genpkey -aes256` leaves it)."""
    root = tmp_path_factory.mktemp("identity")
    ca = root / "ca"
    assert run([minipacs, "ca", "new", str(ca)]).returncode == 0
    key, cert = root / "server.key", root / "server.pem"
    r = run([minipacs, "ca", "issue", str(ca), "--cert", str(cert), "--key", str(key), "--name", "localhost"])
    assert r.returncode == 0, r.stderr
    encrypted = root / "encrypted.key"
    r = run([OPENSSL, "pkcs8", "-topk8", "-in", str(key), "-out", str(encrypted), "-passout", "pass:secret"])
    assert r.returncode == 0, r.stderr
    legacy = root / "legacy.key"
    r = run([OPENSSL, "genrsa", "-aes256", "-passout", "pass:secret", "-traditional", "-out", str(legacy), "2048"])
    assert r.returncode == 0, r.stderr
    return {"key": key, "cert": cert, "encrypted": encrypted, "legacy": legacy, "cacert": ca / "cacert.pem"}


def serve_fails(minipacs, tmp_path, *args):
    """Runs `serve` with `args` that must keep it from starting; returns
    what it said."""
    r = run([minipacs, "serve", "--bind", "127.0.0.1", "--output-directory", str(tmp_path / "store"),
             "--log-directory", str(tmp_path / "logs"), *args])
    assert r.returncode != 0, f"serve started:\n{r.stdout}{r.stderr}"
    return r.stderr


def test_a_certificate_where_the_key_goes_is_named(minipacs, tmp_path, identity):
    # The founding article's habit is dcmtk's +tls KEY CERT; swapped here.
    out = serve_fails(minipacs, tmp_path, "--port", str(free_port()), "--tls-port", str(free_port()),
                      "--tls", str(identity["cert"]), str(identity["key"]), "--peer-cert", "ignore")
    # Whichever of the two is read first is named by what it holds.
    assert (f"{identity['cert']} holds a CERTIFICATE, not a private key" in out
            or f"{identity['key']} holds a PRIVATE KEY, not a certificate" in out), out
    assert "--tls takes KEY then CERT" in out, out
    assert "encrypted" not in out, out


def test_a_key_where_the_certificate_goes_is_named_by_the_sender(minipacs, identity):
    # The sender's --tls has the same order: its certificate is read first.
    r = run([minipacs, "echo", "--tls", str(identity["key"]), str(identity["key"]),
             "--add-cert-file", str(identity["cacert"]), "127.0.0.1", str(free_port())])
    assert r.returncode != 0
    assert f"{identity['key']} holds a PRIVATE KEY, not a certificate: --tls takes KEY then CERT" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["encrypted", "legacy"])
def test_an_encrypted_key_says_how_to_decrypt_it(minipacs, tmp_path, identity, which):
    out = serve_fails(minipacs, tmp_path, "--port", str(free_port()), "--tls-port", str(free_port()),
                      "--tls", str(identity[which]), str(identity["cert"]), "--peer-cert", "ignore")
    assert "encrypted private key" in out, out
    assert f"openssl pkcs8 -topk8 -nocrypt -in {identity[which]} -out key.pem" in out, out


def test_one_port_with_tls_on_it_names_tls_port_and_no_plain(minipacs, tmp_path, identity):
    # storescp +tls KEY CERT 2762: one port, TLS on it.
    out = serve_fails(minipacs, tmp_path, "--port", "2762", "--tls", str(identity["key"]), str(identity["cert"]),
                      "--peer-cert", "ignore")
    assert "both on port 2762" in out, out
    assert "--tls-port" in out and "--no-plain" in out, out


def test_port_with_no_plain_is_refused_and_says_what_to_use(minipacs, tmp_path, identity):
    out = serve_fails(minipacs, tmp_path, "--port", "2762", "--no-plain", "--tls", str(identity["key"]),
                      str(identity["cert"]), "--peer-cert", "ignore")
    assert "--no-plain turns off" in out, out
    assert "--tls-port 2762" in out, out


def test_config_check_lists_every_problem_with_did_you_mean(minipacs, tmp_path):
    path = tmp_path / "minipacs.toml"
    path.write_text('aetilte = "PACS"\nport = "104"\nmax_pdu = 12\n[tls]\nprot = 2762\n')
    r = run([minipacs, "config", "check", str(path)])
    assert r.returncode != 0
    lines = [l.strip() for l in r.stderr.splitlines()[1:]]
    assert lines[0] == "line 1: aetilte: unknown key; did you mean aetitle?", r.stderr
    assert lines[1].startswith("line 2: port: invalid type"), r.stderr
    assert lines[2].startswith("line 3: max_pdu: 12 is outside"), r.stderr
    assert lines[3] == "line 5: tls.prot: unknown key; did you mean port?", r.stderr
    assert len(lines) == 4, r.stderr
    # And `serve` refuses the same file with the same list.
    r = run([minipacs, "serve", "--config", str(path)])
    assert r.returncode != 0 and "did you mean aetitle?" in r.stderr and "max_pdu" in r.stderr, r.stderr


def test_a_wrong_called_ae_title_names_both_titles_and_the_options(server):
    r = run([dcmtk("echoscu"), "-aet", "CT1", "-aec", "PACS", "127.0.0.1", str(server.port)], env=dcmtk_env())
    assert r.returncode != 0
    logs = server.wait_log("association rejected")
    line = next(l for l in logs.splitlines() if "association rejected" in l)
    for part in ['"PACS"', '"MINIPACS"', "-aec MINIPACS", "--call MINIPACS", "--aetitle PACS", "calling=CT1"]:
        assert part in line, f"{part} not in {line}"


def test_a_calling_ae_title_not_allowed_names_allow_and_aet(server_factory, tmp_path):
    config = tmp_path / "allow.toml"
    config.write_text('[[allow]]\naetitle = "CT2"\n')
    srv = server_factory(["--config", str(config)])
    r = run([dcmtk("echoscu"), "-aet", "CT1", "-aec", "MINIPACS", "127.0.0.1", str(srv.port)], env=dcmtk_env())
    assert r.returncode != 0
    line = next(l for l in srv.wait_log("association rejected").splitlines() if "association rejected" in l)
    assert '"CT1"' in line and "[[allow]]" in line and "-aet" in line, line


def test_an_a700_reason_is_never_cut_mid_word(minipacs, server, tmp_path):
    # The store's temp folder replaced by a file: every object fails with
    # a reason that names a long path.
    incoming = server.store / ".incoming"
    shutil.rmtree(incoming)
    incoming.write_text("not a folder")
    obj = tmp_path / "ct.dcm"
    make_ct(obj, "1.2.826.0.1.3680043.10.99.1")
    r = run([minipacs, "send", "127.0.0.1", str(server.port), str(obj)])
    assert r.returncode != 0
    m = re.search(r"status A700 \((.*)\)$", r.stderr, re.M)
    assert m, r.stderr
    comment = m.group(1)
    assert len(comment) <= 64, comment
    logs = server.wait_log("creating temp file")
    full = next(l for l in logs.splitlines() if "creating temp file" in l)
    words = set(re.split(r"[\s=\"\\\\]+", full))
    for word in comment.removesuffix("...").split():
        # Each word whole, or a path shortened to its last component.
        assert word in words or (".../" in word and any(w.endswith(word.split(".../")[1]) for w in words)), \
            f"{word!r} of {comment!r} is not a whole word of {full!r}"
    assert comment.startswith("creating temp file: "), comment


def test_serve_help_shows_defaults_and_one_line_per_listener(minipacs):
    out = run([minipacs, "serve", "--help"]).stdout
    for default in ["[default: 11112]", "[default: MINIPACS]", "[default: ./pacs]", "[default: 2762]",
                    "[default: ./minipacs-logs]", "[default: 0.0.0.0]", "[default: 16]"]:
        assert default in out, f"{default} missing:\n{out}"
    assert re.search(r"^\s*plain DICOM .*--port.*--no-plain", out, re.M), out
    assert re.search(r"^\s*DICOM/TLS .*--tls-port.*--tls KEY CERT", out, re.M), out
    assert "--log-directory <DIR>" in out and "--bind <ADDR>" in out, out


def reachable(addr, port):
    try:
        with socket.create_connection((addr, port), timeout=1):
            return True
    except OSError:
        return False


def test_bind_limits_the_listener_to_one_address(server_factory):
    # 127.0.0.2 is loopback too, but not the address bound to.
    srv = server_factory(["--bind", "127.0.0.1"])
    assert reachable("127.0.0.1", srv.port)
    assert not reachable("127.0.0.2", srv.port)
    everywhere = server_factory()
    assert reachable("127.0.0.2", everywhere.port), "the control: without --bind every address answers"


def test_log_directory_is_where_the_logs_go(server_factory, tmp_path):
    logs = tmp_path / "service-logs"
    srv = server_factory(["--log-directory", str(logs)])
    r = run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(srv.port)], env=dcmtk_env())
    assert r.returncode == 0, r.stderr
    srv.stop()
    assert logs.is_dir()
    names = sorted(p.name for p in logs.iterdir())
    assert any(n.startswith("audit") for n in names), names
    assert any(n.startswith("minipacs") and n.endswith(".log") for n in names), names
