"""torch.compile traces ring attention as one custom op: no graph break (fullgraph=True holds),
compiled results and gradients equal eager's, and a new sequence length recompiles no more than
SDPA does. On 2 gloo ranks, and on 4 as a 2 x 2 Ulysses x ring mesh (its own custom ops), with
AOTAutograd (the ops' fake implementations and their autograd)."""

import pytest
import torch
import torch.nn.functional as F

import fa4_cp
from fa4_cp.plan.mesh_sharding import mesh_sharding
from ranks import run_ranks, values

VARIANTS = {  # name -> (varlen, causal, window_size, softcap, sinks, v's head_dim)
    "dense_causal": (False, True, (-1, -1), None, False, 8),
    "dense_window_sinks": (False, True, (5, 0), None, True, 8),
    "dense_full_softcap": (False, False, (-1, -1), 2.0, False, 8),
    "varlen_causal": (True, True, (-1, -1), None, False, 8),
    "varlen_window_softcap_sinks": (True, True, (3, 0), 2.0, True, 8),
    "mla_varlen_causal": (True, True, (-1, -1), None, False, 4),  # v narrower than q and k, as MLA's
}
DOCUMENTS = [9, 23, 1, 31]


class Block(torch.nn.Module):
    """Projections, ring attention, an output scale: what a compiled transformer block holds."""

    def __init__(self, variant: str, group=None):
        super().__init__()
        self.group = group
        self.varlen, self.causal, self.window, self.softcap, sinks, self.v_dim = VARIANTS[variant]
        self.proj = torch.nn.Linear(16, 4 * 8 + 2 * 8 + 2 * self.v_dim)
        self.sinks = torch.nn.Parameter(torch.randn(4)) if sinks else None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.proj(x).split([32, 16, 2 * self.v_dim], dim=-1)
        q, k, v = q.unflatten(-1, (4, 8)), k.unflatten(-1, (2, 8)), v.unflatten(-1, (2, self.v_dim))
        options = dict(group=self.group, causal=self.causal, window_size=self.window, softcap=self.softcap, sinks=self.sinks)
        if self.varlen:
            out = fa4_cp.ring_attention_varlen(q[0], k[0], v[0], cu_seqlens, layout="zigzag", **options)[None]
        else:
            out = fa4_cp.ring_attention(q, k, v, **options)
        return out.flatten(-2).sigmoid() * 2


def _inputs(variant: str, rank: int, world_size: int, ulysses: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(10 + rank)
    if not VARIANTS[variant][0]:
        return torch.randn(1, 16, 16, generator=generator, requires_grad=True), None
    sharding = mesh_sharding(fa4_cp.Sharding.documents(DOCUMENTS, world_size // ulysses, "zigzag"), ulysses)
    cu = torch.tensor([0, *DOCUMENTS]).cumsum(0).to(torch.int32)
    return torch.randn(1, sharding.local_len, 16, generator=generator, requires_grad=True), cu


def _results(block: Block, x: torch.Tensor, cu: torch.Tensor | None) -> list[torch.Tensor]:
    out = block(x, cu)
    parameters = [x, *block.parameters()]
    return [out.detach(), *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), parameters)]


def _compiled_against_eager(variant: str, rank: int, world_size: int, group=None, ulysses: int = 1) -> tuple[int, float]:
    """Graph breaks, and the largest difference of compiled from eager results and gradients."""
    torch.manual_seed(0)
    block = Block(variant, group)
    x, cu = _inputs(variant, rank, world_size, ulysses)
    eager = _results(block, x, cu)
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(block)(x, cu).graph_break_count
    torch._dynamo.reset()
    compiled = _results(torch.compile(block, backend="aot_eager", fullgraph=True), x, cu)
    return breaks, max((a - b).abs().max().item() for a, b in zip(compiled, eager))


def compiled_versus_eager(rank: int, world_size: int) -> dict:
    report = {variant: _compiled_against_eager(variant, rank, world_size) for variant in VARIANTS}
    report["recompiles"] = {kind: _graphs_over_lengths(kind) for kind in ("ring", "sdpa")}
    return report


def compiled_versus_eager_on_a_mesh(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("ring", "ulysses"))
    return {variant: _compiled_against_eager(variant, rank, world_size, mesh, ulysses=2) for variant in VARIANTS}


def _graphs_over_lengths(kind: str) -> int:
    """Graphs compiled for four sequence lengths."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            if kind == "sdpa":
                return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
            return fa4_cp.ring_attention(q, k, v, causal=True)

    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    attention = torch.compile(Attention(), backend=counting_backend)
    for seq in (8, 16, 24, 32):
        attention(*(torch.randn(1, seq, 2, 8) for _ in range(3)))
    return len(graphs)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return values(run_ranks(compiled_versus_eager, 2, tmp_path_factory.mktemp("compile"), timeout=600))


def assert_no_break_and_equal(reports: list[dict], variant: str) -> None:
    for rank, report in enumerate(reports):
        breaks, difference = report[variant]
        assert breaks == 0, f"rank {rank}: {breaks} graph breaks"
        assert difference == 0.0, f"rank {rank}: compiled differs from eager by {difference:.3e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_ring_has_no_graph_break_and_matches_eager(variant, reports):
    assert_no_break_and_equal(reports, variant)


def test_new_sequence_lengths_recompile_no_more_than_sdpa(reports):
    for report in reports:
        assert report["recompiles"]["ring"] <= report["recompiles"]["sdpa"], report["recompiles"]


@pytest.fixture(scope="module")
def mesh_reports(tmp_path_factory):
    return values(run_ranks(compiled_versus_eager_on_a_mesh, 4, tmp_path_factory.mktemp("compile_mesh"), timeout=600))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_2d_mesh_has_no_graph_break_and_matches_eager(variant, mesh_reports):
    assert_no_break_and_equal(mesh_reports, variant)
