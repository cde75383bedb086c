"""export_variants: ONNX equals the fx graph, and the weights are stored once for all variants."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from tests.export.tiny_variants import dit_variants, param_bytes, tiny_dit

from tcgraph.errors import TcgraphError
from tcgraph.export.weights import load_parameters, map_parameters
from tcgraph.compile import VariantGraph
from tcgraph.progress import Recorder
from tcgraph.export.onnx import (
    EXTERNAL_MIN_BYTES,
    WEIGHTS_ALIGN,
    WEIGHTS_PATH,
    ExportableVariant,
    export_variants,
    file_sha256,
    read_external_initializers,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_dit()
    variants = dit_variants(model)
    out = tmp_path_factory.mktemp("export")
    recorder = Recorder()
    entries = export_variants(variants, out, progress=recorder)
    [(desc, total, messages)] = recorder.phases
    assert (desc, total) == ("export", len(variants))
    return model, variants, out, entries, messages


def _run_ort(path, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, session.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_onnx_outputs_equal_graph_outputs(exported):
    _, variants, out, entries, messages = exported
    assert [e["id"] for e in entries] == ["full", "fill", "reuse"]
    assert len(messages) == 3 and messages[2].startswith("verified variant reuse: max abs diff")
    for v, entry in zip(variants, entries):
        assert entry["file"] == f"variants/{v.id}.onnx"
        assert entry["max_abs_diff"] <= 1e-4
        with torch.no_grad():
            ref = v.gm(*(v.example_inputs[n] for n in v.input_names))
        ref = ref if isinstance(ref, tuple) else (ref,)
        session, got = _run_ort(out / entry["file"], v.example_inputs)
        assert [o.name for o in session.get_inputs()] == v.input_names
        for expected, actual in zip(ref, got):
            assert np.abs(expected.numpy() - actual).max() <= 1e-4
            assert np.abs(expected.numpy()).max() > 1e-3  # random weights: not a trivial all-zero output


def test_manifest_entries_describe_the_files(exported):
    _, _, out, entries, _ = exported
    full, fill, reuse = entries
    assert full["inputs"] == [
        {"name": "x", "shape": [2, 1, 16, 16], "dtype": "float32"},
        {"name": "t", "shape": [2], "dtype": "int64"},
        {"name": "y", "shape": [2], "dtype": "int64"},
    ]
    assert reuse["inputs"][3] == {"name": "cache.0.attn", "shape": [2, 64, 128], "dtype": "float32"}
    # An output that has an input's name gets a distinct ONNX name; `name` stays the logical one.
    pairs = [(o["name"], o["onnx_name"]) for o in reuse["outputs"]]
    assert pairs == [("out", "out"), ("cache.0.attn", "cache.0.attn.new")]
    assert [(o["name"], o["onnx_name"]) for o in fill["outputs"]] == [("out", "out"), ("cache.0.attn", "cache.0.attn")]
    for entry in entries:
        assert entry["sha256"] == file_sha256(out / entry["file"])
        assert entry["opset"] >= 17
        onnx.checker.check_model(str(out / entry["file"]))


def test_weights_stored_once_for_all_variants(exported):
    model, _, out, entries, _ = exported
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "variants/fill.onnx", "variants/full.onnx", "variants/reuse.onnx", WEIGHTS_PATH,
    ]
    weights = (out / WEIGHTS_PATH).stat().st_size
    params = param_bytes(model)
    # Once, not once per variant: tensors < 1 KiB stay inline, alignment adds a little.
    assert 0.95 * params <= weights <= 1.05 * params
    for entry in entries:
        assert (out / entry["file"]).stat().st_size < 0.1 * weights


def test_initializers_have_one_canonical_name_across_variants(exported):
    _, _, out, entries, _ = exported
    tables = {e["id"]: read_external_initializers(out / e["file"]) for e in entries}
    assert set(tables["full"]) == set(tables["fill"])
    # `reuse` skips block 0's attention: a strict subset, under the same names.
    assert set(tables["reuse"]) < set(tables["full"])
    assert "blocks.0.attn.qkv.weight.T" in tables["full"] and "blocks.0.attn.qkv.weight.T" not in tables["reuse"]
    for name, tensor in tables["reuse"].items():
        assert tensor == tables["full"][name]  # same name -> same offset, length, dtype, shape
    for entry in entries:
        assert entry["external_initializers"] == sorted(tables[entry["id"]])
    every = {t.offset: t for table in tables.values() for t in table.values()}
    assert all(offset % WEIGHTS_ALIGN == 0 for offset in every)
    # FQNs where the exporter kept the parameter, `<fqn>.T` for folded transposes.
    assert {"pos_embed", "y_embedder.embedding_table.weight", "blocks.1.mlp.fc2.weight.T"} <= set(tables["full"])


def test_small_tensors_stay_inline(exported):
    _, _, out, entries, _ = exported
    model = onnx.load(str(out / entries[0]["file"]), load_external_data=False)
    for init in model.graph.initializer:
        nbytes = np.prod(init.dims, dtype=np.int64) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        external = init.data_location == onnx.TensorProto.EXTERNAL
        assert external == (nbytes >= EXTERNAL_MIN_BYTES), init.name


class _Twins(nn.Module):
    """Two distinct parameters with equal content, and a small bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_dedup_is_by_content_not_by_name(tmp_path):
    gm = torch.fx.symbolic_trace(_Twins())
    entries = export_variants([VariantGraph("v0", gm, ["x"], ["out"], {"x": torch.randn(3, 64)})], tmp_path)
    assert entries[0]["max_abs_diff"] <= 1e-5
    table = read_external_initializers(tmp_path / "variants/v0.onnx")
    assert len(table) == 1  # a.weight and b.weight (same bytes) share one tensor; the bias is inline
    assert (tmp_path / WEIGHTS_PATH).stat().st_size == 64 * 64 * 4


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)  # the ONNX RandomUniform draws other numbers


