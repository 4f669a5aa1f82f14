#!/usr/bin/env python3
"""The host's side of image-build/power-cut-test: the modality that sends,
the viewer that checks, and the campaign's summary.

  send         streams CT objects of mixed sizes (mostly a few KiB, some
               MiB, now and then up to 64 MiB) to the device without pause,
               each with its own SOP Instance UID, until it is stopped. The
               ledger (JSON lines, flushed and fsynced per line) gets a
               "sending" line (UID, size, SHA-256 of the data set, series)
               before each object and an "ack" line once its C-STORE
               answers success: the ack lines are the promises the device
               made.
  check        through the device's own services: C-FIND at IMAGE level
               over the campaign's study (the census: every acknowledged
               UID, nothing never sent, no UID twice) and C-GET of the
               series named (or of the whole study), each data set's
               SHA-256 compared with the ledger's.
  destination  what the forward destination (dcmtk storescp) holds: waits,
               for a bounded time, until every acknowledged UID is there;
               counts duplicates and compares the data sets' SHA-256.
  card         the store as found on the card (a folder copied out of the
               root file system after e2fsck): every file under a final
               name is a whole object that was sent.
  summary      the campaign's table and verdict from the work folder.

Usage: power-cut-peer.py COMMAND --help
"""

import argparse
import collections
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "bench"))

from conftest import make_ct  # noqa: E402
from procs import data_set_sha256  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
CALLING_AE = "MODALITY"


# --- The ledger ----------------------------------------------------------------

class Ledger:
    """Append-only JSON lines, each one on the disk before the next step."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8")

    def append(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def read_ledger(path):
    """(every object sent: {uid: record}, the acknowledged UIDs)."""
    sent, acked = {}, set()
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the sender was stopped
            if record["event"] == "sending":
                sent[record["uid"]] = record
            elif record["event"] == "ack":
                acked.add(record["uid"])
    return sent, acked


# --- send ----------------------------------------------------------------------

def object_size(rng):
    """Mostly small, sometimes a few MiB, now and then up to 64 MiB."""
    draw = rng.random()
    if draw < 0.84:
        return rng.randrange(4 * KIB, 64 * KIB)
    if draw < 0.98:
        return rng.randrange(256 * KIB, 4 * MIB)
    return rng.randrange(16 * MIB, 64 * MIB + 1)


def associate(ae, host, port, aetitles):
    """An association under whichever of the AE titles the device answers
    (a dropped configuration may have changed it), or None."""
    for called in aetitles:
        assoc = ae.associate(host, port, ae_title=called)
        if assoc.is_established:
            return assoc
    return None


def send(args):
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    rng = random.Random(args.seed)
    ledger = Ledger(args.ledger)
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    number = 0
    while True:
        assoc = associate(ae, args.host, args.port, args.aetitles.split(","))
        if assoc is None:
            time.sleep(0.5)
            continue
        while assoc.is_established:
            number += 1
            uid = f"{args.series}.{number}"
            path = make_ct(scratch / "next.dcm", uid, object_size(rng), study=args.study, series=args.series)
            size = path.stat().st_size
            ledger.append(event="sending", uid=uid, size=size, sha256=data_set_sha256(path),
                          series=args.series, at=time.time())
            try:
                status = assoc.send_c_store(path)
            except Exception as e:  # the association died under us: the power went
                ledger.append(event="error", uid=uid, error=str(e))
                break
            code = getattr(status, "Status", None)
            if code is None:  # no answer: the association ended (the power went)
                ledger.append(event="no answer", uid=uid)
                break
            if code == 0x0000:
                ledger.append(event="ack", uid=uid, at=time.time())
            else:
                ledger.append(event="refused", uid=uid, status=code)
        if assoc.is_established:
            assoc.release()


# --- check ---------------------------------------------------------------------

def query(assoc, model, **keys):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in keys.items():
        setattr(ds, key, value)
    found = []
    for status, identifier in assoc.send_c_find(ds, model):
        if status is None:
            raise RuntimeError("C-FIND: no answer (association lost)")
        if status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.append(identifier)
        elif status.Status != 0x0000:
            raise RuntimeError(f"C-FIND answered status {status.Status:04X}")
    return found


def census(args):
    """{SOP Instance UID: how many times the index lists it} and {UID: series}."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = associate(ae, args.host, args.port, args.aetitles.split(","))
    if assoc is None:
        raise RuntimeError("no association for C-FIND")
    counts, series_of = collections.Counter(), {}
    try:
        for series in query(assoc, FIND, QueryRetrieveLevel="SERIES", StudyInstanceUID=args.study,
                            SeriesInstanceUID=""):
            for image in query(assoc, FIND, QueryRetrieveLevel="IMAGE", StudyInstanceUID=args.study,
                               SeriesInstanceUID=series.SeriesInstanceUID, SOPInstanceUID=""):
                counts[image.SOPInstanceUID] += 1
                series_of[image.SOPInstanceUID] = series.SeriesInstanceUID
    finally:
        assoc.release()
    return counts, series_of


