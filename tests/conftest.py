"""Shared fixtures: the minipacs binary, a server under test, real peers.

Every test talks to a real `minipacs serve` process over loopback TCP and
checks the files it leaves on a real filesystem. dcmtk is always called by
absolute path: pip's pynetdicom installs its own `storescu`/`storescp` shims
earlier on PATH.
"""

import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# MINIPACS_BIN selects another build, e.g. the aarch64 one run under
# qemu-user (tests/run does that after the native suite).
BIN = pathlib.Path(os.environ.get("MINIPACS_BIN", ROOT / "target" / "release" / "minipacs"))
DCMTK = pathlib.Path("/usr/bin")


def dcmtk(tool):
    return str(DCMTK / tool)


def dcmtk_env():
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


@pytest.fixture(scope="session")
def minipacs():
    """Builds the release binary once per session (unless MINIPACS_BIN names
    a prebuilt one) and returns its path."""
    if "MINIPACS_BIN" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    assert BIN.exists()
    return str(BIN)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"port {port} never opened")


def open_for_other_user(store):
    """A server started as another user (a `prefix` such as setpriv) runs as
    one process and opens its paths itself, so it must be able to traverse
    pytest's 0700 temporary folders: open the store's ancestors for
    traversal (not for reading). A root start needs none of this: the
    keeper hands its worker the folders as descriptors."""
    for folder in pathlib.Path(store).parents:
        if str(folder).startswith(tempfile.gettempdir() + "/") and folder.stat().st_uid == os.getuid():
            os.chmod(folder, folder.stat().st_mode | 0o711)


def is_index_file(name):
    """Whether a name in the store's root is the index's (index.sqlite, its
    -wal and -shm, one moved aside as .unusable)."""
    return name.startswith("index.sqlite")


class Server:
    """A `minipacs serve` process on a free port with its own store."""

    started = 0

    def __init__(self, binary, store, extra=(), port=None, aetitle="MINIPACS", prefix=()):
        self.binary = binary
        # e.g. a setpriv command line, to run the server as another user
        self.prefix = list(prefix)
        self.store = pathlib.Path(store)
        self.port = port or free_port()
        self.aetitle = aetitle
        self.extra = list(extra)
        Server.started += 1
        self.log_path = self.store.parent / f"server-{self.port}-{Server.started}.log"
        self.proc = None

    def start(self):
        if self.prefix:
            open_for_other_user(self.store)
        self.log = open(self.log_path, "ab")
        cmd = [
            *self.prefix,
            self.binary,
            "serve",
            "--port",
            str(self.port),
            "--aetitle",
            self.aetitle,
            "--output-directory",
            str(self.store),
            *self.extra,
        ]
        # Its own working folder, so that the default log folder
        # (./minipacs-logs) is the test's, not one shared by every server of
        # the session in the checkout (owned by whichever user made it
        # first). A server run as another user keeps the caller's.
        cwd = None if self.prefix else self.store.parent
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=cwd)
        wait_port(self.port, self.proc)
        # The port opens when it is bound (by the keeper, when root); the
        # server is ready when its listeners run.
        deadline = time.monotonic() + 10
        while "listening" not in self.logs():
            assert self.proc.poll() is None, f"server exited early:\n{self.logs()[-2000:]}"
            assert time.monotonic() < deadline, "server never said it was listening"
            time.sleep(0.01)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def worker_pid(self):
        """The process that talks to the network: the keeper's child when
        started as root (privilege separation), else the process itself."""
        try:
            children = pathlib.Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(children[0]) if children else self.proc.pid

    def status(self, field, pid=None):
        """A field of /proc/PID/status of the worker, e.g. VmHWM, in kB."""
        with open(f"/proc/{pid or self.worker_pid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def logs(self):
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text, timeout=10):
        """Waits until the server has logged `text` (a log line can follow
        the answer the peer already has) and returns the whole log."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            if text in logs:
                return logs
            assert time.monotonic() < deadline, f"never logged {text!r}:\n{logs[-3000:]}"
            time.sleep(0.02)

    def stored_files(self):
        """Final files in the store (no temp files, no lock, no index)."""
        out = []
        for p in self.store.rglob("*"):
            rel = p.relative_to(self.store)
            if p.is_file() and rel.parts[0] not in (".incoming", ".lock") and not is_index_file(rel.parts[0]):
                out.append(p)
        return sorted(out)

    def temp_files(self):
        incoming = self.store / ".incoming"
        return sorted(incoming.iterdir()) if incoming.exists() else []


@pytest.fixture
def server_factory(minipacs, tmp_path):
    """Starts servers on demand; stops them all at the end of the test and
    checks that each exited cleanly (status 0) unless the test killed it."""
    servers = []

    def make(extra=(), store=None, **kwargs):
        srv = Server(minipacs, store or tmp_path / f"store{len(servers)}", extra, **kwargs)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        if srv.alive():
            code = srv.stop()
            assert code == 0, f"server exited with {code}:\n{srv.logs()[-3000:]}"


@pytest.fixture
def server(server_factory):
    return server_factory()


def wait_until(what, timeout, every=0.05, why=""):
    """Polls `what` every `every` seconds until it is true; fails after
    `timeout` seconds with `why` (a string, or a function that makes one)."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why() if callable(why) else why
        time.sleep(every)


