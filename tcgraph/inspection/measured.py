"""What `tcgraph compare` last measured of an artifact, kept in the folder for `inspect` to show.

`inspect` predicts a plan's speedup from FLOPs; what a user gets depends on the machine and the
backend, so the ratio realized / predicted is a measurement. `compare` writes its summary to
`measured.json` in the artifact folder (beside the files the manifest lists; not one of them, so
the artifact verifies as before), and `inspect` shows it with where and when it was measured:

    measured   realized 1.58x of predicted 1.98x (0.80), PSNR 45.12 dB vs full; compare, 40 images, ort, ...

The record names the manifest it measured (its sha256): an artifact rebuilt in place is a new
folder without it, and a record whose manifest differs is shown as stale, not as the artifact's.
The file may come from someone else like the rest of the folder: it is read as JSON data, every
field checked for its type and range, and a malformed one is reported and otherwise ignored. Only
the artifact's own file is read (`measured.json`, no path taken from any file).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

from tcgraph.files import atomic_write_text, file_sha256

MEASURED = "measured.json"
FORMAT = 1
MAX_BYTES = 64 * 1024  # a record is a few hundred bytes; a larger file is not one
_NUMBERS = ("realized_speedup", "predicted_speedup", "psnr", "ssim", "artifact_s", "reference_s", "load_average")
_STRINGS = ("measured_at", "backend", "device", "tcgraph_version", "manifest_sha256", "by")


def record(root: str | Path, result: dict, tcgraph_version: str) -> Path:
    """Write `compare`'s `result` (its JSON dict) as the artifact's `measured.json`; returns the path.
    Raises OSError where the folder cannot be written (the caller says so and goes on)."""
    root = Path(root)
    t = result["time_s"]
    entry = {
        "format": FORMAT, "by": "tcgraph compare", "tcgraph_version": tcgraph_version,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_sha256": file_sha256(root / "manifest.json"),
        "backend": result["backend"], "device": result["device"], "images": result["images"],
        "repeats": t["repeats"], "artifact_s": t["artifact"], "reference_s": t["reference"],
        "realized_speedup": result["realized_speedup"], "predicted_speedup": result["predicted_speedup"],
        "psnr": result["psnr"], "ssim": result["ssim"],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    entry = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
    return atomic_write_text(root / MEASURED, json.dumps(entry, indent=1) + "\n")


def read(root: str | Path) -> dict | None:
    """The artifact's last measurement: the record's fields plus `ratio` (realized / predicted) and
    `status`: "current", "stale" (made for another manifest) or "unreadable" (with `problem`);
    None where there is none."""
    root = Path(root)
    path = root / MEASURED
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        entry = json.loads(path.read_text(encoding="utf-8"))
        _check(entry)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        return {"status": "unreadable", "problem": f"{MEASURED}: {e}"}
    try:
        current = file_sha256(root / "manifest.json") == entry["manifest_sha256"]
    except OSError:
        current = False
    realized, predicted = entry["realized_speedup"], entry["predicted_speedup"]
    ratio = realized / predicted if realized is not None and predicted else None
    return {**entry, "ratio": ratio, "status": "current" if current else "stale"}


def _check(entry) -> None:
    """Types and ranges of a record's fields (ValueError names the first that is wrong)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ValueError(f"not a measurement record of format {FORMAT}")
    for key in _NUMBERS:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"{key} is {value!r}, not a finite number >= 0")
    for key in ("images", "repeats"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} is {value!r}, not a count")
    for key in _STRINGS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise ValueError(f"{key} is not a short string")
    if not isinstance(entry.get("manifest_sha256"), str):
        raise ValueError("manifest_sha256 is missing")


def measured_line(m: dict | None) -> str:
    """`inspect`'s line for the last measurement (`read`'s result), or how to make one."""
    if m is None:
        return "measured   not yet: `tcgraph compare` measures quality and time against full"
    if m["status"] == "unreadable":
        return f"measured   ignored ({m['problem']})"
    realized = "n/a" if m["realized_speedup"] is None else f"{m['realized_speedup']:.2f}x"
    predicted = "n/a" if m["predicted_speedup"] is None else f"{m['predicted_speedup']:.2f}x"
    ratio = "" if m["ratio"] is None else f" ({m['ratio']:.2f})"
    psnr = "" if m["psnr"] is None else f", PSNR {m['psnr']:.2f} dB vs full"
    where = m["backend"] + (f" on {m['device']}" if m.get("device") else "")
    load = "" if m.get("load_average") is None else f", load {m['load_average']:.1f}"
    when = (m.get("measured_at") or "")[:16].replace("T", " ")
    stale = "; STALE: made for an earlier build of this folder" if m["status"] == "stale" else ""
    runs = f"median of {m['repeats']} runs" if m["repeats"] > 1 else "one run"
    return (f"measured   realized {realized} of predicted {predicted}{ratio}{psnr}; compare, {m['images']} images, "
            f"{runs}, {where}, {when} UTC{load}{stale}")
