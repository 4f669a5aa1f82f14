"""Software updates by drop, the parts around the Rust updater: the image's
units verify, the image-build scripts parse, and a package made and signed
by image-build/sign-update and make-test-updates is judged by
`minipacs update verify` as a device would (the updater's decisions are
unit-tested in app/src/update/)."""

import shutil
import subprocess

import pytest

from conftest import ROOT
from test_package import build_deb

IMAGE_BUILD = ROOT / "image-build"
SCRIPTS = ["boot-test", "boot-test-updates", "build", "customize", "sign-update", "make-test-updates"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_image_build_scripts_parse(script):
    r = subprocess.run(["bash", "-n", IMAGE_BUILD / script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


INITRAMFS_SCRIPTS = ["hooks/minipacs", "scripts/coldplug", "scripts/bootfs", "scripts/move-dev"]


@pytest.mark.parametrize("script", INITRAMFS_SCRIPTS)
def test_initramfs_scripts_parse_as_posix_sh(script):
    """The initramfs runs them with klibc's sh (dash-like): no bashisms."""
    r = subprocess.run(["dash", "-n", IMAGE_BUILD / "initramfs" / script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (IMAGE_BUILD / "initramfs" / script).stat().st_mode & 0o111, "not executable"


def test_update_units_verify(tmp_path):
    """systemd-analyze verify on copies whose ExecStart runs a stub (the
    updater is not installed here)."""
    stub = tmp_path / "updater"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = (IMAGE_BUILD / "minipacs-update.service").read_text()
    assert service.count("ExecStart=/var/lib/minipacs-update/updater ") == 1
    (tmp_path / "minipacs-update.service").write_text(
        service.replace("ExecStart=/var/lib/minipacs-update/updater ", f"ExecStart={stub} ")
    )
    shutil.copy(IMAGE_BUILD / "minipacs-update.path", tmp_path / "minipacs-update.path")
    r = subprocess.run(
        ["systemd-analyze", "verify", tmp_path / "minipacs-update.service", tmp_path / "minipacs-update.path"],
        capture_output=True,
        text=True,
    )
    complaints = [l for l in (r.stdout + r.stderr).splitlines() if "minipacs-update" in l]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("minisign") is None, reason="needs minisign (tests/run installs it)")
def test_signed_test_packages_verify_and_others_do_not(minipacs, tmp_path):
    deb = build_deb(minipacs)
    key = tmp_path / "keys" / "update-key"
    subprocess.run([IMAGE_BUILD / "sign-update", "--new-key", key, "--no-password"], check=True, capture_output=True)
    made = subprocess.run(
        [IMAGE_BUILD / "make-test-updates", deb, f"{key}.key", tmp_path / "out"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    kinds = {line.split()[0]: line.split()[1:] for line in made if line}
    assert set(kinds) == {"good", "bad", "unsigned"}, made
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True, text=True).stdout.strip()

    def verify(name, pub=f"{key}.pub"):
        return subprocess.run(
            [minipacs, "update", "verify", "--key", pub, tmp_path / "out" / name], capture_output=True, text=True
        )

    for kind, suffix in [("good", "update2"), ("bad", "update3"), ("unsigned", "update4")]:
        name, v = kinds[kind]
        assert v == f"{version}+{suffix}"
        got = subprocess.run(["dpkg-deb", "-f", tmp_path / "out" / name, "Version"], capture_output=True, text=True)
        assert got.stdout.strip() == v
    good, bad, unsigned = kinds["good"][0], kinds["bad"][0], kinds["unsigned"][0]
    assert verify(good).returncode == 0, verify(good).stderr
    assert verify(bad).returncode == 0
    r = verify(unsigned)
    assert r.returncode != 0 and "not signed" in r.stderr, r.stderr
    # The bad package's program cannot start.
    program = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", tmp_path / "out" / bad], check=True, capture_output=True
    ).stdout
    listing = subprocess.run(["tar", "-xO", "./usr/bin/minipacs"], input=program, capture_output=True).stdout
    assert listing.startswith(b"#!/bin/sh") and b"exit 1" in listing
    # Another key's signature, and a package changed after signing, are refused.
    other = tmp_path / "keys" / "other"
    subprocess.run([IMAGE_BUILD / "sign-update", "--new-key", other, "--no-password"], check=True, capture_output=True)
    r = verify(good, pub=f"{other}.pub")
    assert r.returncode != 0 and "bad signature" in r.stderr, r.stderr
    changed = tmp_path / "out" / good
    changed.write_bytes(changed.read_bytes() + b"\0")
    r = verify(good)
    assert r.returncode != 0 and "bad signature" in r.stderr, r.stderr