# --- minipacs on a configuration file --------------------------------------

def config_text(root, peers=None, forwards=(), more="", store=None):
    """A configuration: the store in `store` (default `root`/store), logs in
    `root`/logs, `more` top-level keys or tables, a [[peer]] per {AE: port}
    and a [[forward]] per dict of rule keys."""
    text = (f'output_directory = "{store or root / "store"}"\n'
            f'log_directory = "{root / "logs"}"\n{more}')
    for ae, port in (peers or {}).items():
        text += f'[[peer]]\naetitle = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
    for rule in forwards:
        text += "[[forward]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())
    return text


def write_config(root, peers=None, forwards=(), more="", store=None):
    """config_text() written to `root`/minipacs.toml; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "minipacs.toml"
    cfg.write_text(config_text(root, peers, forwards, more, store))
    return cfg


def serve(start, root, peers=None, forwards=(), more="", port=None, store=None):
    """Starts minipacs (with `start`: server_factory, or a Server-making
    function such as start_unmanaged's) on write_config()'s file under
    `root`. The server knows its configuration (`cfg`), audit trail
    (`audit_path`) and status line (`status_path`)."""
    cfg = write_config(root, peers, forwards, more, store)
    kwargs = {"port": port} if port else {}
    srv = start(["--config", str(cfg)], store=store or root / "store", **kwargs)
    srv.cfg = cfg
    srv.audit_path = root / "logs" / "audit.jsonl"
    srv.status_path = root / "logs" / "status.txt"
    return srv


def start_unmanaged(minipacs, port=None):
    """A Server-making function for tests that stop theirs themselves."""
    def start(extra, store, **kwargs):
        return Server(minipacs, store, extra, port=port, **kwargs).start()
    return start


def kill_9(srv):
    """Kills a server's keeper and worker with SIGKILL (the worker first)
    and waits until the worker is gone; srv.stop() still closes its log."""
    worker = srv.worker_pid()
    os.kill(worker, signal.SIGKILL)
    srv.proc.kill()
    srv.proc.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{worker}"), 10, why="the worker outlived its keeper")


def audit(srv, event):
    """The lines of the server's audit trail of one event, e.g. "forward"."""
    try:
        text = srv.audit_path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in map(json.loads, text.splitlines()) if line.get("event") == event]


