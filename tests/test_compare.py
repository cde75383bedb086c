"""`tcgraph compare`: its numbers against the metrics computed here from the two sample sets, the
reference built once and reused, and one clear error for each kind of bad input."""
import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tcgraph import api
from tcgraph.cli import main
from tcgraph.compare import REFERENCES, compare, open_artifact, reference_folder, reference_problem
from tcgraph.errors import UsageError
from tcgraph.eval.classifier import load_classifier
from tcgraph.eval.metrics import psnr, ssim
from tcgraph.inspection import measured

SAMPLE = ["--classes", "0-1", "--per-class", "2", "--seed", "7"]  # 4 images: one run of the batch-4 artifact


@pytest.fixture(scope="module")
def art(demo_fora2_artifact, tmp_path_factory):
    # `tcgraph transform --plan fora:2 --steps 6 --batch 4` of the demo, made once per session
    # (tests/conftest.py); this module's own copy, so that the reference is built beside it
    out = tmp_path_factory.mktemp("compare") / "digits-fora2"
    shutil.copytree(demo_fora2_artifact, out, symlinks=True)
    return out


@pytest.fixture(scope="module")
def report(art, tmp_path_factory):
    """`tcgraph compare ART --json --repeats 2`, its reference built on the fly."""
    png = tmp_path_factory.mktemp("compare-png") / "grid.png"
    out = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(out):
        assert main(["compare", str(art), *SAMPLE, "--repeats", "2", "--json", "--png", str(png)]) == 0
    return json.loads(out.getvalue()), png