def test_verify_names_variant_output_and_difference(tmp_path):
    gm = torch.fx.symbolic_trace(_Noisy())
    with pytest.raises(TcgraphError, match=r"variant noisy: output out .* max abs diff [0-9.e-]+ > atol 0.0001"):
        export_variants([VariantGraph("noisy", gm, ["x"], ["out"], {"x": torch.zeros(4, 8)})], tmp_path)
    entries = export_variants(
        [VariantGraph("noisy", gm, ["x"], ["out"], {"x": torch.zeros(4, 8)})], tmp_path / "b", verify=False
    )
    assert entries[0]["max_abs_diff"] is None


def test_bad_variant_descriptions_are_refused(tmp_path):
    gm = torch.fx.symbolic_trace(_Noisy())
    with pytest.raises(TcgraphError, match="1 placeholders"):
        export_variants([VariantGraph("v0", gm, ["x", "t"], ["out"], {"x": torch.zeros(1), "t": torch.zeros(1)})],
                        tmp_path / "a")
    with pytest.raises(TcgraphError, match="missing"):
        export_variants([VariantGraph("v0", gm, ["x"], ["out"], {})], tmp_path / "b")
    with pytest.raises(TcgraphError, match="cannot name a file"):
        export_variants([VariantGraph("../v0", gm, ["x"], ["out"], {"x": torch.zeros(2)})], tmp_path / "c")
    v = VariantGraph("v0", gm, ["x"], ["out"], {"x": torch.zeros(2)})
    with pytest.raises(TcgraphError, match="unique"):
        export_variants([v, v], tmp_path)


@dataclasses.dataclass
class _PlainVariant:
    """Not a tcgraph.compile.VariantGraph: export reads only the fields of the ExportableVariant protocol."""

    id: str
    gm: torch.fx.GraphModule
    input_names: tuple
    output_names: tuple
    example_inputs: dict


def test_any_object_with_the_protocol_fields_exports(tmp_path):
    gm = torch.fx.symbolic_trace(_Twins())
    plain = _PlainVariant("v0", gm, ("x",), ("out",), {"x": torch.randn(3, 64)})
    assert isinstance(plain, ExportableVariant)
    [entry] = export_variants([plain], tmp_path)
    assert entry["max_abs_diff"] <= 1e-5 and [i["name"] for i in entry["inputs"]] == ["x"]
    # export checks every variant, whatever its type
    with pytest.raises(TcgraphError, match="1 placeholders"):
        export_variants([_PlainVariant("v0", gm, ("x", "t"), ("out",), {"x": torch.zeros(1)})], tmp_path / "b")
    with pytest.raises(TcgraphError, match="cannot name a file"):
        export_variants([_PlainVariant("../v0", gm, ("x",), ("out",), {"x": torch.zeros(1)})], tmp_path / "c")


def test_parameter_map_errors_say_what_to_do(tmp_path):
    gm = torch.fx.symbolic_trace(_Twins())
    export_variants([VariantGraph("v0", gm, ["x"], ["out"], {"x": torch.randn(3, 64)})], tmp_path)
    weights, onnx_files = tmp_path / WEIGHTS_PATH, [tmp_path / "variants/v0.onnx"]
    with pytest.raises(TcgraphError, match=r"cannot store the model tensor z in weights.bin: its dtype complex64 has "
                                           r"no ONNX equivalent .*convert the model first"):
        map_parameters(weights, onnx_files, {"z": torch.zeros(4, dtype=torch.complex64)})
    state = dict(_Twins().state_dict())
    entries = map_parameters(weights, onnx_files, state)
    assert all(torch.equal(load_parameters(weights, entries)[k], v) for k, v in state.items())
    past_end = {**entries, "b.bias": {**entries["b.bias"], "offset": 10**9}}
    with pytest.raises(TcgraphError, match=r"the model tensor b.bias lies at bytes .*the folder is damaged"):
        load_parameters(weights, past_end)
    with pytest.raises(TcgraphError, match=r"has dtype 'float99', which this tcgraph cannot read"):
        load_parameters(weights, {"b.bias": {**entries["b.bias"], "dtype": "float99"}})
    with pytest.raises(TcgraphError, match=r"does not have the shape \[3, 5\]"):
        load_parameters(weights, {"b.bias": {**entries["b.bias"], "shape": [3, 5]}})
    with pytest.raises(TcgraphError, match=r"parameter b.bias has transposed=None"):
        load_parameters(weights, {"b.bias": {**entries["b.bias"], "transposed": None}})


def test_damaged_onnx_file_is_named(tmp_path):
    bad = tmp_path / "v0.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(TcgraphError, match=r"cannot read the ONNX file .*v0.onnx.*the artifact folder is damaged"):
        read_external_initializers(bad)
