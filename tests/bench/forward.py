#!/usr/bin/env python3
"""Forwarding benchmark: minipacs' store-and-forward queue against dcmtk
storescu sending the same files to the same receiver, and what forwarding
costs the receive path. A script that prints figures, not a test.

    python3 tests/bench/forward.py                       # N=5
    python3 tests/bench/forward.py --runs 3 --workdir /tmp/fwbench
    python3 tests/bench/forward.py --count 40 --runs 1   # smoke run

Workload: receive.py's W1 (400 CT objects of ~512 KiB, Explicit VR Little
Endian), generated once into the work dir.

1. Forwarding throughput. The receiver is dcmtk `storescp --ignore`
   (TCP_NODELAY=1: Debian's dcmtk leaves Nagle on).
   * dcmtk: `storescu` sends the W1 files to it; wall time of the storescu
     process, and its CPU time.
   * minipacs: a fresh `minipacs serve` (durable) with a `[[forward]]` rule
     to that receiver takes W1 from storescu while the receiver is not
     listening, so every object waits in the queue; then the receiver is
     started and the worker's next attempt drains the queue. The wall time
     runs from the start of the first forwarded object's C-STORE (its log
     line's time less its `ms`) to the last one's log line: the queue
     drained, association set-up aside (about a millisecond). CPU is
     minipacs' (keeper and worker) over the drain, idle retries included.
   Floor: minipacs objects/s >= 0.9x storescu's.
2. Receiving while forwarding. storescu sends W1 to minipacs:
   * alone: a fresh minipacs without rules;
   * while forwarding: a fresh minipacs whose rule's destination (storescp
     --ignore) is down while a first W1 arrives, then started; as soon as
     the first object has been forwarded, a second W1 is sent, so that it
     is received while the first is forwarded (and its own objects are
     forwarded as they arrive).
   Both with and without fsync. Floor: while forwarding <= 1.3x alone.

Rounds interleave the measurements; each figure is the best of N (noise
only ever adds time).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from procs import BenchError, Children, cpu_seconds, dcmtk_env, process_tree, tail, wait_listening
from receive import MINIPACS, STORESCP, STORESCU, make_w1, prepare, w1_name

RECEIVER_PORT = 12110
MINIPACS_PORT = 12111
DEST_AE = "DEST"
START_TIMEOUT_S = 20
DRAIN_TIMEOUT_S = 600

FORWARDED = re.compile(r"^(\S+Z)\s+INFO .*forwarded .*ms=([0-9.]+)")


def config(folder: Path, fsync: bool, forward: bool) -> Path:
    text = (
        f'port = {MINIPACS_PORT}\n'
        f'aetitle = "MINIPACS"\n'
        f'output_directory = "{folder / "store"}"\n'
        f'log_directory = "{folder / "logs"}"\n'
        f'fsync = {"true" if fsync else "false"}\n'
        f'[[peer]]\naetitle = "{DEST_AE}"\nhost = "127.0.0.1"\nport = {RECEIVER_PORT}\n'
    )
    if forward:
        text += f'[[forward]]\nto = "{DEST_AE}"\n'
    path = folder / "minipacs.toml"
    path.write_text(text)
    return path


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class Bench:
    def __init__(self, workdir: Path, files: list[Path]) -> None:
        self.workdir = workdir
        self.files = files
        self.children = Children(stop_timeout=30)

    def receiver(self) -> subprocess.Popen:
        log = self.workdir / "storescp.log"
        proc = self.children.start([STORESCP, "--ignore", "-aet", DEST_AE, RECEIVER_PORT], log,
                                   env=dcmtk_env())
        wait_listening(proc, [RECEIVER_PORT], "storescp", log, START_TIMEOUT_S)
        return proc

    def minipacs(self, folder: Path, fsync: bool, forward: bool) -> tuple[subprocess.Popen, Path]:
        log = folder / "serve.log"
        proc = self.children.start([MINIPACS, "serve", "--config", config(folder, fsync, forward)],
                                   log)
        wait_listening(proc, [MINIPACS_PORT], "minipacs", log, START_TIMEOUT_S)
        return proc, log

    def storescu(self, port: int, called: str) -> tuple[float, float]:
        """Sends the files; returns (wall, CPU) of the storescu process."""
        started = time.perf_counter()
        proc = subprocess.Popen([STORESCU, "-aec", called, "127.0.0.1", str(port),
                                 *map(str, self.files)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        if status != 0:
            raise BenchError(f"storescu failed ({status}): {proc.stderr.read().decode()[-2000:]}")
        return wall, usage.ru_utime + usage.ru_stime

    def dcmtk_round(self) -> tuple[float, float]:
        receiver = self.receiver()
        try:
            return self.storescu(RECEIVER_PORT, DEST_AE)
        finally:
            self.children.stop(receiver)

    def forward_round(self, n: int) -> tuple[float, float]:
        folder = fresh(self.workdir / f"forward-{n}")
        proc, log = self.minipacs(folder, fsync=True, forward=True)
        try:
            self.storescu(MINIPACS_PORT, "MINIPACS")
            pids = process_tree(proc.pid)
            cpu_before = cpu_seconds(pids)
            receiver = self.receiver()
            try:
                lines = wait_forwarded(log, len(self.files), proc)
                cpu = cpu_seconds(pids) - cpu_before
            finally:
                self.children.stop(receiver)
            first_time, first_ms = lines[0]
            last_time, _ = lines[-1]
            wall = (last_time - first_time) + first_ms / 1000.0
            return wall, cpu
        finally:
            self.children.stop(proc)
            shutil.rmtree(folder, ignore_errors=True)

    def receive_round(self, n: int, fsync: bool, while_forwarding: bool) -> float:
        folder = fresh(self.workdir / f"receive-{n}")
        proc, log = self.minipacs(folder, fsync=fsync, forward=while_forwarding)
        receiver = None
        try:
            if while_forwarding:
                self.storescu(MINIPACS_PORT, "MINIPACS")
                receiver = self.receiver()
                wait_forwarded(log, 1, proc)
            wall, _ = self.storescu(MINIPACS_PORT, "MINIPACS")
            if while_forwarding:
                done = len(forwarded_lines(log))
                print(f"      ({done} of {2 * len(self.files)} forwarded when the second W1 "
                      f"was in)")
            return wall
        finally:
            if receiver:
                self.children.stop(receiver)
            self.children.stop(proc)
            shutil.rmtree(folder, ignore_errors=True)


def forwarded_lines(log: Path) -> list[tuple[float, float]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        match = FORWARDED.match(line)
        if match:
            when = datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
            lines.append((when, float(match.group(2))))
    return lines


def wait_forwarded(log: Path, count: int, proc: subprocess.Popen) -> list[tuple[float, float]]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        lines = forwarded_lines(log)
        if len(lines) >= count:
            return lines
        if proc.poll() is not None:
            raise BenchError(f"minipacs exited\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{len(lines)} of {count} forwarded after {DRAIN_TIMEOUT_S} s\n"
                             f"{tail(log)}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=400, help="W1 objects")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minipacs-fwbench"))
    args = parser.parse_args()
    if not MINIPACS.exists():
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True,
                       cwd=Path(__file__).resolve().parents[2])
    args.workdir.mkdir(parents=True, exist_ok=True)
    w1 = prepare(args.workdir, "w1", w1_name(args.count), lambda f: make_w1(f, args.count),
                 512 * 512 * 2)
    bench = Bench(args.workdir, sorted(w1.iterdir()))
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = min(best.get(key, value), value)

    try:
        for n in range(args.runs):
            print(f"round {n + 1} of {args.runs}")
            wall, cpu = bench.dcmtk_round()
            print(f"  storescu -> storescp --ignore: {wall:.3f} s, CPU {cpu:.3f} s")
            keep("dcmtk wall", wall)
            keep("dcmtk cpu", cpu)
            wall, cpu = bench.forward_round(n)
            print(f"  minipacs queue -> storescp --ignore: {wall:.3f} s, CPU {cpu:.3f} s")
            keep("forward wall", wall)
            keep("forward cpu", cpu)
            for fsync in (True, False):
                mode = "durable" if fsync else "no-fsync"
                alone = bench.receive_round(n, fsync, while_forwarding=False)
                busy = bench.receive_round(n, fsync, while_forwarding=True)
                print(f"  receive W1 ({mode}): alone {alone:.3f} s, while forwarding {busy:.3f} s")
                keep(f"alone {mode}", alone)
                keep(f"busy {mode}", busy)
    finally:
        bench.children.stop_all()
    count = len(bench.files)
    dcmtk_rate = count / best["dcmtk wall"]
    forward_rate = count / best["forward wall"]
    print()
    print(f"Forwarding W1 ({count} x 512 KiB) to storescp --ignore, best of {args.runs}:")
    print(f"  {'sender':<28} {'wall s':>8} {'obj/s':>8} {'CPU s':>8}")
    print(f"  {'dcmtk storescu':<28} {best['dcmtk wall']:>8.3f} {dcmtk_rate:>8.0f} "
          f"{best['dcmtk cpu']:>8.3f}")
    print(f"  {'minipacs forward queue':<28} {best['forward wall']:>8.3f} {forward_rate:>8.0f} "
          f"{best['forward cpu']:>8.3f}")
    ratio = forward_rate / dcmtk_rate
    print(f"  ratio {ratio:.2f}x storescu: {'PASS' if ratio >= 0.9 else 'FAIL'} (floor 0.9x)")
    print()
    print(f"Receiving W1 (storescu -> minipacs), best of {args.runs}:")
    for mode in ("durable", "no-fsync"):
        alone, busy = best[f"alone {mode}"], best[f"busy {mode}"]
        verdict = "PASS" if busy <= 1.3 * alone else "FAIL"
        print(f"  {mode:<9} alone {alone:.3f} s, while forwarding {busy:.3f} s: "
              f"{busy / alone:.2f}x {verdict} (floor <= 1.3x)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"forward.py: {e}", file=sys.stderr)
        sys.exit(1)
