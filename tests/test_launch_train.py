"""launch/train.py on gloo: cp = 2 trains exactly like one rank, a resumed run repeats the losses
of an uninterrupted one, and bad configurations fail at start with a clear error."""

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from ranks import run_ranks, values

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
    ((losses_one, grads_one),) = values(run_ranks(train_tiny, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"], True))
    losses_two, grads_two = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "two"), argv + ["--cp", "2"], True))[0]
    assert losses_one[0] > 5.0  # a byte model starts near log(256) = 5.5
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for step in range(3):
        assert grads_two[step].keys() == grads_one[step].keys()
        for name in grads_one[step]:
            torch.testing.assert_close(
                torch.from_numpy(grads_two[step][name]), torch.from_numpy(grads_one[step][name]), rtol=1e-4, atol=1e-6,
                msg=lambda message, name=name, step=step: f"step {step} {name}: {message}",
            )


def test_ulysses_2_by_ring_2_matches_one_rank(tmp_path):
    """--ulysses 2 at cp 4: a 2 x 2 Ulysses x ring mesh, its heads in 2 chunks, trains like one rank."""
    argv = ["--preset", "tiny", "--steps", "2"]
    ((losses_one, grads_one),) = values(run_ranks(train_tiny, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"], True))
    mesh_argv = argv + ["--cp", "4", "--ulysses", "2", "--ulysses-chunks", "2"]
    losses_mesh, grads_mesh = values(run_ranks(train_tiny, 4, fresh_dir(tmp_path, "mesh"), mesh_argv, True))[0]
    torch.testing.assert_close(torch.tensor(losses_mesh), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for name in grads_one[-1]:
        torch.testing.assert_close(torch.from_numpy(grads_mesh[-1][name]), torch.from_numpy(grads_one[-1][name]), rtol=1e-4, atol=1e-6)


def test_an_mla_like_layer_trains_at_cp2_like_one_rank(tmp_path):
    """--qk-head-dim / --v-head-dim: q and k wider than v, as DeepSeek-V3's MLA (192 / 128),
    scaled down; cp 2 matches one rank in loss and gradients."""
    argv = ["--preset", "tiny", "--steps", "2", "--qk-head-dim", "24", "--v-head-dim", "16"]
    ((losses_one, grads_one),) = values(run_ranks(train_tiny, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"], True))
    losses_two, grads_two = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "two"), argv + ["--cp", "2"], True))[0]
    assert next(g for name, g in grads_one[-1].items() if name.endswith("o_proj.weight")).shape == (64, 4 * 16)
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for name in grads_one[-1]:
        torch.testing.assert_close(torch.from_numpy(grads_two[-1][name]), torch.from_numpy(grads_one[-1][name]), rtol=1e-4, atol=1e-6)


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
    by_mode = values(run_ranks(train_each_checkpointing_mode, 2, tmp_path, ["--preset", "tiny", "--cp", "2", "--steps", str(steps)]))[0]
    assert by_mode["none"][2] == by_mode["except-attention"][2] == steps * layers
    assert by_mode["layer"][2] == 2 * steps * layers  # backward re-runs each layer's attention forward
    assert by_mode["none"][3] > by_mode["except-attention"][3] > by_mode["layer"][3]
    losses, grads, _, _ = by_mode["none"]
    for mode in ("layer", "except-attention"):
        torch.testing.assert_close(torch.tensor(by_mode[mode][0]), torch.tensor(losses), rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(torch.from_numpy(by_mode[mode][1][name]), torch.from_numpy(grad), rtol=1e-6, atol=1e-7)


def test_unknown_checkpointing_mode(capsys):
    import dataclasses

    from config import check_config

    with pytest.raises(ValueError, match=r"activation_checkpointing: expected one of layer, except-attention, none, got 'all'"):
        check_config(dataclasses.replace(PRESETS["tiny"], activation_checkpointing="all"))
    with pytest.raises(SystemExit):
        parse_config(["--preset", "tiny", "--activation-checkpointing", "all"])
    assert "argument --activation-checkpointing: invalid choice: 'all'" in capsys.readouterr().err


def fresh_dir(tmp_path, name):
    """A rendezvous directory per launch: gloo's init file may not be reused."""
    path = tmp_path / name
    path.mkdir()
    return path


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    base = ["--preset", "tiny", "--cp", "2", "--steps", "4"]
    straight = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "straight"), base))
    checkpoints = str(tmp_path / "checkpoints")
    first_half = values(run_ranks(
        train_tiny, 2, fresh_dir(tmp_path, "first"),
        base + ["--stop-at", "2", "--checkpoint-dir", checkpoints, "--checkpoint-every", "2"],
    ))
    resumed = run_ranks(train_tiny, 2, fresh_dir(tmp_path, "second"), base + ["--checkpoint-dir", checkpoints, "--resume"])
    second_half = values(resumed)
    assert first_half[0][0] + second_half[0][0] == straight[0][0]
    assert "resuming from step 2 of 4" in resumed[0].stderr

    longer = run_ranks(train_tiny, 2, fresh_dir(tmp_path, "longer"), base[:-1] + ["6", "--checkpoint-dir", checkpoints, "--resume"])
    assert len(values(longer)[0][0]) == 4  # steps 3 to 6
    assert "the LR schedule changes from the checkpoint's, now recomputed from step 2: steps: checkpoint 4, this run 6" in longer[0].stderr

    foreign = run_ranks(train_tiny, 2, fresh_dir(tmp_path, "foreign"), base + ["--seq-len", "512", "--checkpoint-dir", checkpoints, "--resume"])
    assert all(outcome.status == "error" for outcome in foreign)
    assert "checkpoint_dir: the checkpoint in" in foreign[0].value and "seq_len: checkpoint 256, this run 512" in foreign[0].value


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


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _text(value: str) -> bytes:  # pickle protocol 4's SHORT_BINUNICODE
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _planted(marker: Path) -> dict[str, bytes]:
    """Pickles that try to run `touch marker` while loading, or hold a class DCP's metadata has not."""
    return {
        # os.system reached through an allowed module's own imports: a dotted name, resolved by protocol 4
        "dotted name": b"\x80\x04" + _text("torch.distributed.checkpoint.metadata") + _text("os.system") + b"\x93"
        + _text(f"touch {marker}") + b"\x85R.",
        "reduce of a callable": pickle.dumps(_RunsCode(marker)),
        "class outside the list": pickle.dumps(argparse.Namespace(storage_data=None)),
    }


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    """DCP's metadata, through the storage reader that resume uses, and the RNG file: nothing is
    resolved outside the list, so nothing runs; the file is named."""
    import torch.distributed.checkpoint as dcp

    import checkpoint

    genuine = tmp_path / "genuine"
    state = {"x": torch.randn(3), "y": torch.ones(2, dtype=torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(genuine), no_dist=True)
    loaded = {"x": torch.zeros(3), "y": torch.zeros(2, dtype=torch.bfloat16)}
    dcp.load(loaded, storage_reader=checkpoint.TrustedMetadataReader(genuine), no_dist=True)
    assert all(torch.equal(loaded[key], state[key]) for key in state)  # DCP's own metadata passes
    torch.save({"torch": torch.get_rng_state()}, genuine / "rng_rank0.pt")
    (genuine / "python_rng_rank0.json").write_text(json.dumps([3, list(range(625)), None]))
    assert checkpoint.read_rng(genuine, 0)[0]["torch"].dtype == torch.uint8

    marker = tmp_path / "code_ran"
    for name, payload in _planted(marker).items():
        evil = tmp_path / name.replace(" ", "_")
        evil.mkdir()
        (evil / ".metadata").write_bytes(payload)
        with pytest.raises(ValueError, match=r"checkpoint_dir: refusing .*\.metadata: .* is not part of DCP's metadata"):
            checkpoint.TrustedMetadataReader(evil)
        assert not marker.exists(), name
    torch.save({"torch": _RunsCode(marker)}, evil / "rng_rank0.pt")
    with pytest.raises(ValueError, match=r"checkpoint_dir: refusing .*rng_rank0.pt"):
        checkpoint.read_rng(evil, 0)
    assert not marker.exists()


def test_dp_shard_2_by_cp_2_matches_one_rank_over_both_sequences(tmp_path):
    """Each dp_shard replica trains on its own sequence; the step's gradient is that of the loss
    summed over both sequences divided by their total count of predicted tokens (the count is
    all-reduced over dp_shard), as one rank computes it here."""
    import fa4_cp
    from data import TokenStream
    from loss import IGNORE_INDEX
    from model import Decoder

    argv = ["--preset", "tiny", "--steps", "1", "--dp-shard", "2", "--cp", "2"]
    losses, grads = values(run_ranks(train_tiny, 4, fresh_dir(tmp_path, "four"), argv, True, timeout=300))[0]
    config = parse_config(argv)
    model = Decoder(config.model)
    model.init_weights(config.seed)
    model.ring = {"group": None, "backend": None, "transport": None}
    data = TokenStream(config.data, config.seq_len, config.seed)
    total, valid = 0.0, 0
    for replica in range(2):
        input_ids, labels = data.batch(replica)
        local = fa4_cp.shard_inputs(input_ids[None], labels[None])
        total = total + model(local["input_ids"], local["position_ids"], local["labels"], config.loss_chunk)
        valid += int((labels != IGNORE_INDEX).sum())
    (total / valid).backward()
    assert losses[0] == pytest.approx(float(total / valid), rel=1e-5)
    trained = {name.replace("_checkpoint_wrapped_module.", ""): grad for name, grad in grads[0].items()}
    assert trained.keys() == dict(model.named_parameters()).keys()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(torch.from_numpy(trained[name]), parameter.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--attention-backend", "fa4"], "attention_backend: 'fa4' needs --device cuda"),
        (["--keep-checkpoints", "0"], "keep_checkpoints: expected a positive count, got 0"),
        (["--seq-len", "0"], "seq_len: expected a positive count, got 0"),
        (["--stop-at", "9"], r"stop_at: expected a step from 1 to --steps \(4\), got 9"),
        (["--checkpoint-every", "2"], "checkpoint_every: saving every 2 steps needs --checkpoint-dir"),
        (["--qk-head-dim", "23"], r"qk_head_dim: expected an even head_dim of 2 or more \(RoPE rotates pairs\), got 23"),
        (["--cp", "4", "--ulysses", "3"], r"ulysses: expected a positive divisor of cp \(4\) or .auto., got 3"),
        (["--cp", "8", "--ulysses", "8"], r"ulysses: 8 must divide n_heads \(4\)"),
        (["--cp", "4", "--ulysses", "2", "--ulysses-chunks", "4"], r"ulysses_chunks: 4 chunks do not split the 2 q heads"),
        (["--ulysses-chunks", "0"], r"ulysses_chunks: expected a positive count or 'auto', got 0"),
    ],
)
def test_bad_ring_settings_fail_at_start(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(["--preset", "tiny", *flags])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--attention-backend", "flash"], "argument --attention-backend: invalid choice: 'flash'"),
        (["--transport", "shm"], "argument --transport: invalid choice: 'shm'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--packing", "docs"], "argument --packing: invalid choice: 'docs'"),
    ],
)
def test_enumerated_flags_take_only_their_choices(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--preset", "tiny", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_bad_flag_prints_its_cause_once_per_launch(rank, capsys, monkeypatch):
    """No traceback per rank: rank 0 prints one line, every rank exits with status 2."""
    import train

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--preset", "tiny", "--seq-len", "0"])
    assert exit_.value.code == 2
    expected = "train.py: error: seq_len: expected a positive count, got 0\n" if rank == "0" else ""
    assert capsys.readouterr().err == expected


def test_help_documents_every_flag_with_its_default():
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        parse_config(["--help"])
    flags = [word for word in text.getvalue().split() if word.startswith("--") and word != "--help"]
    assert {"--seq-len", "--keep-checkpoints", "--attention-backend", "--transport", "--n-kv-heads"} <= set(flags)
    assert "(default tiny: 256, small: 131072, 1b: 1048576)" in " ".join(text.getvalue().split())
    per_flag = " ".join(text.getvalue().split()).split(" --")[1:]
    assert all(entry.count("(default") <= 1 for entry in per_flag), [entry for entry in per_flag if entry.count("(default") > 1]


def test_packed_documents_train_at_cp2_like_one_rank_and_resume_exactly(tmp_path):
    """--packing documents: the corpus's files as documents (the balanced layout), cp = 2 against
    one rank in loss and gradients, and a resumed run repeats the uninterrupted losses."""
    from data import build_corpus

    site = tmp_path / "site"
    for number, length in enumerate([300, 17, 1, 120, 45, 600, 9, 250, 80, 33, 5, 400]):
        (site / f"m{number:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        (site / f"m{number:02d}.py").write_bytes(bytes([65 + number % 26]) * length)
    corpus = build_corpus(tmp_path / "corpus.bin", site)
    argv = ["--preset", "tiny", "--steps", "2", "--data", "python-sources", "--corpus-path", str(corpus), "--packing", "documents", "--seq-len", "250"]
    ((losses_one, grads_one),) = values(run_ranks(train_tiny, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"], True))
    losses_two, grads_two = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "two"), argv + ["--cp", "2"], True))[0]
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for name in grads_one[-1]:
        torch.testing.assert_close(torch.from_numpy(grads_two[-1][name]), torch.from_numpy(grads_one[-1][name]), rtol=1e-4, atol=1e-6)
    checkpoints = str(tmp_path / "packed_checkpoints")
    first = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "first"), argv + ["--cp", "2", "--stop-at", "1", "--checkpoint-dir", checkpoints, "--checkpoint-every", "1"]))
    second = values(run_ranks(train_tiny, 2, fresh_dir(tmp_path, "second"), argv + ["--cp", "2", "--checkpoint-dir", checkpoints, "--resume"]))
    assert first[0][0] + second[0][0] == losses_two


