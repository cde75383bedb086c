import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import CONFIGS, DiT, DiTBlock
from tcgraph.passes import capture, expand_blocks
from tcgraph.passes.capture import trace


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_captures_one_node_per_block(name):
    with torch.device("meta"):
        model = DiT(CONFIGS[name])
    cap = capture(model)
    block_nodes = [n for n in cap.gm.graph.nodes if n.op == "call_module" and n.target.startswith("blocks.")]
    assert [n.target for n in block_nodes] == [f"blocks.{i}" for i in range(CONFIGS[name].depth)]
    assert [b.path for b in cap.blocks] == [n.target for n in block_nodes]
    assert {b.num_tokens for b in cap.blocks} == {CONFIGS[name].num_tokens}
    assert {b.hidden_size for b in cap.blocks} == {CONFIGS[name].hidden_size}


def test_captured_and_expanded_graphs_equal_the_model(tiny_model):
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])
    ref = tiny_model(x, t, y)
    gm = capture(tiny_model).gm
    assert torch.equal(gm(x, t, y), ref)
    expanded = expand_blocks(gm)
    assert not any(isinstance(expanded.get_submodule(n.target), DiTBlock)
                   for n in expanded.graph.nodes if n.op == "call_module")
    assert torch.allclose(expanded(x, t, y), ref, atol=1e-6)
    branches = sorted((n.meta["tcgraph.block"], n.meta["tcgraph.branch"])
                      for n in expanded.graph.nodes if "tcgraph.branch" in n.meta)
    assert branches == [(l, b) for l in range(3) for b in ("attn", "mlp")]


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x)


class Branchy(torch.nn.Linear):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be traced
            return x
        return super().forward(x)


def test_untraceable_module_error_names_the_module():
    m = DataDependent()
    m.inner = Branchy(2, 2)
    with pytest.raises(TcgraphError, match=r"inside module 'inner'.*control flow"):
        trace(m, ())
    with pytest.raises(TcgraphError, match="no model adapter for DataDependent; supported architectures: DiT"):
        capture(m)
