"""The appliance's system integration files in hal-config/.

The systemd unit is checked by systemd's own tools (systemd-analyze verify
and security), the sysusers.d and tmpfiles.d files are applied for real to a
scratch root directory, and the board profiles are parsed and checked against
the unit. Each checker is also shown a broken file, so that a check which
silently stopped looking would fail here.

Needs systemd-analyze, systemd-sysusers and systemd-tmpfiles (Debian package
`systemd`) and root (tmpfiles sets owners). Nothing here needs a running
systemd: all of it works in a container.
"""

import os
import pathlib
import re
import shutil
import stat
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAL = ROOT / "hal-config"
UNIT = HAL / "systemd" / "minipacs.service"
SYSUSERS = HAL / "sysusers.d" / "minipacs.conf"
TMPFILES = HAL / "tmpfiles.d" / "minipacs.conf"
BOARDS = HAL / "boards"
DEFAULTS = HAL / "minipacs.toml"

EXEC_START = "/usr/bin/minipacs serve --config /etc/minipacs/minipacs.toml"

# `systemd-analyze security --offline=yes` gave 2.5 ("OK") with systemd 252
# (Debian 12). The ceiling leaves room for scoring changes between systemd
# versions but not for dropping a real protection; above 4.9 systemd itself
# calls the unit "MEDIUM".
EXPOSURE_CEILING = 3.0


def tool(name):
    """Absolute path of a systemd tool, or a failure naming the package."""
    path = shutil.which(name)
    if path is None:
        for d in ("/usr/bin", "/bin"):
            if os.access(f"{d}/{name}", os.X_OK):
                path = f"{d}/{name}"
                break
    if path is None:
        pytest.fail(
            f"{name} not found: install the Debian package 'systemd' "
            "(apt-get install -y systemd); these checks need no running systemd"
        )
    return path


def run(*args):
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )


def need_root():
    if os.geteuid() != 0:
        pytest.fail("run as root: systemd-tmpfiles must set owners (CI runs as root)")


def unit_directives(text):
    """{(section, key): [values]} of a unit file; repeated keys accumulate."""
    out, section = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def tmpfiles_entries():
    """{path: (mode, user, group)} of the directories and files in tmpfiles.d."""
    out = {}
    for line in TMPFILES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        assert fields[0] in ("d", "f"), f"only 'd' and 'f' lines are expected: {line!r}"
        out[fields[1]] = (int(fields[2], 8), fields[3], fields[4])
    return out


@pytest.fixture(scope="module")
def directives():
    return unit_directives(UNIT.read_text())


def single(directives, key, section="Service"):
    values = directives.get((section, key))
    assert values, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def read_write_paths(directives):
    return [p for v in directives[("Service", "ReadWritePaths")] for p in v.split()]


# --- systemd-analyze verify ----------------------------------------------------


def verify_copy(tmp_path, text):
    """Runs `systemd-analyze verify` on `text` saved as minipacs.service.

    verify insists that ExecStart='s binary exists, and minipacs is not
    installed here: the copy runs a stub instead. Only that path changes.
    """
    stub = tmp_path / "minipacs"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    copy = tmp_path / "minipacs.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/minipacs ", f"ExecStart={stub} "))
    return run(tool("systemd-analyze"), "verify", copy)


def diagnostics(result):
    """verify's complaints about our unit: it exits 0 on unknown keys and on
    values it cannot parse (it only warns), so its output counts."""
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if "minipacs" in line]


