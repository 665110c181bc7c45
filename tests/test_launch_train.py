"""launch/train.py on gloo: cp = 2 trains exactly like one rank, a resumed run repeats the losses
of an uninterrupted one, and bad configurations fail at start with a clear error."""

import sys
from pathlib import Path

import pytest
import torch

from gloo import run_gloo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from config import PRESETS, check_world, parse_config  # noqa: E402


def train_tiny(rank, world_size, argv, collect_grads=False):
    import numpy as np

    from config import parse_config
    from train import train

    grads = []

    def keep_grads(step, model, loss_sum):
        grads.append({name: np.array(p.grad.full_tensor()) for name, p in model.named_parameters()})

    losses = train(parse_config(argv), on_step=keep_grads if collect_grads else None)
    return losses, grads


def test_cp2_matches_one_rank_in_loss_and_gradients(tmp_path):
    argv = ["--preset", "tiny", "--steps", "3"]
    ((status_one, (losses_one, grads_one)),) = run_gloo(train_tiny, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"], True)
    outcomes = run_gloo(train_tiny, 2, fresh_dir(tmp_path, "two"), argv + ["--cp", "2"], True)
    assert status_one == "ok" and all(status == "ok" for status, _ in outcomes), outcomes
    losses_two, grads_two = outcomes[0][1]
    assert losses_one[0] > 5.0  # a byte model starts near log(256) = 5.5
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for step in range(3):
        assert grads_two[step].keys() == grads_one[step].keys()
        for name in grads_one[step]:
            torch.testing.assert_close(
                torch.from_numpy(grads_two[step][name]), torch.from_numpy(grads_one[step][name]), rtol=1e-4, atol=1e-6,
                msg=lambda message, name=name, step=step: f"step {step} {name}: {message}",
            )


def train_each_checkpointing_mode(rank, world_size, argv):
    """Per activation-checkpointing mode: losses, final gradients, ring-attention forward calls,
    and the bytes that autograd keeps outside checkpointed regions."""
    import numpy as np

    import fa4_cp
    from config import ACTIVATION_CHECKPOINTING, parse_config
    from train import train

    ring_attention, calls = fa4_cp.ring_attention, []

    def counted(*args, **kwargs):
        calls.append(1)
        return ring_attention(*args, **kwargs)

    fa4_cp.ring_attention = counted
    outcome = {}
    for mode in ACTIVATION_CHECKPOINTING:
        calls.clear()
        grads = {}

        def keep_grads(step, model, loss_sum):
            unwrapped = ((name.replace("_checkpoint_wrapped_module.", ""), p) for name, p in model.named_parameters())
            grads.update({name: np.array(p.grad.full_tensor()) for name, p in unwrapped})

        saved_bytes = []

        def count(tensor):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            losses = train(parse_config(argv + ["--activation-checkpointing", mode]), on_step=keep_grads)
        outcome[mode] = (losses, grads, len(calls), sum(saved_bytes))
    return outcome


def test_checkpointing_modes_agree_and_except_attention_runs_attention_once(tmp_path):
    steps, layers = 2, PRESETS["tiny"].model.n_layers
    outcomes = run_gloo(train_each_checkpointing_mode, 2, tmp_path, ["--preset", "tiny", "--cp", "2", "--steps", str(steps)])
    assert all(status == "ok" for status, _ in outcomes), outcomes
    by_mode = outcomes[0][1]
    assert by_mode["none"][2] == by_mode["except-attention"][2] == steps * layers
    assert by_mode["layer"][2] == 2 * steps * layers  # backward re-runs each layer's attention forward
    assert by_mode["none"][3] > by_mode["except-attention"][3] > by_mode["layer"][3]
    losses, grads, _, _ = by_mode["none"]
    for mode in ("layer", "except-attention"):
        torch.testing.assert_close(torch.tensor(by_mode[mode][0]), torch.tensor(losses), rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(torch.from_numpy(by_mode[mode][1][name]), torch.from_numpy(grad), rtol=1e-6, atol=1e-7)


def test_unknown_checkpointing_mode():
    with pytest.raises(ValueError, match=r"activation_checkpointing: expected one of layer, except-attention, none, got 'all'"):
        parse_config(["--preset", "tiny", "--activation-checkpointing", "all"])


def fresh_dir(tmp_path, name):
    """A rendezvous directory per launch: gloo's init file may not be reused."""
    path = tmp_path / name
    path.mkdir()
    return path


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    base = ["--preset", "tiny", "--cp", "2", "--steps", "4"]
    straight = run_gloo(train_tiny, 2, fresh_dir(tmp_path, "straight"), base)
    checkpoints = str(tmp_path / "checkpoints")
    first_half = run_gloo(
        train_tiny, 2, fresh_dir(tmp_path, "first"),
        base + ["--stop-at", "2", "--checkpoint-dir", checkpoints, "--checkpoint-every", "2"],
    )
    second_half = run_gloo(train_tiny, 2, fresh_dir(tmp_path, "second"), base + ["--checkpoint-dir", checkpoints, "--resume"])
    for outcome in (straight, first_half, second_half):
        assert all(status == "ok" for status, _ in outcome), outcome
    assert first_half[0][1][0] + second_half[0][1][0] == straight[0][1][0]

    foreign = run_gloo(train_tiny, 2, fresh_dir(tmp_path, "foreign"), base + ["--seq-len", "512", "--checkpoint-dir", checkpoints, "--resume"])
    assert all(status == "error" for status, _ in foreign)
    assert "checkpoint_dir: the checkpoint in" in foreign[0][1] and "seq_len: checkpoint 256, this run 512" in foreign[0][1]


def test_seq_len_not_divisible_by_two_cp():
    with pytest.raises(ValueError, match=r"seq_len: 100 is not divisible by 2 \* cp = 8"):
        parse_config(["--preset", "tiny", "--seq-len", "100", "--cp", "4"])


def test_mesh_must_match_world_size():
    with pytest.raises(ValueError, match=r"dp_shard x cp = 2 x 2 = 4 does not match the world size 2"):
        check_world(parse_config(["--preset", "tiny", "--cp", "2", "--dp-shard", "2"]), world_size=2, cuda_available=False)


def test_cuda_asked_for_without_a_gpu():
    with pytest.raises(ValueError, match=r"device: 'cuda' was asked for but this machine has no CUDA GPU"):
        check_world(PRESETS["1b"], world_size=1, cuda_available=False)


def test_resume_without_checkpoint_dir():
    with pytest.raises(ValueError, match="resume: needs --checkpoint-dir"):
        parse_config(["--preset", "tiny", "--resume"])


def test_rope_depends_only_on_the_distance_even_a_million_tokens_in():
    """<rot(q, m), rot(k, n)> must equal <rot(q, m + D), rot(k, n + D)>; fp32 angles break this
    near 1e6 (their spacing there is 0.06 rad)."""
    from model import RotaryEmbedding, rotate

    rotary = RotaryEmbedding(head_dim=64, theta=500_000.0)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 64, generator=generator) for _ in range(2))

    def score(m, n):
        positions = torch.tensor([[m, n]])
        cos, sin = rotary(positions)
        return float((rotate(q, cos[:, :1], sin[:, :1]) * rotate(k, cos[:, 1:], sin[:, 1:])).sum())

    near = score(3, 10)
    assert abs(score(1_048_003, 1_048_010) - near) < 1e-4 * max(1.0, abs(near))
    assert abs(score(3, 10) - score(3, 11)) > 1e-3  # the score does depend on the distance
