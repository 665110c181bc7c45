"""Under torch.compile, ring attention is one graph break: the ring runs eagerly, the rest compiles."""

import torch

import fa4_cp


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 3 * 16)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).unbind(-3)
        return fa4_cp.ring_attention(q, k, v, causal=True).flatten(-2) * 2


def test_compiled_module_matches_eager_with_one_graph_break():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(1, 32, 16, requires_grad=True)
    eager = block(x)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)