def test_numbers_are_the_metrics_of_the_two_sample_sets(art, report):
    r, png = report
    assert r["reference_built"] is True and r["plan"] == "fora:2" and r["images"] == 4
    ref = reference_folder(open_artifact(art))
    assert r["reference"] == str(ref) and ref.parent.name == REFERENCES and ref.parent.parent == art.parent
    # the same images, sampled here with the API from both folders
    kwargs = dict(classes="0-1", per_class=2, seed=7, progress=False)
    a, labels = api.sample(art, **kwargs)
    b, _ = api.sample(ref, **kwargs)
    assert labels == [0, 0, 1, 1]
    assert not torch.equal(a, b)  # fora:2 does change the images ...
    assert r["psnr"] == pytest.approx(psnr(a, b), rel=1e-9)
    assert r["ssim"] == pytest.approx(ssim(a, b), rel=1e-9)
    assert r["max_abs_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-6)
    assert 15 < r["psnr"] < 60 and 0.5 < r["ssim"] < 1  # ... a little: 6 steps, every other one reused
    classifier = load_classifier()
    for name, x in (("artifact", a), ("reference", b)):
        want = (classifier.predict(x.clamp(-1, 1)) == torch.tensor(labels)).float().mean().item()
        assert r["accuracy"][name] == pytest.approx(want)
    assert r["accuracy"]["judge"] == "digits classifier"
    t = r["time_s"]
    assert t["repeats"] == 2 and len(t["artifact_runs"]) == len(t["reference_runs"]) == 2
    assert all(s > 0 for s in t["artifact_runs"] + t["reference_runs"])
    assert t["artifact"] == pytest.approx(sum(t["artifact_runs"]) / 2)  # the median of two
    assert r["realized_speedup"] == pytest.approx(t["reference"] / t["artifact"])
    assert r["predicted_speedup"] == pytest.approx(api.inspect(art)["predicted_speedup"])
    assert r["predicted_speedup"] > 1.5
    # the grid: a header, then one row per class; three groups of two 64-pixel images
    with Image.open(png) as img:
        width, height = img.size
    assert r["png"] == str(png) and height >= 2 * 64 and width >= 3 * 2 * 64


def test_the_reference_is_reused_or_given(art, report, tmp_path, capsys):
    r, _ = report
    ref = r["reference"]
    manifest = Path(ref, "manifest.json")
    stamp = json.loads(manifest.read_text())["created"]
    assert main(["compare", str(art), *SAMPLE, "--png", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "(full)" in out and "built now" not in out  # reused, not built again
    assert f"PSNR {r['psnr']:.2f} dB" in out and "realized" in out and "predicted 1.9" in out
    assert json.loads(manifest.read_text())["created"] == stamp
    assert main(["compare", str(art), "--reference", ref, *SAMPLE, "--json", "--png", str(tmp_path / "b.png")]) == 0
    given = json.loads(capsys.readouterr().out)
    assert given["reference"] == ref and given["reference_built"] is False
    assert given["psnr"] == r["psnr"] and given["max_abs_diff"] == r["max_abs_diff"]


@pytest.mark.parametrize("argv, message, code", [
    (["compare", "{parent}/digits-fora"], "did you mean {parent}/digits-fora2?", 1),
    (["compare", "{art}", "--reference", "{art}"], "its plan is fora:2, not full", 2),
    (["compare", "{art}", "--repeats", "0"], "repeats (--repeats) must be an integer in 1..1000", 2),
    (["compare", "{art}", "--prompt", "a three"], "conditioned on class ids, not text", 2),
])
def test_bad_input_gets_one_clear_error(art, tmp_path, capsys, argv, message, code):
    argv = [a.format(art=art, parent=art.parent) for a in argv] + ["--png", str(tmp_path / "c.png")]
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcgraph: error: ") and message.format(parent=art.parent) in err
    assert not (tmp_path / "c.png").exists()


def test_a_bad_request_is_refused_before_a_reference_is_built(art, tmp_path, capsys):
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    assert main(["compare", str(copy), "--classes", "12", "--png", str(tmp_path / "c.png")]) == 2
    assert "class ids 12 are out of range" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no reference, no grid


def test_a_reference_of_another_model_or_settings_is_refused_by_what_differs(art, report):
    a = open_artifact(art)
    ref = open_artifact(report[0]["reference"])
    assert reference_problem(a, ref) is None
    settings = dataclasses.replace(ref.plan.settings, eta=0.5, cfg_scale=3.0)
    other = dataclasses.replace(ref, plan=dataclasses.replace(ref.plan, settings=settings))
    assert reference_problem(a, other) == ("its sampler settings differ: cfg_scale 3.0 (the artifact's: 2.0), "
                                           "eta 0.5 (the artifact's: 0.0)")
    bigger = dataclasses.replace(ref.model_config, depth=ref.model_config.depth + 1)
    other = dataclasses.replace(ref, model_config=bigger, model_config_hash="0" * 64)
    assert reference_problem(a, other).startswith("it is for another model (digits: depth 7, hidden 128")
    with pytest.raises(UsageError, match="is not the reference of .*its plan is fora:2, not full"):
        compare(art, art, classes="0", per_class=1)


def test_inspect_shows_what_compare_measured(art, report, tmp_path):
    """compare keeps its summary in the folder (measured.json); inspect shows it beside the prediction,
    as the same numbers; the folder still verifies (the record is not one of its listed files)."""
    copy = tmp_path / "art"  # its own copy: the other tests' compares rewrite the module artifact's record
    shutil.copytree(art, copy)
    r = compare(copy, report[0]["reference"], classes="0-1", per_class=2, seed=7, repeats=2)
    assert r["recorded"] == str(copy / measured.MEASURED)
    info = api.inspect(copy)  # verifies every listed file
    m = info["measured"]
    assert m["status"] == "current" and m["images"] == 4 and m["repeats"] == 2 and m["backend"] == "ort"
    assert m["realized_speedup"] == pytest.approx(r["realized_speedup"])
    assert m["predicted_speedup"] == pytest.approx(info["predicted_speedup"])
    assert m["ratio"] == pytest.approx(r["realized_speedup"] / r["predicted_speedup"])
    line = next(x for x in api.format_inspect(info).splitlines() if x.startswith("measured"))
    assert f"realized {r['realized_speedup']:.2f}x of predicted {r['predicted_speedup']:.2f}x " \
           f"({m['ratio']:.2f}), PSNR {r['psnr']:.2f} dB vs full" in line and "median of 2 runs" in line
    # a record that names another manifest: stale, said so
    record = json.loads((copy / measured.MEASURED).read_text())
    (copy / measured.MEASURED).write_text(json.dumps({**record, "manifest_sha256": "0" * 64}))
    assert "STALE" in api.format_inspect(api.inspect(copy))
    (copy / measured.MEASURED).unlink()
    assert api.inspect(copy)["measured"] is None
    assert "measured   not yet: `tcgraph compare` measures" in api.format_inspect(api.inspect(copy))


@pytest.mark.parametrize("text, problem", [
    ("{not json", "measured.json: Expecting property name"),
    ("[1, 2]", "not a measurement record"),
    ('{"format": 1, "images": 4, "repeats": 1, "manifest_sha256": "x", "psnr": "45"}', "psnr is '45'"),
    ('{"format": 1, "images": 4, "repeats": 1, "manifest_sha256": "x", "realized_speedup": -1}', "realized_speedup"),
    ('{"format": 1, "images": 0, "repeats": 1, "manifest_sha256": "x"}', "images is 0, not a count"),
    (" " * (measured.MAX_BYTES + 1), "larger than"),
])
def test_a_malformed_record_is_named_and_ignored(art, report, tmp_path, text, problem):
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    (copy / measured.MEASURED).write_text(text)
    info = api.inspect(copy)
    assert info["measured"]["status"] == "unreadable" and problem in info["measured"]["problem"]
    assert f"measured   ignored (measured.json: " in api.format_inspect(info)


def test_a_folder_that_cannot_keep_the_record_still_compares(art, report, monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(art / measured.MEASURED))

    monkeypatch.setattr(measured, "record", refuse)
    assert main(["compare", str(art), *SAMPLE, "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "recorded   not in the artifact folder (" in out and "quality    PSNR" in out
