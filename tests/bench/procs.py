"""What both benchmarks (receive.py, qr.py) need of the processes they run:
starting and ending them, waiting for their ports, and reading their CPU
time and memory from /proc. One copy, so that both measure alike."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class BenchError(Exception):
    """Something broke: the benchmark cannot go on."""


class Children:
    """Every process a script starts, so that all of them can be ended.
    Logs are truncated at start unless `append` (a script that reuses a log
    across runs keeps what is there)."""

    def __init__(self, stop_timeout: float, append: bool = False) -> None:
        self._live: list[subprocess.Popen] = []
        self._stop_timeout = stop_timeout
        self._mode = "ab" if append else "wb"

    def start(self, argv: list, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        with open(log, self._mode) as out:
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    env=env or os.environ.copy(), cwd=cwd)
        self._live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> int | None:
        """SIGTERM, then SIGKILL if it is still there after a while; returns
        its exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._live:
            self._live.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self._live):
            self.stop(proc)


def dcmtk_env() -> dict[str, str]:
    """The environment for a dcmtk tool: Debian's dcmtk leaves Nagle on
    unless TCP_NODELAY=1."""
    env = os.environ.copy()
    env["TCP_NODELAY"] = "1"
    return env


def listening_ports() -> set[int]:
    """Local ports in LISTEN state, from /proc/net/tcp and tcp6."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(proc: subprocess.Popen, ports: list[int], name: str, log: Path,
                   timeout: float) -> None:
    """Waits until the kernel accepts connections on every port. Checked in
    /proc/net/tcp rather than by connecting, so that no server sees a stray
    empty connection."""
    deadline = time.monotonic() + timeout
    while not set(ports) <= listening_ports():
        if proc.poll() is not None:
            raise BenchError(f"{name} exited ({proc.returncode}) before listening\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} not listening on {ports} after {timeout}s\n{tail(log)}")
        time.sleep(0.005)


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join("    | " + line for line in text[-lines:])


def stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/PID/stat: the command name (field 2) may
    hold spaces, so the split starts after its closing parenthesis."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (minipacs started as root is a keeper
    and an unprivileged worker; dcmqrscp forks a child per association),
    from /proc/PID/task/TID/children: cheap enough to read every 20 ms,
    unlike a scan of all of /proc, which took a quarter of a CPU here."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue  # ended meanwhile
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all threads) plus cutime + cstime,
    the time of children they have already reaped, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            ticks += sum(int(f) for f in stat_fields(pid)[11:15])  # fields 14-17
        except OSError:
            pass  # ended meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_kib(path: str, key: str) -> int:
    """The kB value of a "Key:   123 kB" line, 0 if the file or line is not there."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_ports(port_range: range, count: int) -> list[int]:
    """`count` ports of `port_range` nobody is bound to now."""
    found = []
    for port in port_range:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise BenchError(f"not {count} free ports in {port_range.start}-{port_range.stop - 1}")


def data_set_sha256(path: Path) -> str:
    """SHA-256 of a Part-10 file's data set (the bytes after its meta
    group), as the tests compare stored objects."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/conftest.py
    from conftest import data_set_offset
    data = path.read_bytes()
    return hashlib.sha256(memoryview(data)[data_set_offset(path, data):]).hexdigest()
