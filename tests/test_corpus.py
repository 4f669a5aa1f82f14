"""Every file of pydicom's test data, through minipacs, byte for byte.

The corpus covers explicit/implicit/big endian, deflated, JPEG family, RLE,
odd lengths and broken files. Each Part-10 file of a storage SOP class is
sent by `minipacs send` and, one association per file, by dcmtk's
`storescu`; the stored data set must equal the source's data set byte for
byte, and the stored file must parse with dicom-object (`minipacs dump`)
and with dcmtk's `dcmdump`.
"""

import collections
import hashlib
import subprocess
from concurrent.futures import ThreadPoolExecutor

from conftest import dataset_bytes, dcmtk, dcmtk_env, free_port, meta_of, pydicom_test_files, uid_text, wait_port

# Files dcmtk's storescu cannot send at all (checked by hand, see the
# closing note of the receive-path issue): without these, a refusal by
# minipacs would hide behind "dcmtk could not send it".
DCMTK_CANNOT_SEND = {
    # storescu parses each file before sending; it stops on these itself
    # (its own error messages, before any association traffic):
    "MR_truncated.dcm",  # pixel data longer than the file
    "rtplan_truncated.dcm",  # element longer than the file
    "SC_rgb_jpeg.dcm",  # non-standard VR, then a bogus 1.3 GB length
    # storescu takes the SOP class/instance from the data set, which these
    # files lack (only their meta group has them):
    "UN_sequence.dcm",
    "no_meta_group_length.dcm",
    "priv_SQ.dcm",
    "rtdose_rle.dcm",
    "rtdose_rle_1frame.dcm",
}


def _part10_storage_files():
    """(path, sop_class, transfer syntax) of each Part-10 storage file."""
    out = []
    for p in pydicom_test_files():
        head = p.read_bytes()[:132]
        if len(head) < 132 or head[128:] != b"DICM":
            continue
        meta = meta_of(p)
        sop_class = uid_text(meta.get(0x0002, b""))
        if not sop_class or sop_class == "1.2.840.10008.1.3.10":  # DICOMDIR is not sent
            continue
        if 0x0003 not in meta or 0x0010 not in meta:
            continue
        out.append(p)
    return out


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def _expected_stored(src):
    data = dataset_bytes(src)
    ts = uid_text(meta_of(src)[0x0010])
    # A deflated data set of odd length travels with one NUL of padding
    # (PS3.5 A.5); every other data set travels exactly as stored.
    if ts == "1.2.840.10008.1.2.1.99" and len(data) % 2:
        data += b"\0"
    return data


def _unparsable(minipacs, paths):
    """Names of files that dicom-object (via `minipacs dump`) or dcmdump
    cannot parse."""
    bad = set()
    for p in paths:
        r = subprocess.run([minipacs, "dump", str(p)], capture_output=True)
        d = subprocess.run([dcmtk("dcmdump"), "-q", "+E", str(p)], capture_output=True)
        if r.returncode != 0:
            bad.add(("dicom-object", p))
        if d.returncode != 0:
            bad.add(("dcmdump", p))
    return bad


def _check_store(server, minipacs, sources):
    stored = server.stored_files()
    by_hash = collections.Counter(_digest(dataset_bytes(p)) for p in stored)
    missing = [s for s in sources if by_hash[_digest(_expected_stored(s))] == 0]
    assert not missing, f"not stored byte-exact: {[m.name for m in missing]}"
    # Every stored file parses with dicom-object and with dcmdump, unless
    # the parser cannot parse the very source file either (some corpus
    # files are broken on purpose): we store data sets exactly, so we can
    # only be as parsable as what we were sent.
    source_of = {_digest(_expected_stored(s)): s for s in sources}
    bad_sources = {(tool, p.name) for tool, p in _unparsable(minipacs, sources)}
    ours = []
    for tool, p in _unparsable(minipacs, stored):
        src = source_of.get(_digest(dataset_bytes(p)))
        if src is None or (tool, src.name) not in bad_sources:
            ours.append((tool, p.name))
    assert not ours, f"stored files that do not parse while their source does: {ours}"
    print(f"\nunparsable sources (by the parsers themselves): {sorted(bad_sources)}")
    return stored


