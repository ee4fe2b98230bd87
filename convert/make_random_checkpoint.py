"""Build a random SmolLM3-3B checkpoint in the exact Hugging Face layout, for benchmarks.

The real weights cannot be downloaded here, but loading and decoding speed depend only on the
layout: the real config.json, key names, shapes, bf16 dtype, the two-shard split and the index.
Everything is taken from the reference folder (config.json, model.safetensors.index.json and the
tokenizer files of HuggingFaceTB/SmolLM3-3B); only the numbers are random.

Each shard is streamed: its safetensors header is written first (every shape and offset is known
from the config), then each tensor is generated chunk by chunk and appended, so peak memory stays
near 100 MB for a 6 GB checkpoint. Every chunk has its own seed, derived from (seed, tensor name,
chunk index), so the output does not depend on the number of threads, and layer i is the same
in a 2-layer build as in the full one.

    python convert/make_random_checkpoint.py OUT [--seed N] [--layers N] [--force] [--if-missing]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the package beside it
    sys.path.insert(0, str(REPO_ROOT))

from smollm3_mlx.convert import plan_shards, safetensors_header  # noqa: E402

DEFAULT_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "smollm3-reference"
REAL_TOTAL_SIZE = 6150197248  # bytes of tensor data in the real checkpoint (index metadata)
MAX_SHARD_SIZE = 5 * 10**9  # save_pretrained's default "5GB"; it gives the real two-shard split
COPIED_FILES = (
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.json",
)
INDEX_FILE = "model.safetensors.index.json"
MARKER_FILE = "random_checkpoint.json"  # says the weights are random; --if-missing reads it
FORMAT_VERSION = 1  # bump when the generated numbers change, so that caches are rebuilt
INIT_STD = 0.02  # the config's initializer_range, as transformers initializes Linear/Embedding
NORM_STD = 0.02  # norms are 1 + N(0, NORM_STD): near a real init, but not a constant
CHUNK = 1 << 22  # elements generated per task: 16 MB of float32

Tensor = tuple[str, tuple[int, ...]]


def reference_dir() -> Path:
    """The folder holding SmolLM3-3B/ reference files: $SMOLLM3_REFERENCE_DIR or the default."""
    return Path(os.environ.get("SMOLLM3_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))


def _model_dir(ref: Path | None) -> Path:
    model_dir = (ref if ref is not None else reference_dir()) / "SmolLM3-3B"
    hint = "set SMOLLM3_REFERENCE_DIR to the folder holding SmolLM3-3B/"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"SmolLM3 reference folder not found: {model_dir}; {hint}")
    needed = ("config.json", INDEX_FILE, *COPIED_FILES)
    missing = [f for f in needed if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}; {hint}")
    return model_dir


def _state_dict_tensors(cfg: dict) -> list[Tensor]:
    """Names and shapes in `SmolLM3ForCausalLM.state_dict()` order, the order shards are filled."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_dim = cfg["num_attention_heads"] * head_dim
    kv_dim = cfg["num_key_value_heads"] * head_dim
    tensors: list[Tensor] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", (q_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    tensors.append(("model.norm.weight", (hidden,)))
    if not cfg.get("tie_word_embeddings", True):  # SmolLM3Config ties by default
        tensors.append(("lm_head.weight", (vocab, hidden)))
    return tensors


def _nbytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)  # bf16


def _layout(cfg: dict) -> dict[str, tuple[list[Tensor], bytes]]:
    """Shard file name -> (its tensors, its header), for the model `cfg` describes.

    Split in state-dict order as save_pretrained does; each header as safetensors.torch.save_file
    writes it, byte for byte (one dtype, so the data is ordered by name).
    """
    tensors = _state_dict_tensors(cfg)
    layout = {}
    for name, indices in plan_shards([_nbytes(s) for _, s in tensors], MAX_SHARD_SIZE):
        shard = [tensors[i] for i in indices]
        entries = [(t, "BF16", shape, _nbytes(shape)) for t, shape in sorted(shard)]
        layout[name] = (shard, safetensors_header(entries, "pt")[0])
    return layout


