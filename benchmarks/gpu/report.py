"""bench_gpu.py's results: derived columns, the markdown table, the JSON, merging earlier runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gpu.prepare import log
from tcgraph.errors import TcgraphError


#################################################################################
#                                  Results                                      #
#################################################################################


def finish(result: dict) -> None:
    """Fill the derived columns of every row (idempotent: called after each new row)."""
    from tcgraph.eval import psnr

    rows = result["rows"]
    full = {r["backend"]: r for r in rows if r["plan"] == "full"}
    eager = full.get("eager")
    for r in rows:
        ref = full.get(r["backend"])
        r["realized_speedup"] = ref["median_ms"] / r["median_ms"] if ref else None
        r["realized_over_predicted"] = (r["realized_speedup"] / r["predicted_speedup"]
                                        if r["realized_speedup"] is not None else None)
        r["vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        ref_step = ref["step_ms"].get("v0", ref["step_ms"].get("eager")) if ref else None
        for vid, s in r["step_ms"].items():
            s["flop_fraction"] = r["flop_fraction"].get(vid, 1.0)
            s["time_fraction"] = s["median_ms"] / ref_step["median_ms"] if ref_step else None
        samples = result["_samples"]
        mine, full_key, eager_key = samples.get((r["backend"], r["plan"])), (r["backend"], "full"), ("eager", "full")
        if mine is None:  # a row merged from an earlier run keeps the values it was written with
            continue
        r["psnr_vs_full_db"] = psnr(mine, samples[full_key]) if r["plan"] != "full" and full_key in samples else None
        r["psnr_full_vs_eager_db"] = psnr(mine, samples[eager_key]) \
            if r["plan"] == "full" and r["backend"] != "eager" and eager_key in samples else None


def _num(v, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def _copies(c) -> str:
    if not isinstance(c, dict):
        return str(c)
    extra = "".join(f", {n} {k}" for k, n in c.items() if k not in ("HtoD", "DtoH", "DtoD"))
    return f"{c['HtoD']} HtoD, {c['DtoH']} DtoH, {c['DtoD']} DtoD{extra}"


def _part(skip: dict) -> str:
    if skip["backend"] is None:
        return ""
    return f"{skip['backend']}{' × ' + skip['plan'] if skip['plan'] else ''}: "


def format_table(result: dict) -> str:
    c = result["config"]
    if c.get("family") == "flux":  # guidance is an input of FLUX.1-dev: one pass per step, no doubled batch
        settings = (f"{c['image_side']}x{c['image_side']} images (latent {c['input_size']}x{c['input_size']}, "
                    f"{c['tokens']} image + {c['text_length']} text tokens), "
                    f"{c['parameters'] / 1e6:,.1f} M parameters, "
                    f"batch {c['batch']}, guidance {c['guidance']} as an input, {c['sampler']} {c['steps']} steps, "
                    f"{c['dtype']}, median of {c['repeats']} runs after 1 warm-up; torch {c['versions']['torch']}.")
    else:
        settings = (f"{c['image_side']}x{c['image_side']} images (model input {c['input_size']}x{c['input_size']}, "
                    f"{c['tokens']} tokens), batch {c['batch']} with guidance {c['guidance']} ({c['model_batch']} "
                    f"rows), DDIM {c['steps']}, {c['dtype']}, median of {c['repeats']} runs after 1 warm-up; "
                    f"torch {c['versions']['torch']}, onnxruntime {c['versions']['onnxruntime']}, "
                    f"tensorrt {c['versions']['tensorrt']}.")
    head = [f"# GPU benchmark: {c['model']} on {c['device_name']}", "", settings, "", f"`{c['command']}`"]
    head += [f"merged with rows of: `{cmd}`" for cmd in c.get("merged_commands", [])] + [""]
    cols = ["backend", "plan", "precision", "variants", "predicted x", "whole run ms", "realized x", "real/pred",
            "vs eager x", "peak torch MiB", "device used MiB", "step ms by variant (steps)", "copies in loop",
            "copies per run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        steps = "; ".join(f"{vid} {s['median_ms']:.2f} ({s['steps']})" for vid, s in r["step_ms"].items())
        vals = [r["backend"], r["plan"], r["precision"], str(r["variants"]), _num(r["predicted_speedup"]),
                _num(r["median_ms"], ".1f"), _num(r["realized_speedup"]), _num(r["realized_over_predicted"]),
                _num(r["vs_eager"]), _num(r["peak_torch_mib"], ".0f"), _num(r.get("device_used_mib"), ".0f"),
                steps, _copies(r["copies_in_loop"]), _copies(r["copies_whole_run"])]
        lines.append("| " + " | ".join(vals) + " |")
    legend = ("Realized x: the same backend's `full` time / the plan's time; predicted x: FLOP ratio; "
              "vs eager x: eager PyTorch `full` time / this row's time. Copies: CUDA memcpy events "
              "(torch.profiler) in one sampling loop, and in one whole run (inputs in, sample out).")
    tail = ["", legend]
    if result["skipped"]:
        tail += ["", "Not run:"] + [f"- {_part(s)}skipped: {s['reason']}" for s in result["skipped"]]
    if result["failed"]:
        tail += ["", "Failed:"] + [f"- {f['backend']} × {f['plan']}: {f['error']}" for f in result["failed"]]
    tail += ["", result["quality_note"]]
    return "\n".join(head + lines + tail) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    finish(result)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(public, indent=1)), (".md", format_table(result))):
        path = out.with_name(out.name + suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


MERGE_KEYS = ("model", "weights", "image_side", "batch", "guidance", "steps", "dtype", "device_name", "seed")


def merge_earlier(result: dict, out: Path, backends: list[str], specs: list[str]) -> None:
    """Take over the rows (and skip/fail records) of an earlier run that this run does not redo."""
    path = out.with_name(out.name + ".json")
    if not path.is_file():
        log(f"--merge: no {path} yet, nothing to merge")
        return
    earlier = json.loads(path.read_text())
    mine, theirs = result["config"], earlier["config"]
    differ = {k: (theirs.get(k), mine[k]) for k in MERGE_KEYS if theirs.get(k) != mine[k]}
    if differ:
        raise TcgraphError(f"--merge: {path} was measured with other settings ({differ}: earlier, now); "
                           "write to another --out or drop --merge")
    redo = {(b, p) for b in backends for p in specs}
    kept = [r for r in earlier["rows"] if (r["backend"], r["plan"]) not in redo]
    for r in kept:
        r.setdefault("measured_by", theirs["command"])
    result["rows"].extend(kept)
    result["skipped"].extend(s for s in earlier["skipped"] if s["backend"] is not None and s["backend"] not in backends)
    result["failed"].extend(f for f in earlier["failed"] if f["backend"] not in backends)
    mine["merged_commands"] = theirs.get("merged_commands", []) + [theirs["command"]]
    log(f"--merge: kept {len(kept)} rows of {path}")


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as e:
        found["onnxruntime"] = f"not installed ({e})"
    try:
        import tensorrt

        found["tensorrt"] = str(getattr(tensorrt, "__version__", "unknown (stub?)"))
    except Exception as e:  # ImportError, or a stub package failing in its own way
        found["tensorrt"] = f"not importable ({type(e).__name__})"
    return found
