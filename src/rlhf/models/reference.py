"""The reference model of the offline preference trainers, and the cache of its log-probs.

`Reference` gives reference log-probs of a batch: from a precomputed table per split, or from a frozen model
scored on the fly (with LoRA and no separate reference: the policy with its adapters switched off).

The cache: the frozen reference scores each example once for the whole data set (`precompute_ref`), saved as
`run_dir/ref_logps/<key>.safetensors`. The key hashes everything the numbers depend on - the reference weights
(the bytes of its checkpoint files), its dtype and the autocast precision, the data files' bytes, the
DataConfig fields, the tokenizer files, the split seed, and the token ids themselves - so a cache from other
data, another tokenizer or another reference is never read: a new key simply misses and is recomputed. With a
cache hit the reference model is not even loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf.data.collate import Collate, to_device
from rlhf.data.tokenize import longest_first
from rlhf.models.sequence_logps import response_logps
from rlhf.progress import progress

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever the cache layout or the meaning of its numbers changes (old files then simply miss)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# ---------------------------------------------------------------------------------------------- cache key


def _update_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)


def hash_paths(paths: Sequence[str | Path | None], *, skip_weights: bool = False, only_model: bool = False) -> str:
    """sha256 over the bytes of files (a directory: every file under it, by relative path, in sorted order).

    `only_model`: in a directory keep weight files and config.json (what defines a model's outputs);
    `skip_weights`: leave weight files out (what defines a tokenizer). A missing path hashes as its name.
    """
    h = hashlib.sha256()
    for path in paths:
        if path is None or path == "":
            h.update(b"<none>")
            continue
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            is_weight = f.suffix in WEIGHT_SUFFIXES
            dropped = (skip_weights and is_weight) or (only_model and not (is_weight or f.name == "config.json"))
            if p.is_dir() and dropped:
                continue
            h.update(str(f.relative_to(p) if p.is_dir() else p.name).encode() + b"\0")
            if f.exists():
                _update_file(h, f)
    return h.hexdigest()


def hash_examples(examples: Iterable[dict[str, Any]], keys: Sequence[str]) -> str:
    """sha256 over the token-id lists `keys` of each example, in order: what the model actually sees."""
    h = hashlib.sha256()
    for ex in examples:
        for k in keys:
            h.update(json.dumps(ex[k]).encode() + b"|")
        h.update(b"\n")
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A short hex key from a JSON-able description of everything the cached numbers depend on."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- cache


def cache_path(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "ref_logps" / f"{key}.safetensors"


def save_cache(path: Path, tables: dict[str, Tensor]) -> None:
    """Write the tables (safetensors) atomically: to a temporary sibling, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tables.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_cache(path: Path) -> dict[str, Tensor] | None:
    """The cached tables, or None when there is no (readable) cache file under this key."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # a torn or foreign file: recompute rather than fail
        logger.warning("ignoring unreadable reference cache %s (%s)", path, exc)
        return None


@torch.no_grad()
def score_examples(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Collate,
    *,
    batch_size: int,
    device: torch.device,
    rows_per_example: int,
    autocast: Callable[[], Any],
    show_progress: bool = False,
) -> Tensor:
    """Summed response log-probs of every example, (N, rows_per_example) float32, e.g. [chosen, rejected].

    Examples are scored in batches of like length, longest first (`longest_first`); the result is in the original
    order.
    `collate` returns rows laid out as rows_per_example blocks of the batch ([chosen; rejected] for pairs).
    """
    out = torch.zeros(len(examples), rows_per_example)
    order = longest_first(examples)
    for s in progress(range(0, len(order), batch_size), "reference log-probs", show=show_progress):
        idx = order[s : s + batch_size]
        batch = to_device(collate([examples[i] for i in idx]), device)
        with autocast():
            logps = response_logps(model, batch).sum  # (rows_per_example * b,)
        out[idx] = logps.float().cpu().view(rows_per_example, len(idx)).T
    return out


# ---------------------------------------------------------------------------------------------- the reference


class Reference:
    """Where reference log-probs come from: a precomputed table per split, or a frozen model scored on the fly.

    `model` scores batches under no_grad (and `autocast`, the policy's mixed precision). `adapter_host`, when
    given, is a peft model whose adapters are switched off while scoring: with LoRA and no separate reference,
    the reference is the base model under the adapters, so no second copy of the weights is kept.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        tables: dict[str, Tensor] | None = None,
        adapter_host: nn.Module | None = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        self.model, self.tables, self.adapter_host, self.autocast = model, tables, adapter_host, autocast

    def lookup(self, split: str, idx: Sequence[int], device: torch.device) -> Tensor | None:
        """The cached rows of `split` for dataset indices `idx` (len(idx), k), or None without a cache."""
        if self.tables is None or split not in self.tables:
            return None
        return self.tables[split][list(idx)].to(device)

    @torch.no_grad()
    def score(self, batch: dict[str, Any], rows_per_example: int) -> Tensor:
        """Summed response log-probs of a collated batch by the reference model, (B, rows_per_example)."""
        if self.model is None:
            raise RuntimeError("no reference model loaded (the log-probs were expected in the cache)")
        host = self.adapter_host
        off = host.disable_adapter() if host is not None else contextlib.nullcontext()  # type: ignore[operator]
        with off, self.autocast():
            logps = response_logps(self.model, batch).sum  # (rows_per_example * B,)
        return logps.float().view(rows_per_example, -1).T

    def logps(self, batch: dict[str, Any], split: str, idx: Sequence[int], rows_per_example: int) -> Tensor:
        """From the cache when there is one, else scored now: (len(idx), rows_per_example)."""
        device = next(v.device for v in batch.values() if isinstance(v, Tensor))
        cached = self.lookup(split, idx, device)
        return cached if cached is not None else self.score(batch, rows_per_example)


@dataclass
class ExampleLayout:
    """How a trainer's examples are scored: the data kind, its token-id fields, its collate, rows per example."""

    kind: str  # "preference" or "unpaired"
    id_keys: tuple[str, ...]  # token-id fields hashed into the cache key
    collate: Collate
    rows_per_example: int  # 2 for [chosen; rejected], 1 for a completion


def reference_cache_key(cfg: Any, splits: dict[str, Sequence[dict[str, Any]]], layout: ExampleLayout) -> str:
    """The cache key of a run's reference log-probs (see the module docstring for what it covers).

    `cfg` is a preference trainer's Config: it has `model`, `ref` (None: the initial policy is the
    reference), `data`, `seed` and `train.mixed_precision`.
    """
    ref_cfg = cfg.ref if cfg.ref is not None else cfg.model
    data = cfg.data
    return cache_key(
        {
            "kind": layout.kind,
            "reference_files": hash_paths([ref_cfg.path], only_model=True),
            "reference_dtype": ref_cfg.dtype,
            "mixed_precision": cfg.train.mixed_precision,
            "data_files": hash_paths([data.train, data.eval]),
            "data_config": {k: getattr(data, k) for k in sorted(vars(data))},
            "tokenizer_files": hash_paths([cfg.model.tokenizer_path], skip_weights=True),
            "split_seed": cfg.seed if data.eval is None and data.eval_fraction > 0 else None,
            "examples": {name: hash_examples(exs, layout.id_keys) for name, exs in sorted(splits.items())},
        }
    )


def cached_reference_tables(
    engine: Any,
    splits: dict[str, Sequence[dict[str, Any]]],
    layout: ExampleLayout,
    key: str,
    make_reference: Callable[[], Reference],
    *,
    batch_size: int,
) -> dict[str, Tensor]:
    """Reference log-probs of every example of every split, {split: (N, rows_per_example)}, from the cache.

    On a miss every process builds the reference (`make_reference`, only then) and scores its share of every split
    in no-grad batches of `batch_size`: the examples longest first, dealt out in turn, so that the shares cost
    alike and N processes take ~1/N of the time (a waiting process could also outlast the collective timeout of
    its backend). The main process gathers the shares into `run_dir/ref_logps/<key>.safetensors`; then every
    process reads that file, so all of them use the same numbers.
    """
    path = cache_path(engine.run_dir, key)
    found = [engine.is_main and load_cache(path) is not None]  # the main process decides for all
    if engine.world_size > 1:
        broadcast_object_list(found)
    if found[0]:
        if engine.is_main:
            logger.info("reference log-probs from the cache %s", path)
    else:
        if engine.is_main:
            counts = ", ".join(f"{len(v)} {k}" for k, v in splits.items())
            logger.info("computing reference log-probs for %s on %d process(es)", counts, engine.world_size)
        ref = make_reference()
        host = ref.adapter_host
        shares: dict[str, tuple[list[int], Tensor]] = {}
        for name, examples in splits.items():
            mine = longest_first(examples)[engine.rank :: engine.world_size]
            off = host.disable_adapter() if host is not None else contextlib.nullcontext()  # type: ignore[operator]
            with off:
                scores = score_examples(
                    ref.model,  # type: ignore[arg-type]
                    [examples[i] for i in mine],
                    layout.collate,
                    batch_size=batch_size,
                    device=engine.device,
                    rows_per_example=layout.rows_per_example,
                    autocast=ref.autocast,
                    show_progress=engine.shows_progress,
                )
            shares[name] = mine, scores
        gathered = engine.gather(shares)
        if engine.is_main:
            full = {name: torch.zeros(len(examples), layout.rows_per_example) for name, examples in splits.items()}
            for share in gathered:
                for name, (idx, scores) in share.items():
                    full[name][idx] = scores
            save_cache(path, full)
    engine.accelerator.wait_for_everyone()
    tables = load_cache(path)
    if tables is None:
        raise RuntimeError(f"the reference cache {path} was not written")
    return tables