def _index(layout: dict[str, tuple[list[Tensor], bytes]]) -> dict:
    tensors = [(name, t) for name, (shard, _) in layout.items() for t in shard]
    return {
        "metadata": {
            "total_parameters": sum(math.prod(shape) for _, (_, shape) in tensors),
            "total_size": sum(_nbytes(shape) for _, (_, shape) in tensors),
        },
        "weight_map": {tname: fname for fname, (tname, _) in sorted(tensors, key=lambda t: t[1])},
    }


def _file_size(shard: list[Tensor], header: bytes) -> int:
    return len(header) + sum(_nbytes(shape) for _, shape in shard)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even; x must be finite."""
    u = x.view(np.uint32)
    r = np.right_shift(u, 16)
    r &= 1
    r += 0x7FFF
    r += u
    out = np.empty(x.shape, "<u2")
    np.right_shift(r, 16, out=out, casting="unsafe")
    return out


def _make_chunk(seed: int, name: str, index: int, count: int) -> np.ndarray:
    ss = np.random.SeedSequence([seed, _name_key(name), index])
    x = np.random.Generator(np.random.SFC64(ss)).standard_normal(count, dtype=np.float32)
    if name.endswith("norm.weight"):
        x *= np.float32(NORM_STD)
        x += np.float32(1.0)
    else:
        x *= np.float32(INIT_STD)
    return _to_bf16(x)


def _write_shard(
    path: Path,
    shard: list[Tensor],
    header: bytes,
    *,
    seed: int,
    pool: ThreadPoolExecutor,
    workers: int,
    log: Callable[[str], None],
) -> None:
    total = _file_size(shard, header)
    jobs = (
        (name, start // CHUNK, min(CHUNK, math.prod(shape) - start))
        for name, shape in sorted(shard)
        for start in range(0, math.prod(shape), CHUNK)
    )
    next_report = 1 << 30
    with open(path, "wb") as f:
        f.write(header)
        # In-order writes with a bounded queue: memory stays at a few chunks per worker.
        pending: deque = deque()

        def write_oldest() -> None:
            nonlocal next_report
            f.write(pending.popleft().result().data)
            if f.tell() >= next_report:
                log(f"  {path.name}: {f.tell() / 1e9:.2f} / {total / 1e9:.2f} GB")
                next_report += 1 << 30

        for job in jobs:
            pending.append(pool.submit(_make_chunk, seed, *job))
            if len(pending) > 2 * workers:
                write_oldest()
        while pending:
            write_oldest()
        assert f.tell() == total, f"{path.name}: wrote {f.tell()} bytes, expected {total}"
    log(f"  {path.name}: {total / 1e9:.2f} GB, {len(shard)} tensors")


def _config(model_dir: Path, num_hidden_layers: int | None) -> tuple[dict, str]:
    """The config (as a dict and as config.json text) for the requested number of layers."""
    text = (model_dir / "config.json").read_text()
    cfg = json.loads(text)
    real = cfg["num_hidden_layers"]
    if num_hidden_layers is None or num_hidden_layers == real:
        return cfg, text  # byte-identical to the real config.json
    if not 1 <= num_hidden_layers <= real:
        raise ValueError(f"num_hidden_layers must be in 1..{real}, got {num_hidden_layers}")
    cfg["num_hidden_layers"] = num_hidden_layers
    for key in ("no_rope_layers", "layer_types"):
        cfg[key] = cfg[key][:num_hidden_layers]
    return cfg, json.dumps(cfg, indent=2, sort_keys=True) + "\n"  # as save_pretrained writes it


def _marker(seed: int, num_hidden_layers: int | None) -> dict:
    return {
        "note": "RANDOM weights in the SmolLM3-3B layout, for benchmarks; not a trained model",
        "generator": "convert/make_random_checkpoint.py",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_hidden_layers": num_hidden_layers,
    }


def is_complete(out: Path, *, seed: int = 0, num_hidden_layers: int | None = None) -> bool:
    """Whether `out` holds a complete random checkpoint built with these arguments.

    Reads only `out` (its marker, config.json and file sizes), so it works without the reference.
    """
    out = Path(out)
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(cfg, dict):
        return False
    layers = cfg.get("num_hidden_layers")
    full = marker.get("num_hidden_layers") is None  # None in the marker: all the real layers
    if (num_hidden_layers is None and not full) or num_hidden_layers not in (None, layers):
        return False
    if marker != _marker(seed, None if full else layers):
        return False
    try:
        layout = _layout(cfg)
    except (KeyError, TypeError):  # a config.json this script did not write
        return False
    if any(not (out / f).is_file() for f in (INDEX_FILE, *COPIED_FILES)):
        return False
    return all(
        (out / fname).is_file() and (out / fname).stat().st_size == _file_size(shard, header)
        for fname, (shard, header) in layout.items()
    )


def make_random_checkpoint(
    out: Path,
    *,
    seed: int = 0,
    num_hidden_layers: int | None = None,
    force: bool = False,
    if_missing: bool = False,
    reference: Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write a random bf16 SmolLM3-3B checkpoint in the real Hugging Face layout to `out`.

    Args:
        out: the folder to create. It is built in a temporary folder beside it and renamed at the
            end, so `out` is either absent or complete.
        seed: seeds every tensor; the same seed gives the same bytes.
        num_hidden_layers: keep only the first N layers (real per-layer shapes) for quick tests;
            config.json and the index are adjusted and the shards split as save_pretrained would
            (one shard up to 28 layers). None keeps all 36 layers and the exact real split.
        force: replace an existing `out`; without it an existing `out` is an error.
        if_missing: return at once if `out` already holds a complete checkpoint built with the
            same seed and number of layers (benchmarks cache it).
        reference: the folder holding SmolLM3-3B/; default $SMOLLM3_REFERENCE_DIR or
            <repo root>/../shared/smollm3-reference.
        workers: threads generating numbers (numpy releases the GIL); default the CPU count.
        log: called with progress lines; None for silence.

    Returns:
        `out`.
    """
    out = Path(out)
    log = log or (lambda _: None)
    if if_missing and is_complete(out, seed=seed, num_hidden_layers=num_hidden_layers):
        log(f"{out} already holds a complete random checkpoint (seed {seed}); nothing to do")
        return out
    if out.exists() and not force:
        what = "is not a complete checkpoint with these arguments" if if_missing else "exists"
        raise FileExistsError(f"{out} {what}; pass --force to replace it")

    model_dir = _model_dir(reference)
    cfg, config_text = _config(model_dir, num_hidden_layers)
    layout = _layout(cfg)
    index = _index(layout)
    real_index = json.loads((model_dir / INDEX_FILE).read_text())
    real_map = real_index["weight_map"]
    assert set(index["weight_map"]) <= set(real_map), "key names differ from the real index"
    full = len(real_map) == len(index["weight_map"])
    if full:
        assert index["weight_map"] == real_map, "weight_map differs from the real index"
        assert index["metadata"]["total_size"] == real_index["metadata"]["total_size"]
        assert index["metadata"]["total_size"] == REAL_TOTAL_SIZE

    workers = workers or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        log(f"building {cfg['num_hidden_layers']}-layer random checkpoint in {tmp}")
        with ThreadPoolExecutor(workers) as pool:
            for fname, (shard, header) in layout.items():
                _write_shard(
                    tmp / fname, shard, header, seed=seed, pool=pool, workers=workers, log=log
                )
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(config_text)
        for name in COPIED_FILES:
            shutil.copyfile(model_dir / name, tmp / name)
        marker = _marker(seed, None if full else cfg["num_hidden_layers"])
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

        if out.exists():  # --force: move the old folder aside, so out is never half-written
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build a RANDOM SmolLM3-3B checkpoint in the real Hugging Face layout."
    )
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing if OUT is already complete"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        out = make_random_checkpoint(
            args.out,
            seed=args.seed,
            num_hidden_layers=args.layers,
            force=args.force,
            if_missing=args.if_missing,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    print(
        f"{out}: {_dir_size(out) / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s "
        f"(peak RSS {peak_mb:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