def queue(srv, *args, code=0):
    """Runs `minipacs queue -c CONFIG ARGS`; returns its standard output."""
    r = subprocess.run([srv.binary, "queue", "-c", str(srv.cfg), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, f"queue {args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def queue_list(srv, *args):
    """`minipacs queue list --json` as a list of dicts."""
    return [json.loads(line) for line in queue(srv, "list", "--json", "--limit", "100000", *args).splitlines()]


# --- Orthanc ---------------------------------------------------------------

class Orthanc:
    """Debian's Orthanc, run by hand under `root` (its configuration,
    database and log there) on a free HTTP port and `dicom_port` (default a
    free one). Started at once; it can be stopped and started again on the
    same ports and folders.

    `modalities`: {name: (AE title, port)}, the peers it knows on loopback
    (to query, retrieve from, ask for or report storage commitment), with
    a 30 s timeout as SCU. `sync`: Orthanc's SyncStorageArea (off, it takes
    hundreds of objects a second; on, its default, some 20 to 50).
    `check_called_aet`: whether it refuses associations to another AE title
    than `aetitle`. `verbose`: its --verbose log. `http_timeout`: how long a
    REST call may take."""

    def __init__(self, root, aetitle="ORTHANC", dicom_port=None, modalities=None, sync=True,
                 check_called_aet=True, verbose=False, http_timeout=120):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http = free_port()
        self.dicom = dicom_port or free_port()
        self.aetitle = aetitle
        self.verbose = verbose
        self.http_timeout = http_timeout
        config = {
            "Name": "minipacs-test",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": aetitle,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "Plugins": [],
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": True,
            "SyncStorageArea": sync,
        }
        if modalities:
            config["DicomModalities"] = {n: [ae, "127.0.0.1", port] for n, (ae, port) in modalities.items()}
            config["DicomScuTimeout"] = 30
        (self.root / "orthanc.json").write_text(json.dumps(config))
        self.proc = None
        self.start()

    def start(self):
        self.log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", *(["--verbose"] if self.verbose else []),
                                      str(self.root / "orthanc.json")],
                                     stdout=self.log, stderr=self.log, cwd=self.root, env=dcmtk_env())
        wait_port(self.http, self.proc, timeout=60)
        wait_port(self.dicom, self.proc, timeout=60)
        return self

    def rest(self, method, path, body=None, raw=False):
        """A call to its REST API: the answer as JSON (None when empty), or
        as bytes with `raw`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=self.http_timeout) as r:
            answer = r.read()
        return answer if raw else json.loads(answer or b"null")

    def count(self):
        """How many instances it holds."""
        return self.rest("GET", "/statistics")["CountInstances"]

    def instances(self):
        """{SOP Instance UID: Orthanc id}."""
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in self.rest("GET", "/instances?expand")}

    def logs(self):
        return (self.root / "orthanc.log").read_text(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def meta_elements(data):
    """Yields (element, value, end offset) for each file meta element of the
    Part-10 bytes `data` (explicit VR little endian, group 0002)."""
    pos = 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 2:
            return
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            start = pos + 8
        pos = start + length
        yield elem, data[start:pos], pos


def data_set_offset(path, head_bytes=None):
    """Where the data set starts in a Part-10 file."""
    data = head_bytes if head_bytes is not None else pathlib.Path(path).read_bytes()
    assert data[128:132] == b"DICM", path
    end = 132
    for _elem, _value, end in meta_elements(data):
        pass
    return end


def dataset_bytes(path):
    """The data set bytes of a Part-10 file: everything after group 0002."""
    data = pathlib.Path(path).read_bytes()
    return data[data_set_offset(path, data) :]


def meta_of(path):
    """The file meta group of a Part-10 file as {element: value bytes}."""
    data = pathlib.Path(path).read_bytes()
    return {elem: value for elem, value, _end in meta_elements(data)}


def uid_text(value):
    return value.rstrip(b"\0 ").decode()


def make_ct(path, sop_instance, size=4096, study="1.2.826.0.1.3680043.10.1", series=None):
    """Writes a small but valid CT Part-10 file with pydicom."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_instance
    ds.Modality = "CT"
    ds.PatientName = "Test^Minipacs"
    ds.PatientID = "MP0001"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or study + ".1"
    pixels = size // 2
    ds.Columns = 512 if pixels >= 512 else pixels
    ds.Rows = max(1, pixels // ds.Columns)
    size = ds.Rows * ds.Columns * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(size)
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_test_files():
    """Every file shipped in pydicom's test data folder."""
    import pydicom

    root = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in root.rglob("*") if p.is_file())
