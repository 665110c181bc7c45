"""Training tokens: one long byte-level sequence per step, the same on every rank.

Byte-level: a token is a byte value (vocab 256). No tokenizer has to be downloaded or trained,
the encoding is exact and lossless, and any machine produces the same tokens from the same bytes.

Sources:
- "python-sources": real text that exists offline on every machine, the Python sources of the
  installed packages. `build_corpus` concatenates every `*.py` file under the site-packages
  directory that holds torch, in sorted path order, so machines with the same installs build the
  same corpus. Its size depends on what is installed: on this project's CPU machine (torch
  2.13 CPU wheel and the test tools) it is 15.6k files, 214 MB, of which torch's own sources
  are 46 MB; at 1M tokens per step that is about 200 steps before the stream wraps around.
- "synthetic": uniformly random bytes, reproducible from (seed, step); no file. For throughput
  runs only: there is nothing to learn (the loss stays at ln 256 = 5.55).

Step i reads the corpus window that starts at (offset(seed) + i * seq_len) mod corpus size, so
consecutive steps walk through the corpus contiguously and the data position of a resumed run is
just its step number. `state_dict` / `check_state` make sure a resumed run reads the same data.

Packing "documents": each source file is a document (its "\n" separator ends it), and a window
packs the files it holds (cut at the window's edges). `documents(step)` gives the window's global
cu_seqlens, and no token is trained to predict the first token of the next document. The file
boundaries are kept next to the corpus (`<corpus>.starts.npy`, written with it).
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from loss import IGNORE_INDEX

VOCAB_SIZE = 256
SOURCES = ("python-sources", "synthetic")
PACKINGS = ("none", "documents")

# Bytes hashed at each end of the corpus: cheap, and other installs change the size or an end.
_FINGERPRINT_SPAN = 1 << 20


def starts_path(corpus: Path) -> Path:
    """Where the first byte of every file of a corpus is recorded."""
    return Path(corpus).with_name(Path(corpus).name + ".starts.npy")


def build_corpus(path: Path, root: Path | None = None) -> Path:
    """Write the concatenated `*.py` files under `root` to `path` unless it exists; return `path`.

    `root` defaults to the site-packages directory that holds torch. Files are taken in sorted
    relative-path order and separated by b"\\n". The file is written under a temporary name and
    renamed into place, so a reader never sees it half-written, and processes that build it at
    the same time each rename an identical file. Each file's first byte goes to
    `starts_path(path)` (before the corpus itself, so a corpus never lacks it).
    """
    path = Path(path)
    if path.exists():
        return path
    root = Path(torch.__file__).parent.parent if root is None else Path(root)
    sources = _python_files(root)
    if not sources:
        raise ValueError(f"build_corpus: no *.py files under {root}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = [(root / relative).stat().st_size for relative in sources]
    starts = np.cumsum([0, *(size + 1 for size in sizes[:-1])], dtype=np.int64)
    _write_atomically(starts_path(path), lambda out: np.save(out, starts))
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.fchmod(descriptor, 0o644)  # mkstemp makes it private; a shared cache should be readable
    try:
        with os.fdopen(descriptor, "wb") as out:
            for number, relative in enumerate(sources):
                if number:
                    out.write(b"\n")
                out.write((root / relative).read_bytes())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def _write_atomically(path: Path, write) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def corpus_file_lengths(root: Path | None = None) -> list[int]:
    """The tokens of each file of the corpus `build_corpus` would write (its separator included),
    in corpus order, without writing it."""
    root = Path(torch.__file__).parent.parent if root is None else Path(root)
    return [(root / relative).stat().st_size + 1 for relative in _python_files(root)]


def _python_files(root: Path) -> list[str]:
    """Relative POSIX paths of the `*.py` files under `root`, sorted; symlinked directories are
    not followed, so a link cannot pull in a tree twice or loop. Editable installs' finder
    modules (`__editable__*.py`) hold the checkout's absolute path, which differs by machine."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            full = Path(directory, name)
            if name.endswith(".py") and not name.startswith("__editable__") and full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def corpus_fingerprint(path: Path) -> str:
    """sha256 of the corpus size and its first and last MiB."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as corpus:
        digest.update(corpus.read(_FINGERPRINT_SPAN))
        corpus.seek(max(size - _FINGERPRINT_SPAN, 0))
        digest.update(corpus.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()


def _derive(*parts: object) -> int:
    """A 64-bit integer that depends on every part; the same on every machine (unlike hash())."""
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class TokenStream:
    """(input_ids, labels) for each training step: the full sequence, which the trainer shards.

    Every rank calling `batch(step)` with the same step gets the same tokens.
    """

    def __init__(self, source: str, seq_len: int, seed: int, corpus_path: Path | None = None, packing: str = "none") -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if packing not in PACKINGS or (packing == "documents" and source != "python-sources"):
            raise ValueError(f"packing: expected one of {PACKINGS} ('documents' needs the python-sources corpus), got {packing!r}")
        self.source, self.seq_len, self.seed, self.packing = source, seq_len, seed, packing
        self._starts = None
        self._corpus = None
        self._corpus_size = None
        self._fingerprint = None
        if source == "python-sources":
            if corpus_path is None:
                raise ValueError("source 'python-sources' needs corpus_path (made by build_corpus)")
            # Memory-mapped bytes: a step reads only its window, and ranks on one node share the pages.
            self._corpus = np.memmap(corpus_path, dtype=np.uint8, mode="r")
            self._corpus_size = len(self._corpus)
            self._fingerprint = corpus_fingerprint(corpus_path)
            self._start = _derive(seed, "start") % self._corpus_size
            if packing == "documents":
                if not starts_path(corpus_path).exists():
                    raise ValueError(f"packing: {starts_path(corpus_path)} is missing: rebuild the corpus (delete {corpus_path})")
                self._starts = np.load(starts_path(corpus_path))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and labels, int64 of shape (seq_len,); labels[t] is the token after input_ids[t]."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        length = self.seq_len + 1
        if self._corpus is None:
            generator = torch.Generator().manual_seed(_derive(self.seed, step))
            tokens = torch.randint(0, VOCAB_SIZE, (length,), generator=generator, dtype=torch.int64)
        else:
            start = (self._start + step * self.seq_len) % self._corpus_size
            if start + length <= self._corpus_size:
                window = self._corpus[start : start + length]
            else:
                window = self._corpus[np.arange(start, start + length) % self._corpus_size]
            tokens = torch.from_numpy(np.array(window, dtype=np.int64))
        # labels get their own storage, so the trainer may mask them in place without touching inputs
        labels = tokens[1:].clone()
        if self._starts is not None:  # a document's last token does not predict the next document
            labels[self._file_starts(step, end=self.seq_len + 1) - 1] = IGNORE_INDEX
        return tokens[:-1], labels

    def _file_starts(self, step: int, end: int) -> np.ndarray:
        """Offsets in (0, end) from step's window start at which a file starts, sorted."""
        start = (self._start + step * self.seq_len) % self._corpus_size
        offsets = (self._starts - start) % self._corpus_size
        return np.sort(offsets[(offsets > 0) & (offsets < end)])

    def documents(self, step: int) -> torch.Tensor | None:
        """int32 cu_seqlens of the documents packed into step's window (None without packing)."""
        if self._starts is None:
            return None
        return torch.tensor([0, *self._file_starts(step, end=self.seq_len).tolist(), self.seq_len], dtype=torch.int32)

    def state_dict(self) -> dict:
        """What a checkpoint records about the data; the position is the step number itself."""
        return {
            "source": self.source,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "corpus_size": self._corpus_size,
            "corpus_fingerprint": self._fingerprint,
            "packing": self.packing,
        }

    def check_state(self, state: dict) -> None:
        """Raise ValueError naming every field where a checkpoint's data state differs from this stream."""
        differences = [
            f"{key}: checkpoint {state.get(key, '<missing>')!r}, this run {value!r}"
            for key, value in self.state_dict().items()
            if state.get(key, "<missing>") != value
        ]
        if differences:
            raise ValueError(
                "the checkpoint was trained on another data stream; resuming would not continue its data: "
                + "; ".join(differences)
            )
