"""launch/data.py, metrics.py and plot_metrics.py: deterministic shifted batches that walk and wrap
the corpus, resume checks, the FLOPs formula, the resumable metrics log, the progress line."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import plot_metrics  # noqa: E402
from data import TokenStream, build_corpus, corpus_fingerprint  # noqa: E402
from metrics import MetricsLog, Progress, mfu, model_flops_per_token, peak_bf16_flops  # noqa: E402


def fake_site_packages(root: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return root


def small_corpus(tmp_path: Path, size: int = 50) -> Path:
    """A corpus of distinct bytes, so every window identifies where it was read."""
    root = fake_site_packages(tmp_path / "site", {"only.py": bytes(range(size))})
    return build_corpus(tmp_path / "corpus.bin", root)


def test_corpus_is_the_py_files_in_sorted_path_order_joined_by_newlines(tmp_path):
    root = fake_site_packages(tmp_path / "site", {
        "zeta.py": b"z = 1", "alpha/beta.py": b"b = 2", "alpha/notes.txt": b"not python", "alpha.py": b"a = 3",
        "__editable___pkg_finder.py": b"MAPPING = {'pkg': '/home/someone/pkg'}",
    })
    path = build_corpus(tmp_path / "cache" / "corpus.bin", root)
    assert path.read_bytes() == b"a = 3\nb = 2\nz = 1"  # alpha.py < alpha/beta.py < zeta.py
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.bin", "corpus.bin.starts.npy"]  # no temporary file left
    assert np.load(path.parent / "corpus.bin.starts.npy").tolist() == [0, 6, 12]  # each file's first byte


def test_an_existing_corpus_is_not_rebuilt(tmp_path):
    root = fake_site_packages(tmp_path / "site", {"a.py": b"first"})
    path = build_corpus(tmp_path / "corpus.bin", root)
    (root / "a.py").write_bytes(b"second")
    assert build_corpus(path, root).read_bytes() == b"first"


def test_a_root_without_python_files_is_refused(tmp_path):
    root = fake_site_packages(tmp_path / "site", {"readme.txt": b"text"})
    with pytest.raises(ValueError, match="no \\*.py files"):
        build_corpus(tmp_path / "corpus.bin", root)
    assert not (tmp_path / "corpus.bin").exists()


def test_corpus_batches_are_deterministic_shifted_and_walk_the_corpus(tmp_path):
    corpus = small_corpus(tmp_path, size=200)
    stream = TokenStream("python-sources", seq_len=16, seed=3, corpus_path=corpus)
    again = TokenStream("python-sources", seq_len=16, seed=3, corpus_path=corpus)
    previous_labels = None
    for step in range(5):
        input_ids, labels = stream.batch(step)
        assert input_ids.dtype == labels.dtype == torch.int64
        assert input_ids.shape == labels.shape == (16,)
        assert torch.equal(labels[:-1], input_ids[1:])
        assert torch.equal(labels[-1], (input_ids[-1] + 1) % 200)  # the corpus is 0, 1, ..., 199
        if previous_labels is not None:  # step i + 1 starts where step i's inputs ended
            assert input_ids[0] == previous_labels[-1]
        previous_labels = labels
        for mine, theirs in zip(stream.batch(step), again.batch(step)):
            assert torch.equal(mine, theirs)


def test_labels_are_not_a_view_of_the_inputs(tmp_path):
    input_ids, labels = TokenStream("python-sources", 8, 0, small_corpus(tmp_path)).batch(0)
    before = input_ids.clone()
    labels.fill_(-100)
    assert torch.equal(input_ids, before)


@pytest.mark.parametrize("seq_len", [7, 16, 120])  # 120: longer than the 50-byte corpus, wraps within a step
def test_the_stream_wraps_around_the_corpus(tmp_path, seq_len):
    size = 50
    stream = TokenStream("python-sources", seq_len, seed=1, corpus_path=small_corpus(tmp_path, size))
    steps = 3 * size // seq_len + 2
    tokens = torch.cat([stream.batch(step)[0] for step in range(steps)]).numpy()
    start = int(tokens[0])  # byte b sits at position b
    assert np.array_equal(tokens, (start + np.arange(len(tokens))) % size)
    last_input, last_label = stream.batch(steps - 1)
    assert last_label[-1] == (last_input[-1] + 1) % size


def test_the_seed_moves_the_start_of_the_corpus_walk(tmp_path):
    corpus = small_corpus(tmp_path, size=250)
    starts = {int(TokenStream("python-sources", 8, seed, corpus).batch(0)[0][0]) for seed in range(4)}
    assert len(starts) > 1


def test_synthetic_batches_are_reproducible_per_seed_and_step():
    stream = TokenStream("synthetic", seq_len=64, seed=5)
    input_ids, labels = stream.batch(2)
    assert input_ids.dtype == torch.int64 and input_ids.shape == labels.shape == (64,)
    assert torch.equal(labels[:-1], input_ids[1:])
    assert 0 <= int(input_ids.min()) and int(input_ids.max()) < 256
    assert torch.equal(TokenStream("synthetic", 64, 5).batch(2)[0], input_ids)
    assert not torch.equal(stream.batch(3)[0], input_ids)
    assert not torch.equal(TokenStream("synthetic", 64, 6).batch(2)[0], input_ids)


def test_bad_stream_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        TokenStream("wikipedia", 8, 0)
    with pytest.raises(ValueError, match="needs corpus_path"):
        TokenStream("python-sources", 8, 0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        TokenStream("synthetic", 0, 0)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        TokenStream("synthetic", 8, 0).batch(-1)


def test_check_state_accepts_the_same_stream_and_names_what_differs(tmp_path):
    corpus = small_corpus(tmp_path)
    state = TokenStream("python-sources", 16, 0, corpus).state_dict()
    TokenStream("python-sources", 16, 0, corpus).check_state(state)
    with pytest.raises(ValueError, match="seq_len: checkpoint 16, this run 32"):
        TokenStream("python-sources", 32, 0, corpus).check_state(state)
    with pytest.raises(ValueError, match="seed: checkpoint 0, this run 1"):
        TokenStream("python-sources", 16, 1, corpus).check_state(state)
    with pytest.raises(ValueError, match="source: checkpoint 'python-sources', this run 'synthetic'"):
        TokenStream("synthetic", 16, 0).check_state(state)
    with pytest.raises(ValueError, match="corpus_fingerprint") as raised:
        other = tmp_path / "other"
        root = fake_site_packages(other / "site", {"only.py": bytes(reversed(range(50)))})
        TokenStream("python-sources", 16, 0, build_corpus(other / "corpus.bin", root)).check_state(state)
    assert "corpus_size" not in str(raised.value)  # same size, other bytes: only the fingerprint differs
    with pytest.raises(ValueError, match="corpus_size: checkpoint 50, this run 51"):
        TokenStream("python-sources", 16, 0, small_corpus(tmp_path / "bigger", 51)).check_state(state)
    with pytest.raises(ValueError, match="seed: checkpoint '<missing>'"):
        TokenStream("python-sources", 16, 0, corpus).check_state({k: v for k, v in state.items() if k != "seed"})


def test_the_fingerprint_sees_both_ends_of_a_large_corpus(tmp_path):
    content = bytearray(3 << 20)
    fingerprints = set()
    for changed in (None, 0, len(content) - 1):
        if changed is not None:
            content[changed] ^= 1
        (tmp_path / "corpus.bin").write_bytes(content)
        fingerprints.add(corpus_fingerprint(tmp_path / "corpus.bin"))
    assert len(fingerprints) == 3


def test_state_dict_round_trips_through_json(tmp_path):
    stream = TokenStream("python-sources", 16, 0, small_corpus(tmp_path))
    stream.check_state(json.loads(json.dumps(stream.state_dict())))


def test_flops_per_token_on_a_hand_computed_example():
    # N = 1000: 6 * 1000 = 6000. Attention, 2 layers, 4 heads of 8, seq_len 16, forward per token
    # and layer: 4 * 16 * 4 * 8 = 2048; training 3x = 6144; 2 layers = 12288; causal half = 6144.
    assert model_flops_per_token(1000, n_layers=2, n_heads=4, head_dim=8, seq_len=16, causal=False) == 18288
    assert model_flops_per_token(1000, n_layers=2, n_heads=4, head_dim=8, seq_len=16) == 12144


def test_mfu_and_peaks():
    assert mfu(2000.0, 1e9, 4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be positive"):
        mfu(1.0, 1.0, 0.0)
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("NVIDIA B200") == 2.25e15
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GB200", "NVIDIA A100-SXM4-80GB", "cpu"):
        assert peak_bf16_flops(unknown) is None, unknown


def read_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_log_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 5.0 - step / 10})
        assert read_steps(path)[-1] == step  # flushed as written
    log.close()
    with open(path, "a") as crashed:
        crashed.write('{"step": 6, "lo')  # a crash in the middle of a line
    resumed = MetricsLog(path, resume_step=3)
    assert read_steps(path) == [1, 2, 3]
    resumed.write({"step": 4, "loss": 1.0})
    resumed.close()
    assert read_steps(path) == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "loss": 4.9}
    MetricsLog(path).close()  # a new run starts a new log
    assert path.read_text() == ""


def test_metrics_log_resume_keeps_a_last_line_cut_before_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3})
    log.close()
    assert read_steps(path) == [1, 2, 3]


def test_metrics_log_needs_a_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="needs an int 'step'"):
        log.write({"loss": 1.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


RECORD = {"step": 10, "loss": 2.34567, "tokens_per_s": 2.5e6, "tokens_per_s_per_gpu": 312500.0, "mfu": 0.4321,
          "peak_memory_gib": 61.26}


def test_progress_without_tqdm_prints_every_n_steps_and_the_last(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    progress = Progress(total=25, initial=0, print_every=10)
    for step in range(1, 26):
        progress.update(step, dict(RECORD, step=step, mfu=None if step == 25 else RECORD["mfu"]))
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 10/25  loss 2.3457  tok/s 2.50M  tok/s/gpu 312.50k  mfu 43.2%  mem 61.3GiB",
        "step 20/25  loss 2.3457  tok/s 2.50M  tok/s/gpu 312.50k  mfu 43.2%  mem 61.3GiB",
        "step 25/25  loss 2.3457  tok/s 2.50M  tok/s/gpu 312.50k  mem 61.3GiB",
    ]


def test_disabled_progress_shows_nothing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    progress = Progress(total=10, print_every=1, enabled=False)
    progress.update(1, RECORD)
    progress.close()
    assert capsys.readouterr().out == ""


class FakeTqdm:
    made = []

    def __init__(self, total, initial, **_):
        self.total, self.n, self.postfixes, self.closed = total, initial, [], False
        FakeTqdm.made.append(self)

    def set_postfix(self, postfix, refresh):
        self.postfixes.append(postfix)

    def update(self, count):
        self.n += count

    def close(self):
        self.closed = True


def test_progress_drives_tqdm_when_it_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    FakeTqdm.made.clear()
    progress = Progress(total=100, initial=40)  # resumed after 40 steps
    progress.update(41, RECORD)
    progress.update(45, RECORD)  # the caller may report every few steps
    progress.close()
    (bar,) = FakeTqdm.made
    assert (bar.total, bar.n, bar.closed) == (100, 45, True)
    assert bar.postfixes[-1] == {"loss": "2.3457", "tok/s": "2.50M", "tok/s/gpu": "312.50k", "mfu": "43.2%",
                                 "mem": "61.3GiB"}
    FakeTqdm.made.clear()
    Progress(total=100, enabled=False)
    assert FakeTqdm.made == []


def write_log(path: Path) -> Path:
    log = MetricsLog(path)
    for step in range(1, 4):
        log.write({"step": step, "loss": 5.0 / step, "tokens_per_s_per_gpu": 1000.0 * step})
    log.close()
    return path


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    plot_metrics.main([str(write_log(tmp_path / "metrics.jsonl")), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot_metrics.main([str(write_log(tmp_path / "metrics.jsonl")), "--out", str(tmp_path / "curves.png")])
    assert not (tmp_path / "curves.png").exists()


def test_packed_documents_are_the_corpus_files_cut_at_the_window(tmp_path):
    files = {f"f{n:02d}.py": bytes([n]) * length for n, length in enumerate([5, 30, 1, 12, 70, 3, 40])}
    corpus = build_corpus(tmp_path / "corpus.bin", fake_site_packages(tmp_path / "site", files))
    stream = TokenStream("python-sources", 64, seed=2, corpus_path=corpus, packing="documents")
    for step in range(6):
        input_ids, labels = stream.batch(step)
        cu = stream.documents(step)
        assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == 64 and (cu[1:] > cu[:-1]).all()
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            piece = input_ids[start:end]
            # inside a document: one file's bytes, then its b"\n" separator
            assert len(set(piece[piece != ord("\n")].tolist())) <= 1
            if end < 64:
                assert int(labels[end - 1]) == -100  # the last token does not predict the next file
                assert (labels[start : end - 1] == input_ids[start + 1 : end]).all()
    with pytest.raises(ValueError, match="packing: expected one of"):
        TokenStream("synthetic", 64, seed=2, packing="documents")


def test_document_flops_count_each_document_causally():
    from metrics import document_flops_per_token

    dense = model_flops_per_token(1000, 2, 4, 16, seq_len=100)
    assert document_flops_per_token(1000, 2, 4, 16, [100]) == pytest.approx(dense)
    # two documents of 50: half the attention FLOPs of one sequence of 100
    assert document_flops_per_token(1000, 2, 4, 16, [50, 50]) - 6000 == pytest.approx((dense - 6000) / 2)