def train_recording_splits(rank, world_size, argv):
    """Losses, final gradients and each step's context-parallel mesh shape."""
    import numpy as np

    from config import parse_config
    from train import train

    shapes, grads = [], {}

    def record(step, model, loss_sum):
        shapes.append(tuple(model.ring["group"].mesh.shape))
        grads.update({name: np.array(p.grad.full_tensor()) for name, p in model.named_parameters()})

    return train(parse_config(argv), on_step=record), grads, shapes


def test_ulysses_auto_picks_a_split_per_batch_and_trains_like_one_rank(tmp_path):
    """--packing documents defaults to --ulysses auto: at cp 4 each batch runs on the split that
    fa4_cp.plan_mesh predicts fastest for its documents (every split the heads allow is built at
    start), and the run matches one rank in loss and gradients."""
    from data import build_corpus

    site = tmp_path / "site"
    site.mkdir()
    for number, length in enumerate([1900, 17, 1, 120, 45, 600, 9, 250, 80, 33, 5, 400, 1700, 60]):
        (site / f"m{number:02d}.py").write_bytes(bytes([65 + number % 26]) * length)
    corpus = build_corpus(tmp_path / "corpus.bin", site)
    argv = [
        "--preset", "tiny", "--steps", "3", "--data", "python-sources", "--corpus-path", str(corpus), "--packing", "documents", "--seq-len", "2048",
        "--ulysses-chunks", "auto",
    ]
    ((losses_one, grads_one, _),) = values(run_ranks(train_recording_splits, 1, fresh_dir(tmp_path, "one"), argv + ["--cp", "1"]))
    losses_auto, grads_auto, shapes = values(run_ranks(train_recording_splits, 4, fresh_dir(tmp_path, "auto"), argv + ["--cp", "4"]))[0]
    assert all(shape in {(4,), (2, 2), (1, 4)} for shape in shapes) and len(shapes) == 3, shapes
    # a batch whose longest document would take every step of the plain ring: a 2-D split is predicted faster
    assert shapes != [(4,)] * 3, shapes
    torch.testing.assert_close(torch.tensor(losses_auto), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    for name in grads_one:
        torch.testing.assert_close(torch.from_numpy(grads_auto[name]), torch.from_numpy(grads_one[name]), rtol=1e-4, atol=1e-6)


def _rng_after_resume(rank, world_size, root):
    """Draws after a save, against the same draws after a load of that save."""
    import random

    import checkpoint
    from config import PRESETS

    torch.manual_seed(1)
    random.seed(2)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save(root, 1, model, optimizer, scheduler, {"step": 1}, PRESETS["tiny"])
    straight = (torch.rand(4).tolist(), random.random())
    torch.rand(100), random.random()  # the interrupted run drew more before it stopped
    checkpoint.load(root, 1, model, optimizer, scheduler)
    resumed = (torch.rand(4).tolist(), random.random())
    return straight, resumed


def test_the_rng_state_round_trips_through_a_checkpoint(tmp_path):
    straight, resumed = values(run_ranks(_rng_after_resume, 1, fresh_dir(tmp_path, "rng"), str(tmp_path / "checkpoints")))[0]
    assert straight == resumed