def test_corpus_sent_by_minipacs_is_byte_exact(server, minipacs):
    sources = _part10_storage_files()
    assert len(sources) >= 120, len(sources)
    root = sources[0].parents[0]
    r = subprocess.run(
        [minipacs, "send", "127.0.0.1", str(server.port), *map(str, sources)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # The truncated file goes too: the sender does not parse data sets and
    # the receiver stores what arrives, exactly.
    stored = _check_store(server, minipacs, sources)
    print(f"minipacs send: {len(sources)} Part-10 storage files round-tripped byte-exact (from {root})")
    assert len(stored) == len(sources)


def _dcmtk_profile(path, src):
    """A storescu association profile proposing exactly the file's own SOP
    class and transfer syntax, so that dcmtk sends the data set as it is
    (its command-line options can propose only a few compressed syntaxes)."""
    meta = meta_of(src)
    path.write_text(
        "[[TransferSyntaxes]]\n[TS]\n"
        f"TransferSyntax1 = {uid_text(meta[0x0010])}\n"
        "[[PresentationContexts]]\n[PCS]\n"
        f"PresentationContext1 = {uid_text(meta[0x0002])}\\TS\n"
        "[[Profiles]]\n[AsIs]\nPresentationContexts = PCS\n"
    )
    return path


def test_corpus_sent_by_dcmtk_is_byte_exact(server, minipacs, tmp_path):
    """dcmtk's storescu parses and re-writes each data set as it sends it
    (it drops Data Set Trailing Padding, for one), so the oracle for what
    it *sent* is dcmtk's own bit-preserving receiver: the same files go to
    `storescp +B` too, and minipacs must have stored the same bytes."""
    sources = _part10_storage_files()
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    oracle_port = free_port()
    oracle = subprocess.Popen(
        [dcmtk("storescp"), "+B", "+xa", "+uf", "-aet", "MINIPACS", "-od", str(oracle_dir), str(oracle_port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(oracle_port, oracle)

    def send(indexed):
        i, src = indexed
        profile = _dcmtk_profile(tmp_path / f"profile{i}.cfg", src)
        codes = []
        out = ""
        for port in (server.port, oracle_port):
            r = subprocess.run(
                [dcmtk("storescu"), "--config-file", str(profile), "AsIs", "-aec", "MINIPACS", "127.0.0.1", str(port), str(src)],
                capture_output=True,
                text=True,
                env=dcmtk_env(),
            )
            codes.append(r.returncode)
            out += r.stdout + r.stderr
        return src, codes, out

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(send, enumerate(sources)))
    finally:
        oracle.terminate()
        oracle.wait()
    # The two receivers must agree on what succeeded.
    disagree = [(s.name, codes) for s, codes, _ in results if codes[0] != codes[1]]
    assert not disagree, disagree
    cannot = sorted(src.name for src, codes, _ in results if codes[0] != 0)
    print(f"\ndcmtk storescu could not send {len(cannot)} file(s): {cannot}")
    unexpected = set(cannot) - DCMTK_CANNOT_SEND
    assert not unexpected, [(s.name, out[-400:]) for s, _, out in results if s.name in unexpected]
    sent = [src for src, codes, _ in results if codes[0] == 0]

    ours = collections.Counter(_digest(dataset_bytes(p)) for p in server.stored_files())
    theirs = collections.Counter(_digest(dataset_bytes(p)) for p in oracle_dir.iterdir() if p.is_file())
    assert sum(ours.values()) == len(sent)
    assert ours == theirs, "minipacs stored different bytes than dcmtk's bit-preserving receiver"
    as_source = [s for s in sent if ours[_digest(dataset_bytes(s))] > 0]
    reencoded = sorted(s.name for s in sent if ours[_digest(dataset_bytes(s))] == 0)
    print(f"dcmtk storescu: {len(sent)} sent; {len(as_source)} identical to the source file's data set; "
          f"{len(reencoded)} re-encoded by storescu itself and stored exactly as sent: {reencoded}")
    _check_store(server, minipacs, as_source)