def retrieve(args, series_list):
    """C-GET of the series named (all of the study if None): {UID: [SHA-256
    of each data set received]}, and the final statuses' failed counts."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    received = collections.defaultdict(list)

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID].append(
            hashlib.sha256(event.request.DataSet.getbuffer()).hexdigest())
        return 0x0000

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(GET)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    ae.maximum_pdu_size = 262144
    failed = 0
    for called in args.aetitles.split(","):
        assoc = ae.associate(args.host, args.port, ae_title=called,
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if assoc.is_established:
            break
    else:
        raise RuntimeError("no association for C-GET")
    try:
        for series in series_list if series_list is not None else [None]:
            ds = Dataset()
            ds.StudyInstanceUID = args.study
            if series is None:
                ds.QueryRetrieveLevel = "STUDY"
            else:
                ds.QueryRetrieveLevel = "SERIES"
                ds.SeriesInstanceUID = series
            for status, _identifier in assoc.send_c_get(ds, GET):
                if status is None:
                    raise RuntimeError("C-GET: no answer (association lost)")
                if status.Status not in (0xFF00, 0xFF01):
                    failed += int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
    finally:
        assoc.release()
    return received, failed


def check(args):
    sent, acked = read_ledger(args.ledger)
    started = time.monotonic()
    counts, series_of = census(args)
    found = set(counts)
    report = {
        "label": args.label,
        "acked": len(acked),
        "sent": len(sent),
        "indexed": len(found),
        "indexed_unacked": len(found - acked),  # stored, but the answer was lost in the cut
        "lost": sorted(acked - found),
        "unknown_in_index": sorted(found - set(sent)),
        "twice_in_index": sorted(u for u, n in counts.items() if n > 1),
    }
    if args.all:
        series_list, scope = None, found
    else:
        series_list = sorted(set(args.series.split(",")) if args.series else set())
        scope = {u for u in found if series_of[u] in series_list}
    received, failed = retrieve(args, series_list) if (series_list is None or series_list) else ({}, 0)
    bad = {u: shas for u, shas in received.items() if u not in sent or any(s != sent[u]["sha256"] for s in shas)}
    report.update({
        "verified_scope": "all" if args.all else series_list,
        "verified": sum(1 for u in received if u not in bad),
        "verified_acked": len(acked & set(received) - set(bad)),
        "not_retrieved": sorted(scope - set(received)),
        "corrupt_acked": sorted(u for u in bad if u in acked),
        "partial": sorted(u for u in bad if u not in acked),
        "get_failed_suboperations": failed,
        "seconds": round(time.monotonic() - started, 1),
    })
    Path(args.report).write_text(json.dumps(report))
    problems = sum(len(report[k]) for k in ("lost", "unknown_in_index", "twice_in_index", "not_retrieved",
                                            "corrupt_acked", "partial")) + failed
    print(f"check {args.label}: {report['acked']} acknowledged, {report['indexed']} indexed "
          f"({report['indexed_unacked']} stored without an answer), lost {len(report['lost'])}, "
          f"index mismatches {len(report['unknown_in_index']) + len(report['twice_in_index']) + len(report['not_retrieved'])}, "
          f"C-GET byte-exact {report['verified']} ({report['verified_acked']} acknowledged), "
          f"corrupt {len(report['corrupt_acked'])}, partial {len(report['partial'])}, "
          f"C-GET failures {failed} ({report['seconds']} s)")
    return 1 if problems else 0


# --- destination ---------------------------------------------------------------

def received_at_destination(log):
    """{UID: times received} of the objects storescp has finished (its
    --exec-on-reception line, printed once the file is written)."""
    return collections.Counter(re.findall(r"^received [A-Z]{2}\.(\S+)$",
                                          Path(log).read_text(errors="replace"), re.M))


def destination(args):
    sent, acked = read_ledger(args.ledger)
    deadline = time.monotonic() + args.wait
    while True:
        received = received_at_destination(args.log)
        missing = acked - set(received)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(5)
    held = {}
    for uid in received:
        path = next(Path(args.dir).glob(f"??.{uid}"), None)
        try:
            held[uid] = data_set_sha256(path) if path else "absent"
        except (AssertionError, OSError):
            held[uid] = "unreadable"
    report = {
        "label": args.label,
        "acked": len(acked),
        "delivered_acked": len(acked & set(held)),
        "missing": sorted(missing),
        "delivered_unacked": len(set(held) - acked),
        "duplicates": sum(n - 1 for n in received.values() if n > 1),
        "different_bytes": sorted(u for u, sha in held.items() if u in sent and sha != sent[u]["sha256"]),
        "unknown": sorted(set(held) - set(sent)),
    }
    Path(args.report).write_text(json.dumps(report))
    print(f"destination {args.label}: {report['delivered_acked']} of {len(acked)} acknowledged objects there, "
          f"missing {len(missing)}, duplicates {report['duplicates']}, other bytes {len(report['different_bytes'])}")
    return 1 if (missing and args.wait) or report["different_bytes"] or report["unknown"] else 0


# --- card ----------------------------------------------------------------------

def card(args):
    sent, acked = read_ledger(args.ledger)
    store = Path(args.store)
    finals, bad, unknown = {}, [], []
    temps = 0
    for path in store.rglob("*"):
        rel = path.relative_to(store)
        if not path.is_file() or rel.parts[0].startswith("index.sqlite") or rel.parts[0] == ".lock":
            continue
        if rel.parts[0] == ".incoming":
            temps += 1
            continue
        uid = re.sub(r"^[A-Z]{2}\.", "", path.name.removesuffix(".dcm"))
        try:
            sha = data_set_sha256(path)
        except (AssertionError, OSError, IndexError):
            sha = "unreadable"
        finals[uid] = sha
        if uid not in sent:
            unknown.append(path.name)
        elif sha != sent[uid]["sha256"]:
            bad.append(path.name)
    report = {"files": len(finals), "temp_files": temps, "partial_or_changed": bad, "unknown": unknown,
              "acked_missing": sorted(acked - set(finals))}
    Path(args.report).write_text(json.dumps(report))
    print(f"card: {len(finals)} objects under final names ({temps} temp files in .incoming), "
          f"partial or changed {len(bad)}, never sent {len(unknown)}, acknowledged but absent {len(report['acked_missing'])}")
    return 1 if bad or unknown or report["acked_missing"] else 0


# --- summary -------------------------------------------------------------------

def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []


def spread(values):
    return (f"min {min(values):.1f} / median {statistics.median(values):.1f} / max {max(values):.1f}"
            if values else "none")


def summary(args):
    work = Path(args.workdir)
    boots = sorted(jsonl(work / "boots.jsonl"), key=lambda b: b["boot"])
    checks = jsonl(work / "checks.jsonl")
    dest = json.loads((work / "destination.json").read_text()) if (work / "destination.json").exists() else None
    card_report = json.loads((work / "card.json").read_text()) if (work / "card.json").exists() else None
    sent, acked = read_ledger(work / "ledger.jsonl")
    cuts = [b for b in boots if b["kind"] != "final"]

    print("\nboot  kind          READY s  cut after s  unflushed dropped/kept (bytes)    FAT after   fsck at boot                     config   drop")
    for b in boots:
        nbd = b.get("nbd") or {}
        dropped = (f"{nbd.get('dropped_writes', 0)}/{nbd.get('kept_writes', 0)} "
                   f"({nbd.get('dropped_bytes', 0)}/{nbd.get('kept_bytes', 0)})")
        print(f"{b['boot']:>4}  {b['kind']:<12}  {b.get('ready', '-'):>7}  {b.get('cut_after', '-'):>11}  {dropped:<32}  "
              f"{b.get('fat', '-'):<10}  {b.get('fsck', '-'):<31}  {b.get('config', '-'):<7}  {b.get('drop_outcome', '-')}")

    lost = set().union(*(set(c["lost"]) for c in checks)) if checks else set()
    mismatches = sum(len(c["unknown_in_index"]) + len(c["twice_in_index"]) + len(c["not_retrieved"]) for c in checks)
    corrupt = set().union(*(set(c["corrupt_acked"]) for c in checks)) if checks else set()
    partial = set().union(*(set(c["partial"]) for c in checks)) if checks else set()
    if card_report:
        partial |= set(card_report["partial_or_changed"])
    get_failures = sum(c["get_failed_suboperations"] for c in checks)
    queue_losses = len(dest["missing"]) if dest else None
    readies = [b["ready"] for b in boots if isinstance(b.get("ready"), (int, float))]
    fat = collections.Counter(b["fat"] for b in cuts if b.get("fat"))
    drop_cuts = [b for b in cuts if b["kind"].startswith("drop")]
    outcomes = collections.Counter(b.get("drop_outcome") for b in drop_cuts)
    repairs = collections.Counter()
    for b in boots:
        for key, n in (b.get("repairs") or {}).items():
            repairs[key] += n
    config_states = collections.Counter(b["config"] for b in boots if b.get("config", "-") != "-")
    nbd_dropped = sum((b.get("nbd") or {}).get("dropped_writes", 0) for b in cuts)
    nbd_dropped_bytes = sum((b.get("nbd") or {}).get("dropped_bytes", 0) for b in cuts)
    nbd_unflushed = sum((b.get("nbd") or {}).get("unflushed_writes", 0) for b in cuts)

    print()
    print(f"disk model:            {args.disk_model}")
    print(f"cuts:                  {len(cuts)} ({collections.Counter(b['kind'] for b in cuts)})")
    print(f"unflushed at the cuts: {nbd_unflushed} writes, {nbd_dropped} dropped ({nbd_dropped_bytes} bytes), the rest kept")
    print(f"objects:               {len(sent)} sent, {len(acked)} acknowledged "
          f"({sum(sent[u]['size'] for u in acked if u in sent) / MIB:.0f} MiB), "
          f"largest acknowledged {max((sent[u]['size'] for u in acked if u in sent), default=0) / MIB:.1f} MiB")
    print(f"lost:                  {len(lost)}")
    print(f"corrupt (acked):       {len(corrupt)}")
    print(f"partial:               {len(partial)}")
    print(f"index mismatches:      {mismatches} (C-GET failed sub-operations: {get_failures})")
    if dest:
        print(f"queue losses:          {queue_losses} (destination holds {dest['delivered_acked']} of {dest['acked']} "
              f"acknowledged; {dest['duplicates']} duplicates, {dest['delivered_unacked']} stored without an answer "
              f"delivered too, {len(dest['different_bytes'])} with other bytes)")
    else:
        print("queue losses:          not checked (the campaign did not reach its end)")
    if card_report:
        print(f"card (after e2fsck):   {card_report['files']} objects under final names, "
              f"{card_report['temp_files']} temp files, {len(card_report['partial_or_changed'])} partial or changed, "
              f"{len(card_report['unknown'])} never sent, {len(card_report['acked_missing'])} acknowledged but absent")
    print(f"drops cut while handled: {len(drop_cuts)}: {dict(outcomes)}")
    print(f"configuration in force:  {dict(config_states)} (broken: {config_states.get('broken', 0)})")
    print(f"FAT after the cuts:      {dict(fat)}")
    print(f"repairs at boot:         {dict(repairs)}")
    print(f"power-on to READY s:     {spread(readies)}")
    print(f"  per boot:              {' '.join(str(r) for r in readies)}")
    failures = (len(lost) + len(corrupt) + len(partial) + mismatches + get_failures + (queue_losses or 0)
                + fat.get("damaged", 0) + config_states.get("broken", 0) + outcomes.get("lost", 0)
                + (len(dest["different_bytes"]) if dest else 0))
    if card_report:
        failures += len(card_report["unknown"]) + len(card_report["acked_missing"])
    complete = dest is not None and card_report is not None
    verdict = "PASS" if failures == 0 and complete else "FAIL"
    print(f"\n{verdict}: {failures} failures" + ("" if complete else " (the campaign did not finish)"))
    return 0 if verdict == "PASS" else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def device(p):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--aetitles", required=True, help="called AE titles to try, comma-separated")
        p.add_argument("--ledger", required=True)
        p.add_argument("--study", required=True)

    p = sub.add_parser("send")
    device(p)
    p.add_argument("--series", required=True, help="this run's series UID (object UIDs extend it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", required=True)
    p.set_defaults(run=send)

    p = sub.add_parser("check")
    device(p)
    p.add_argument("--series", default="", help="series to retrieve and compare, comma-separated")
    p.add_argument("--all", action="store_true", help="retrieve and compare the whole study")
    p.add_argument("--label", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(run=check)

    p = sub.add_parser("destination")
    p.add_argument("--dir", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--wait", type=float, default=0)
    p.add_argument("--label", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(run=destination)

    p = sub.add_parser("card")
    p.add_argument("--store", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--report", required=True)
    p.set_defaults(run=card)

    p = sub.add_parser("summary")
    p.add_argument("--workdir", required=True)
    p.add_argument("--disk-model", required=True)
    p.set_defaults(run=summary)

    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
