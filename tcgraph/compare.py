"""`tcgraph compare`: what a plan costs in quality and buys in time, measured against `full`.

An artifact and its reference (the `full` plan of the same model with the same sampler settings)
sample the same images from the same noise: the same seed, classes or prompts, and backend.
Reported: PSNR and SSIM of the artifact's samples against the reference's (`tcgraph.eval.metrics`),
their largest absolute difference, class accuracy where a judge exists (`tcgraph.eval.judge`: the
demo models' digits), the wall time of both sampling loops (the median of `repeats` runs; loading
the folder and creating the runtime's sessions are not counted) and the realized speedup beside
the predicted one (`inspect`'s, from the FLOPs measured at transform time); and a PNG grid, one
row per class or prompt: the reference's images, the artifact's, and their difference. The
summary is also kept in the artifact folder as `measured.json` (`tcgraph.inspection.measured`),
which `inspect` shows beside the predicted speedup.

Without a reference folder, one is built (`transform --plan full` with the artifact's settings)
into `.tcgraph-references/` beside the artifact and reused while it matches. Samples are compared
as the model produces them (pixels in [-1, 1] for the demos, latents for latent models).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.eval import judge
from tcgraph.eval.metrics import SSIM_WIN_SIZE, psnr, ssim
from tcgraph.export.artifact import Artifact, load_artifact
from tcgraph.files import describe_os_error
from tcgraph.inspection import measured
from tcgraph.models import PRETRAINED
from tcgraph.progress import QUIET, Phase, Progress, bars
from tcgraph.sampling import checks
from tcgraph.suggest import did_you_mean_path
from tcgraph.version import __version__

REFERENCES = ".tcgraph-references"  # beside the artifact: references built on the fly, one per model and settings
DIFF_GAIN = 8  # the grid's difference images show |a - b| x 8: a difference of 1/8 of the range is full white
SAMPLE_PHASE = "sample"  # the progress phase of `api.sample` that spans its sampling loop (tcgraph.sampling.runs)


#################################################################################
#                              Artifact and reference                           #
#################################################################################


def open_artifact(path, name: str = "artifact", option: str | None = None) -> Artifact:
    """`load_artifact`, with "did you mean" for a folder that does not exist."""
    checks.path(path, name, option)
    try:
        return load_artifact(Path(path))
    except TcgraphError as e:
        hint = did_you_mean_path(path, folders_only=True) if not Path(path).exists() else ""
        raise type(e)(f"{e} ({hint})" if hint else str(e)) from None


def _same_weights(a: Artifact, b: Artifact) -> bool | None:
    """Whether two artifacts hold the same model tensors (None: cannot tell, a folder without a parameter map)."""
    if a.files.get(a.weights_file) == b.files.get(b.weights_file):
        return True
    if a.parameters is None or b.parameters is None:
        return None
    from tcgraph.export.weights import load_parameters

    wa, wb = load_parameters(a.weights_path, a.parameters), load_parameters(b.weights_path, b.parameters)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def reference_problem(art: Artifact, ref: Artifact) -> str | None:
    """Why `ref` is not the `full` reference of `art` (same model, weights and sampler settings), or None."""
    if ref.plan.planner != "full":
        return f"its plan is {ref.plan.planner}, not full"
    if ref.model_config_hash != art.model_config_hash:
        return (f"it is for another model ({ref.source_model or 'unnamed'}: {_describe(ref)}; the artifact's "
                f"{art.source_model or 'unnamed'}: {_describe(art)})")
    want, have = art.plan.settings.to_dict(), ref.plan.settings.to_dict()
    differ = [f"{k} {have.get(k)!r} (the artifact's: {want.get(k)!r})" for k in sorted(set(want) | set(have))
              if want.get(k) != have.get(k)]
    if differ:
        return "its sampler settings differ: " + ", ".join(differ)
    if _same_weights(art, ref) is False:
        return "it holds other weights of the same model (transformed from another checkpoint, or before retraining)"
    return None


def _describe(art: Artifact) -> str:
    c = art.model_config
    return f"depth {c.depth}, hidden {c.hidden_size}, {c.num_tokens} tokens"


def reference_folder(art: Artifact) -> Path:
    """Where a reference for `art` is built: `.tcgraph-references/<model>-full-<key>` beside it, the key
    naming the model, its config and the sampler settings (artifacts that share them share it)."""
    source = art.extra.get("source") or art.source_model or "in-memory"
    key = json.dumps([source, art.model_config_hash, art.plan.settings.to_dict()], sort_keys=True)
    name = Path(str(art.source_model or "model")).stem or "model"
    return art.root.parent / REFERENCES / f"{name}-full-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_reference(art: Artifact, progress: Progress = QUIET) -> tuple[Artifact, bool]:
    """The reference of `art` beside it: reused where a matching one was built before, else
    transformed now from the model the artifact was transformed from. Returns (reference, built now)."""
    out = reference_folder(art)
    if (out / "manifest.json").is_file():
        try:
            ref = load_artifact(out)
        except TcgraphError:
            ref = None  # damaged: built again below
        if ref is not None and reference_problem(art, ref) is None:
            return ref, False
    source = art.extra.get("source") or art.source_model
    if not source or source == "in-memory" or (source not in PRETRAINED and not Path(source).exists()):
        where = f" ({source} is not here)" if source and source != "in-memory" else " (from a model in memory)"
        raise UsageError(f"cannot build the full reference of {art.root}: it was transformed{where}; "
                         "transform the same model with --plan full and the same settings, and give that folder "
                         "as the reference (--reference DIR, reference= in the API)")
    s = art.plan.settings
    api.transform(source, "full", out, steps=s.num_steps, guidance=s.cfg_scale, eta=s.eta, batch=s.batch,
                  clip_x0=s.clip_x0, scheduler=s.scheduler if s.scheduler is not None else "ddim",
                  text_length=s.text_length or None, force=out.exists(), progress=progress)
    ref = load_artifact(out)  # named as the artifact was (relative or not), not as transform resolved it
    problem = reference_problem(art, ref)
    if problem is not None:  # the model was changed since the artifact was transformed
        raise TcgraphError(f"the reference built from {source} into {out} does not match {art.root}: {problem}; "
                           "transform the artifact again, or give a reference (--reference DIR)")
    return ref, True


#################################################################################
#                                 Timed sampling                                #
#################################################################################


class _TimedPhase(Phase):
    def __init__(self, inner: Phase, seconds: list[float]):
        self.inner, self.seconds, self.start = inner, seconds, time.perf_counter()

    def tick(self, note: str = "") -> None:
        self.inner.tick(note)

    def close(self) -> None:
        if self.start is not None:
            self.seconds.append(time.perf_counter() - self.start)
            self.start = None
        self.inner.close()


class SampleTimer(Progress):
    """Passes phases on to `inner` and times the sampling loop (`SAMPLE_PHASE`) of each `api.sample` call."""

    def __init__(self, inner: Progress = QUIET):
        self.inner, self.seconds = inner, []

    def phase(self, desc: str, total: int) -> Phase:
        phase = self.inner.phase(desc, total)
        return _TimedPhase(phase, self.seconds) if desc == SAMPLE_PHASE else phase

    def announce(self, text: str) -> None:
        self.inner.announce(text)


def timed_samples(paths: Sequence[Path], repeats: int, progress: Progress,
                  **options) -> list[tuple[torch.Tensor, list[int], list[float]]]:
    """`api.sample(path, **options)` for each path, `repeats` rounds taking each path in turn (so that a
    busy machine slows them alike): per path (samples, labels, seconds of each sampling loop)."""
    timers = [SampleTimer(progress) for _ in paths]
    first: list[tuple[torch.Tensor, list[int]]] = []
    for r in range(repeats):
        for i, path in enumerate(paths):
            samples, labels = api.sample(path, progress=timers[i], **options)
            if r == 0:  # the metrics read the first round; later rounds are for timing
                first.append((samples, labels))
    for path, timer in zip(paths, timers):
        if len(timer.seconds) != repeats:
            raise TcgraphError(f"the sampling loop of {path} was timed {len(timer.seconds)} times in {repeats} runs")
    return [(samples, labels, timer.seconds) for (samples, labels), timer in zip(first, timers)]


#################################################################################
#                                    compare                                    #
#################################################################################


def compare(artifact: str | Path, reference: str | Path | None = None, *, classes: str | Sequence[int] | None = None,
            per_class: int = 4, seed: int = 0, prompts: Sequence[str] | None = None, negative_prompt: str = "",
            text=None, text_encoder: str | Path | None = None, backend: str = "ort", device: str | None = None,
            repeats: int = 1, png: str | Path | None = None, progress: bool | Progress = False) -> dict:
    """Sample `artifact` and its `full` reference from the same noise; returns the report as plain JSON.

    `reference`: a `full` artifact of the same model, weights and sampler settings; None builds
    one beside the artifact (`reference_folder`) or reuses the one built before. `repeats`: sampling
    runs of each, timed; the median counts. `png`: the side-by-side grid to write. The other
    arguments are `api.sample`'s.
    """
    repeats = checks.integer(repeats, "repeats", "--repeats", lo=1, hi=1000)
    png = api.checked_outputs(png, None)[0]  # before sampling, which may take minutes
    prog = bars(progress)
    art = open_artifact(artifact)
    _check_request(art, classes, per_class, seed, prompts, text)  # before a reference is built
    if reference is None:
        ref, built = build_reference(art, prog)
    else:
        ref, built = open_artifact(reference, "reference", "--reference"), False
        problem = reference_problem(art, ref)
        if problem is not None:
            raise UsageError(f"{ref.root} is not the reference of {art.root}: {problem}; give the folder of "
                             f"`tcgraph transform --plan full` with the artifact's settings, or omit the reference "
                             f"(--reference) to have one built")
    options = dict(classes=classes, per_class=per_class, seed=seed, prompts=prompts, negative_prompt=negative_prompt,
                   text=text, text_encoder=text_encoder, backend=backend, device=device)
    (a, labels, a_times), (b, _, b_times) = timed_samples([art.root, ref.root], repeats, prog, **options)
    h, w = a.shape[-2:]
    digits = judge.expected_digits(a.shape[1:], labels, num_classes=art.model_config.num_classes,
                                   prompts=list(prompts) if prompts is not None else None)
    a_time, b_time = statistics.median(a_times), statistics.median(b_times)
    result = {
        "artifact": str(art.root), "plan": art.plan.planner, "reference": str(ref.root), "reference_built": built,
        "model": art.source_model, "images": len(labels), "seed": seed, "backend": backend, "device": device,
        "psnr": psnr(a, b), "ssim": ssim(a, b) if min(h, w) >= SSIM_WIN_SIZE else None,
        "max_abs_diff": float((a.double() - b.double()).abs().max()),
        "accuracy": None if digits is None else {"judge": judge.JUDGE, "artifact": judge.accuracy(a, digits),
                                                 "reference": judge.accuracy(b, digits)},
        "time_s": {"artifact": a_time, "reference": b_time, "repeats": repeats, "artifact_runs": a_times,
                   "reference_runs": b_times},
        "realized_speedup": b_time / a_time if a_time > 0 else None,
        "predicted_speedup": api.inspect(art.root, verify=False)["predicted_speedup"],
        "png": None,
    }
    if png is not None:
        rows = _row_labels(labels, prompts)
        result["png"] = str(save_comparison(b, a, labels, rows, png, ("full", art.plan.planner)))
    try:  # for `inspect`, which shows what was last measured beside what the FLOPs predict
        result["recorded"] = str(measured.record(art.root, result, __version__))
    except OSError as e:  # a read-only folder: the measurement is still printed
        result["recorded"], result["not_recorded"] = None, describe_os_error(e)
    return result


def _check_request(art: Artifact, classes, per_class, seed, prompts, text) -> None:
    """What `api.sample` will check of the images asked for, checked before a reference is built."""
    checks.integer(per_class, "per_class", "--per-class", lo=1)
    checks.seed(seed)
    if art.model_config.text_conditioned:
        if classes is not None or (prompts is None and text is None):
            raise UsageError("this artifact's model is text-conditioned: give prompts (--prompt) or prompt embeddings "
                             "(text=, --embeddings FILE) instead of class ids")
    elif prompts is not None or text is not None:
        raise UsageError("this artifact's model is conditioned on class ids, not text: give classes (--classes) and "
                         "drop the prompts")
    else:
        checks.parse_classes(classes, art.model_config.num_classes)


def _row_labels(labels: list[int], prompts: Sequence[str] | None) -> dict[int, str]:
    return {c: (f"class {c}" if prompts is None else prompts[c]) for c in dict.fromkeys(labels)}


#################################################################################
#                                  The grid PNG                                 #
#################################################################################


def save_comparison(reference: torch.Tensor, samples: torch.Tensor, labels: list[int], rows: dict[int, str],
                    path: str | Path, titles: tuple[str, str], pad: int = 2, label_width: int = 0) -> Path:
    """One row per label: its reference images, its artifact images and their |difference| x DIFF_GAIN,
    in three labelled column groups; rows labelled by `rows[label]`. Written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from tcgraph.files import atomic_write

    ref, art = api.to_images(reference), api.to_images(samples)
    diff = api.to_images((reference.double() - samples.double()).abs() * DIFF_GAIN - 1)
    _, h, w, c = ref.shape
    scale = max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    per_row = max(labels.count(k) for k in rows)
    font = ImageFont.load_default()
    label_width = label_width or min(240, 8 + 6 * max(len(t) for t in rows.values()))
    group = per_row * (w + pad) + pad
    top = 18
    width = label_width + 3 * group + 2 * 3 * pad
    height = top + len(rows) * (h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    headers = (titles[0], titles[1], f"|difference| x{DIFF_GAIN}")
    for g, header in enumerate(headers):
        draw.text((label_width + g * (group + 3 * pad) + pad, 3), header, fill=(0, 0, 0), font=font)
    for r, (label, text) in enumerate(rows.items()):
        y = top + r * (h + pad) + pad
        draw.text((4, y + h // 2 - 6), text[:40], fill=(0, 0, 0), font=font)
        idx = [i for i, k in enumerate(labels) if k == label]
        for g, images in enumerate((ref, art, diff)):
            for j, i in enumerate(idx):
                img = images[i] if c == 3 else np.repeat(images[i], 3, axis=2)
                tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
                grid.paste(tile, (label_width + g * (group + 3 * pad) + pad + j * (w + pad), y))
    return atomic_write(path, lambda f: grid.save(f, format="PNG"), choose="choose another --png")


#################################################################################
#                                   The report                                  #
#################################################################################


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_compare(r: dict) -> str:
    """The terminal report of `compare`'s result."""
    t = r["time_s"]
    how = f"median of {t['repeats']}" if t["repeats"] > 1 else "one run each"
    ssim_text = "n/a (images smaller than its window)" if r["ssim"] is None else f"{r['ssim']:.4f}"
    psnr_text = f"{r['psnr']:.2f} dB"
    lines = [
        f"artifact   {r['artifact']} ({r['plan']})",
        f"reference  {r['reference']} (full{', built now' if r['reference_built'] else ''})",
        f"images     {r['images']}, seed {r['seed']}, backend {r['backend']}"
        + (f" on {r['device']}" if r["device"] else ""),
        f"quality    PSNR {psnr_text}, SSIM {ssim_text}, max |difference| {r['max_abs_diff']:.4g}",
    ]
    acc = r["accuracy"]
    if acc is not None:
        lines.append(f"accuracy   artifact {_percent(acc['artifact'])}, reference {_percent(acc['reference'])} "
                     f"({acc['judge']})")
    lines.append(f"time       artifact {t['artifact']:.3f} s, reference {t['reference']:.3f} s ({how}; sampling "
                 "loops only)")
    realized = "n/a" if r["realized_speedup"] is None else f"{r['realized_speedup']:.2f}x"
    predicted = "n/a" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x"
    lines.append(f"speedup    realized {realized}, predicted {predicted} (from FLOPs)")
    if r["png"]:
        lines.append(f"wrote      {r['png']}")
    if r.get("recorded"):
        lines.append(f"recorded   {r['recorded']} (`tcgraph inspect` shows it)")
    elif r.get("not_recorded"):
        lines.append(f"recorded   not in the artifact folder ({r['not_recorded']})")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    """The result as JSON; a non-finite number (an infinite speedup) becomes null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(r), indent=1)


__all__ = ["SampleTimer", "build_reference", "compare", "format_compare", "open_artifact", "reference_folder",
           "reference_problem", "save_comparison", "to_json"]
