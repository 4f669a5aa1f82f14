"""The Debian package of the service (cargo-deb): what it installs."""

import subprocess

from conftest import ROOT

EXPECTED = {
    "./usr/bin/minipacs",
    "./etc/minipacs/minipacs.toml",
    "./lib/systemd/system/minipacs.service",
    "./usr/lib/sysusers.d/minipacs.conf",
    "./usr/lib/tmpfiles.d/minipacs.conf",
    "./usr/share/minipacs/boards/pi4.toml",
}


def build_deb(minipacs, target=None):
    cmd = ["cargo", "deb", "-p", "minipacs", "--no-build"]
    if target:
        cmd += ["--target", target]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_amd64_package_contents(minipacs, tmp_path):
    deb = build_deb(minipacs)
    files = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[-1] for line in files.splitlines()}
    assert EXPECTED <= paths, EXPECTED - paths
    info = subprocess.run(["dpkg-deb", "-I", deb], capture_output=True, text=True, check=True).stdout
    assert "Architecture: amd64" in info and "systemd" in info
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", deb, str(control)], check=True)
    assert (control / "conffiles").read_text().strip() == "/etc/minipacs/minipacs.toml"
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(control / script)], check=True)
    assert "systemd-sysusers minipacs.conf" in (control / "postinst").read_text()
    # The shipped appliance configuration is valid.
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    r = subprocess.run([minipacs, "config", "check", str(root / "etc/minipacs/minipacs.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
