"""Torch program files are data: every edit that would make a graph call something other than a
functional ATen operator, or that breaks the graph, is one TcgraphError naming the file; a faithful
round trip reads back a graph that computes what the exported program computes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tcgraph.errors import TcgraphError
from tcgraph.export.programs import META_KEY, read_program, write_programs


class _Variant:
    """What write_programs reads of a variant graph: a tiny module with a graph-own index tensor."""

    def __init__(self):
        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(4, 4))
                self.register_buffer("idx", torch.tensor([0, 2]))

            def forward(self, x):
                h = torch.nn.functional.gelu(x @ self.w)
                return h.index_select(1, self.idx), h.chunk(2, dim=1)[0] * 2.0

        self.id, self.gm = "v0", Tiny().eval()
        self.input_names, self.output_names = ["x"], ["out", "cache.0.attn"]
        self.example_inputs = {"x": torch.randn(3, 4)}


@pytest.fixture()
def program(tmp_path):
    variant = _Variant()
    parameters = [type("P", (), {"name": "w", "shape": (4, 4), "dtype": "float32"})()]
    rel = write_programs(tmp_path, [variant], parameters)["v0"]
    return tmp_path / rel, variant


def _edit(path, change) -> None:
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()[META_KEY])
    change(info)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(info)})


def test_a_program_reads_back_and_computes_what_was_exported(program):
    path, variant = program
    p = read_program(path)
    assert p.info["weights"] == ["w"] and set(p.tensors) == {"idx"}  # the weight is mapped, not stored
    lifted = {"w": variant.gm.w.detach(), "idx": p.tensors["idx"]}
    args = [lifted[name] for kind, name in p.inputs if kind != "user"] + [variant.example_inputs["x"]]
    got = p.gm(*args)
    want = variant.gm(variant.example_inputs["x"])
    assert all(torch.allclose(g, w) for g, w in zip(got, want))


def _first_call(info):
    return next(n for n in info["graph"]["nodes"] if "target" in n)


EDITS = {
    "a Python builtin": (lambda i: _first_call(i).update(target="builtins.open"), "not an ATen operator"),
    "a path through torch": (lambda i: _first_call(i).update(target="torch.os.system"), "not an ATen operator"),
    "an operator that reads files": (lambda i: _first_call(i).update(target="aten.from_file.default"),
                                     "reads files"),
    "a mutating operator": (lambda i: _first_call(i).update(target="aten.add_.Tensor"), "not a functional"),
    "an unknown operator": (lambda i: _first_call(i).update(target="aten.no_such_op.default"), "does not have"),
    "another namespace": (lambda i: _first_call(i).update(target="prims.add.default"), "not an ATen operator"),
    "an attribute, not an operator": (lambda i: _first_call(i).update(target="aten.__class__.__init__"),
                                      "not a functional ATen operator"),
    "an object argument": (lambda i: _first_call(i).update(args=[{"eval": "1+1"}]), "argument"),
    "a node used before it exists": (lambda i: _first_call(i).update(args=[{"node": "later"}]), "before it is defined"),
    "no output": (lambda i: i["graph"]["nodes"].pop(), "no output"),
    "a repeated name": (lambda i: i["graph"]["nodes"].insert(1, _first_call(i)), "not a graph"),
    "a bad input kind": (lambda i: i["graph"]["inputs"][0].__setitem__(0, "module"), "an input is"),
    "no graph": (lambda i: i.pop("graph"), "no graph"),
    "another format": (lambda i: i.update(format=1), "not a tcgraph torch program of format 2"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_every_edit_that_is_not_a_functional_aten_graph_is_refused(program, edit):
    path, _ = program
    change, words = EDITS[edit]
    _edit(path, change)
    with pytest.raises(TcgraphError, match=words):
        read_program(path)


def test_a_pt2_name_or_a_damaged_file_is_refused(program, tmp_path):
    path, _ = program
    with pytest.raises(TcgraphError, match="torch.export archive, which tcgraph no longer loads"):
        read_program(tmp_path / "variants" / "v0.pt2")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TcgraphError, match="cannot read the torch program"):
        read_program(path)