def test_unit_verifies(tmp_path):
    result = verify_copy(tmp_path, UNIT.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert diagnostics(result) == [], result.stdout + result.stderr


@pytest.mark.parametrize(
    "old, new, complaint",
    [
        ("UMask=0027\n", "UMask=0027\nFrobnicate=yes\n", "Unknown key 'Frobnicate'"),
        ("ProtectSystem=strict\n", "ProtectSystem=banana\n", "banana"),
        ("ExecReload=/bin/kill", "ExecReload=/nonexistent/kill", "/nonexistent/kill"),
    ],
    ids=["unknown-key", "bad-value", "missing-binary"],
)
def test_verify_catches_a_broken_unit(tmp_path, old, new, complaint):
    text = UNIT.read_text()
    assert text.count(old) == 1
    result = verify_copy(tmp_path, text.replace(old, new))
    found = diagnostics(result)
    assert any(complaint in line for line in found), result.stdout + result.stderr


# --- systemd-analyze security --------------------------------------------------


def test_unit_exposure_is_low():
    result = run(
        tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", UNIT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(
        r"Overall exposure level for minipacs\.service: (\d+\.\d) (\w+)", result.stdout
    )
    assert m, result.stdout + result.stderr
    score, level = float(m.group(1)), m.group(2)
    assert score <= EXPOSURE_CEILING and level in ("PERFECT", "SAFE", "OK"), (
        f"exposure {score} {level} (was 2.5 OK, ceiling {EXPOSURE_CEILING}):\n"
        + result.stdout
    )


# --- What the unit must say ----------------------------------------------------


def test_unit_service_settings(directives):
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": EXEC_START,
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "2",
        "TimeoutStopSec": "20",
        "KillMode": "mixed",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "UMask": "0027",
        "RuntimeDirectory": "minipacs",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert single(directives, key) == value, key
    for key in (
        "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
        "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute",
    ):
        assert single(directives, key) == "yes", key
    # Started as root so that it can read the key and bind 104: no User=.
    assert ("Service", "User") not in directives
    assert ("Service", "DynamicUser") not in directives


def test_unit_capabilities(directives):
    caps = set(single(directives, "CapabilityBoundingSet").split())
    # What the keeper's start-up and privilege drop need ...
    assert {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"} <= caps
    # ... and never the ones that would make the bounding set pointless.
    assert not caps & {"CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_NET_ADMIN",
                       "CAP_SYS_PTRACE", "CAP_SYS_MODULE", "CAP_CHOWN"}
    assert not any(c.startswith("~") for c in caps), "use an allow list"


def test_stop_timeout_covers_the_shutdown_bound(directives):
    shutdown = tomllib.loads(DEFAULTS.read_text())["shutdown_timeout"]
    assert int(single(directives, "TimeoutStopSec")) > shutdown


def test_unit_leaves_store_and_log_ownership_to_tmpfiles(directives):
    """Without User=, StateDirectory=/LogsDirectory= would chown the store and
    logs to root at every start, and the unprivileged worker could no longer
    write them (seen on the image's first boot). tmpfiles.d owns them."""
    for key in ("StateDirectory", "LogsDirectory", "CacheDirectory"):
        assert ("Service", key) not in directives, key
    entries = tmpfiles_entries()
    for path in ("/var/lib/minipacs", "/var/lib/minipacs/store"):
        assert entries[path][1:3] == ("minipacs", "minipacs"), path
    # The log folder also holds the root keeper's own log: root may create
    # files there without CAP_DAC_OVERRIDE, the worker through its group.
    assert entries["/var/log/minipacs"] == (0o1770, "root", "minipacs")


def test_unit_writable_paths(directives):
    paths = read_write_paths(directives)
    for p in ("/var/lib/minipacs", "/var/log/minipacs", "/boot/firmware/minipacs"):
        assert f"-{p}" in paths, p
    # Every LED in the board profiles is writable in spite of
    # ProtectKernelTunables=yes.
    for board in sorted(BOARDS.glob("*.toml")):
        led = tomllib.loads(board.read_text()).get("activity_led")
        if led:
            assert f"-{pathlib.PurePosixPath(led).parent}" in paths, board.name


# --- sysusers.d and tmpfiles.d, applied to a scratch root ---------------------


def passwd_entry(root, name):
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"no {name} in {root}/etc/passwd")


def group_id(root, name):
    for line in (root / "etc" / "group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no group {name} in {root}/etc/group")


@pytest.fixture
def scratch_root(tmp_path):
    need_root()
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = run(tool("systemd-sysusers"), f"--root={root}", SYSUSERS)
    assert result.returncode == 0, result.stderr
    return root


def test_sysusers_creates_a_system_user(scratch_root):
    _, _, uid, gid, _, home, shell = passwd_entry(scratch_root, "minipacs")
    assert 0 < int(uid) < 1000, "a system uid"
    assert int(gid) == group_id(scratch_root, "minipacs")
    assert home == "/var/lib/minipacs"
    assert shell == "/usr/sbin/nologin"


def test_tmpfiles_creates_the_directories(scratch_root):
    result = run(tool("systemd-tmpfiles"), f"--root={scratch_root}", "--create", TMPFILES)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    uid = int(passwd_entry(scratch_root, "minipacs")[2])
    gid = group_id(scratch_root, "minipacs")
    ids = {"root": 0, "minipacs": (uid, gid)}
    expected = {
        "/var/lib/minipacs": (0o750, "minipacs", "minipacs"),
        "/var/lib/minipacs/store": (0o750, "minipacs", "minipacs"),
        "/var/lib/minipacs/store/.lock": (0o600, "minipacs", "minipacs"),
        "/var/lib/minipacs/store/.incoming": (0o750, "minipacs", "minipacs"),
        "/var/lib/minipacs/drop": (0o770, "root", "minipacs"),
        "/var/log/minipacs": (0o1770, "root", "minipacs"),
        "/etc/minipacs": (0o755, "root", "root"),
    }
    assert tmpfiles_entries() == expected
    for path, (mode, user, group) in expected.items():
        st = (scratch_root / path.lstrip("/")).stat()
        assert stat.S_ISREG(st.st_mode) if path.endswith(".lock") else stat.S_ISDIR(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == mode, f"{path}: {oct(st.st_mode)}"
        assert st.st_uid == (0 if user == "root" else ids[user][0]), path
        assert st.st_gid == (0 if group == "root" else ids[group][1]), path


def test_sysusers_rejects_a_broken_line(tmp_path):
    need_root()
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    broken = tmp_path / "broken.conf"
    broken.write_text(SYSUSERS.read_text() + "q minipacs - - -\n")
    result = run(tool("systemd-sysusers"), f"--root={root}", broken)
    assert result.returncode != 0 and "Unknown command type" in result.stderr, result.stderr


def test_tmpfiles_rejects_a_broken_line(scratch_root, tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text(TMPFILES.read_text() + "d /var/lib/minipacs/x 07z0 root root -\n")
    result = run(tool("systemd-tmpfiles"), f"--root={scratch_root}", "--create", broken)
    assert result.returncode != 0 and "Invalid mode" in result.stderr, result.stderr


# --- Board profiles ------------------------------------------------------------

# board: (target, max_associations, max_pdu, cipher_preference, drop folder,
#         has an activity LED)
BOARD_TABLE = {
    "pi3": ("aarch64-unknown-linux-gnu", 8, 65536, "chacha20", "/boot/firmware/minipacs", True),
    "pi4": ("aarch64-unknown-linux-gnu", 16, 262144, "chacha20", "/boot/firmware/minipacs", True),
    "pi5": ("aarch64-unknown-linux-gnu", 32, 262144, "aes", "/boot/firmware/minipacs", True),
    "qemu-virt": ("aarch64-unknown-linux-gnu", 8, 65536, "aes", "/var/lib/minipacs/drop", False),
    "x86-dev": ("x86_64-unknown-linux-gnu", 16, 262144, "aes", "/var/lib/minipacs/drop", False),
}
REQUIRED = {"target", "max_associations", "max_pdu", "cipher_preference",
            "output_directory", "drop_directory", "free_space_reserve_percent"}
OPTIONAL = {"activity_led"}


def test_board_set():
    assert sorted(p.stem for p in BOARDS.glob("*.toml")) == sorted(BOARD_TABLE)


@pytest.mark.parametrize("board", sorted(BOARD_TABLE))
def test_board_profile(board, directives):
    path = BOARDS / f"{board}.toml"
    text = path.read_text()
    assert text.startswith("#"), "a header comment says what the board is"
    profile = tomllib.loads(text)
    keys = set(profile)
    assert REQUIRED <= keys, f"missing {REQUIRED - keys}"
    assert keys <= REQUIRED | OPTIONAL, f"unknown {keys - REQUIRED - OPTIONAL}"

    target, assoc, pdu, cipher, drop, has_led = BOARD_TABLE[board]
    assert profile["target"] == target
    assert profile["cipher_preference"] == cipher
    assert profile["drop_directory"] == drop
    assert profile["output_directory"] == "/var/lib/minipacs/store"
    # The limits minipacs's own configuration check applies (app/src/config.rs).
    assert isinstance(profile["max_associations"], int) and 1 <= profile["max_associations"] <= 1024
    assert isinstance(profile["max_pdu"], int) and 4096 <= profile["max_pdu"] <= 16 << 20
    assert isinstance(profile["free_space_reserve_percent"], int)
    assert 0 <= profile["free_space_reserve_percent"] <= 90
    assert (profile["max_associations"], profile["max_pdu"]) == (assoc, pdu)

    # The service may write where the profile points.
    writable = [p.lstrip("-") for p in read_write_paths(directives)]
    for key in ("output_directory", "drop_directory"):
        assert any(
            profile[key] == w or profile[key].startswith(w + "/") for w in writable
        ), f"{key} {profile[key]} is read-only under ProtectSystem=strict"

    if has_led:
        assert re.fullmatch(r"/sys/class/leds/[^/]+/brightness", profile["activity_led"])
    else:
        assert "activity_led" not in profile
