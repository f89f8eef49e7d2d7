"""Atomic, verifiable checkpoints: the files, the manifest and how a resume finds the newest good one.

Layout of one checkpoint (`run_dir/checkpoints/step-N/`):

| file                           | content                                                      | loaded with  |
|--------------------------------|--------------------------------------------------------------|--------------|
| `model.safetensors`            | the unwrapped model's weights (tied weights stored once)     | safetensors  |
| `optimizer.pt`, `scheduler.pt` | `state_dict()` of the optimizer and the LR schedule          | weights_only |
| `rng-rank{r}.pt`               | python, numpy, torch CPU and CUDA RNG states of process r    | weights_only |
| `state-{name}.json` or `.pt`   | a registered state (`-rank{r}` suffix when kept per process) | json or w.o. |
| `trainer_state.json`           | step, non-finite counters, world size, format version        | json         |
| `config.json`                  | the run's resolved config (a resume compares it with its own) | json         |
| `manifest.json`                | sha256 and size of every other file; written LAST            | json         |

(weights_only: `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only.)

Why this shape: a checkpoint is written into a temporary sibling (`.tmp-step-N-<pid>`), every file is
fsynced, the manifest goes in last, and only then is the directory renamed to `step-N`. A crash at any
point leaves either no `step-N` or a complete one; a `step-N` whose manifest is missing or does not match
the bytes (copied by hand, disk error) is not "complete" and resume skips it with a warning. Nothing is
ever unpickled: tensors go through safetensors or `torch.load(weights_only=True)`, the rest is JSON.

A checkpoint whose manifest matches but whose content cannot be loaded anyway (a file truncated and re-hashed, a
foreign pickle) raises `CheckpointError` naming the file, and `Engine.resume` falls back to the previous one. A
write that runs out of disk space removes its temporary directory, keeps every earlier checkpoint, and raises
`DiskFullError` (exit status 74) with the path and the bytes it needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from rlhf.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete or corrupted, or would hold non-finite weights."""


class DiskFullError(CheckpointError):
    """No space left on the device while writing a checkpoint or final/; earlier checkpoints are intact."""

    exit_code = 74  # EX_IOERR: not a problem with the data or the config, and not worth retrying as is


# ---------------------------------------------------------------- files and durability


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) on POSIX; skipped where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it (the caller renames the directory, so no per-file temp name is needed)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def remove_stale_temp_dirs(root: Path) -> None:
    """Delete `.tmp-*` leftovers of interrupted writes (one process writes one checkpoint at a time, so any
    temporary directory present before a write is stale). `.old-*` directories are left: after a crash
    between the two renames of `commit_dir`, one of them is the only complete copy."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to its final name; an existing `final` is replaced.

    `os.replace` cannot replace a non-empty directory, so an existing one is first moved aside and deleted
    after the new one is in place: at every instant either the old or the new directory is complete.
    """
    fsync_dir(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------- manifest


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Hash every file in `ckpt_dir` (after fsyncing it) into `manifest.json`, written last."""
    files = {}
    for p in sorted(ckpt_dir.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        fsync_file(p)
        files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    write_json(ckpt_dir / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "files": files})


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check the manifest against the bytes on disk; return the manifest or raise CheckpointError saying why."""
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir}: unreadable {MANIFEST}: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{ckpt_dir}: manifest does not list {name}")
    for name, meta in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{ckpt_dir}: {name} has {p.stat().st_size} bytes, manifest says {meta['size']}")
        if sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"{ckpt_dir}: {name} does not match its sha256 in the manifest (corrupted)")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All `step-N` directories under `root` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(root: Path) -> Iterator[Path]:
    """The checkpoints under `root` whose manifest verifies, newest first (each verified when it is reached);
    broken ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("ignoring incomplete checkpoint: %s", e)
            continue
        yield path


def find_latest_complete(root: Path) -> Path | None:
    """The newest checkpoint under `root` whose manifest verifies; newer broken ones are skipped with a warning."""
    return next(complete_checkpoints(root), None)


def resume_candidates(run_dir: Path, resume: str) -> tuple[list[Path], bool]:
    """Which checkpoints `checkpoint.resume` lets a run start from, in the order to try them, and whether the
    user named one (then only that one may be used).

    "never" -> none; "auto" -> every complete checkpoint in `run_dir/checkpoints`, newest first (a resume falls
    back to the next when one cannot be loaded); anything else is a path: a checkpoint directory (verified; a
    broken one raises) or a directory of `step-N` checkpoints (its newest complete one).
    """
    if resume == "never":
        return [], False
    if resume == "auto":
        return list(complete_checkpoints(run_dir / "checkpoints")), False
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume: {path} does not exist")
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return [path], True
    latest = find_latest_complete(path)
    if latest is None:
        raise CheckpointError(f"checkpoint.resume: no complete checkpoint under {path}")
    return [latest], True


def prune_checkpoints(root: Path, keep_last: int, newest: Path) -> None:
    """Keep the `keep_last` newest complete checkpoints (always including `newest`); delete older ones.

    Called only after `newest` is committed. Directories without a manifest are left alone (they may be
    under inspection) and do not count. `keep_last <= 0` keeps everything.
    """
    if keep_last <= 0:
        return
    complete = [p for _, p in list_checkpoints(root) if (p / MANIFEST).is_file()]
    keep = set(complete[-keep_last:]) | {newest}
    for p in complete:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- writing


def write_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    *,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    per_rank: list[tuple[int, dict[str, Any], dict[str, Any]]],
    states: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write `root/step-N` atomically and prune to `keep_last`; main process only. Returns the directory.

    `per_rank` holds (rank, rng_state, {name: state}) for every process; `states` the shared registered
    states; `config` the run's resolved config. The caller has checked the weights are finite.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    with writing(tmp, (model.state_dict(), optimizer_state)):
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        for rank, rng, rank_states in per_rank:
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
            for name, state in rank_states.items():
                save_state_file(tmp, f"state-{name}-rank{rank}", state)
        for name, state in states.items():
            save_state_file(tmp, f"state-{name}", state)
        write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step, "format_version": FORMAT_VERSION})
        if config is not None:
            write_json(tmp / CONFIG_FILE, config)
        write_manifest(tmp, step)
    final = root / step_dir_name(step)
    commit_dir(tmp, final)
    prune_checkpoints(root, keep_last, final)
    return final


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested structure of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def writing(tmp: Path, contents: Any) -> Iterator[None]:
    """Write into the temporary directory `tmp`; on any failure remove it. Running out of disk space (ENOSPC, or
    torch's "unexpected pos" from a short write, with the disk then nearly full) becomes `DiskFullError` naming
    the path and the bytes that `contents` (the tensors being saved) need."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | RuntimeError):
            free = shutil.disk_usage(tmp.parent).free
            need = nbytes(contents)
            full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free < max(need, 1 << 20)
            if full:
                raise DiskFullError(
                    f"no space left on device writing {tmp.parent}: it needs about {need / 2**20:.1f} MiB "
                    f"({need} bytes), {free / 2**20:.1f} MiB are free; earlier checkpoints are intact. Free some "
                    "space, write elsewhere (output_dir), or keep fewer checkpoints (checkpoint.keep_last)"
                ) from None
        raise


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """`save_pretrained` (safetensors) of model and tokenizer into a temporary sibling, then a rename."""
    check_finite(model.state_dict().items(), f"{out.name}/")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    with writing(tmp, model.state_dict()):
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
    commit_dir(tmp, out)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    optimizer: Any,
    scheduler: Any,
    states: dict[str, Any],
    rank: int,
    device: torch.device,
) -> dict[str, Any]:
    """Load a verified checkpoint into the objects given; return trainer_state.json.

    `states` maps a file stem suffix (`name`, or `name-rank{r}` for per-rank states) to the object whose
    `load_state_dict` receives it. This process's RNG streams are restored last, so nothing here can
    draw random numbers after the restore.
    """
    # safetensors rejects "cpu:N", the device accelerate gives CPU processes
    where = "cpu" if device.type == "cpu" else str(device)
    with loading(path / MODEL_FILE):
        load_model(model, path / MODEL_FILE, strict=True, device=where)
    with loading(path / OPTIMIZER_FILE):
        optimizer.load_state_dict(load_tensors_file(path / OPTIMIZER_FILE))
    with loading(path / SCHEDULER_FILE):
        scheduler.load_state_dict(load_tensors_file(path / SCHEDULER_FILE))
    for stem, obj in states.items():
        with loading(path / f"state-{stem}"):
            obj.load_state_dict(load_state_file(path, f"state-{stem}"))
    with loading(path / TRAINER_STATE):
        trainer_state: dict[str, Any] = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        for key in ("step", "world_size", "nonfinite_skips", "consecutive_nonfinite"):
            trainer_state[key] = int(trainer_state[key])  # what a resume reads, checked before it is used
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        with loading(rng_file):
            restore_rng_state(load_tensors_file(rng_file))
    else:
        logger.warning("%s has no RNG state for process %d; random streams will differ", path, rank)
    return trainer_state


def load_config_file(path: Path) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written with (None for checkpoints older than that file)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    with loading(file):
        config: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return config


@contextlib.contextmanager
def loading(file: Path) -> Iterator[None]:
    """Any failure to load `file` becomes a `CheckpointError` that names it and says why, in one line (never
    torch's advice to turn off weights_only: a file that is not plain tensors is simply not loaded)."""
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file}: holds objects other than tensors and plain containers; not loaded, for safety"
        ) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file}: cannot be loaded ({type(exc).__name__}: {reason[:200]})") from None


# ---------------------------------------------------------------- contents


def check_finite(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise CheckpointError if any floating tensor has a NaN or inf (one host sync for all tensors)."""
    items = [(n, t) for n, t in named if torch.is_floating_point(t) and t.numel() > 0]
    if not items:
        return
    flags = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in items])
    if bool(flags.all()):
        return
    bad = [n for (n, _), ok in zip(items, flags.tolist(), strict=True) if not ok]
    raise CheckpointError(f"refusing to save {what}: non-finite values in {', '.join(bad[:5])}")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG stream of this process as plain lists and tensors (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("CUDA RNG states not restored: saved for %d devices, not this many", len(state["cuda"]))


def _is_plain(obj: Any) -> bool:
    """True if `obj` survives a JSON round trip unchanged (str-keyed dicts, lists, scalars; no tuples)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, list):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


def check_state_name(name: str) -> None:
    if not _STATE_NAME.match(name):
        raise ValueError(f"state name {name!r}: use letters, digits, '_' and '.' only")


def save_state_file(ckpt_dir: Path, stem: str, state: Any) -> None:
    """A registered state as `{stem}.json` when it is plain data, else `{stem}.pt` (tensors, tuples)."""
    if _is_plain(state):
        write_json(ckpt_dir / f"{stem}.json", state)
    else:
        torch.save(state, ckpt_dir / f"{stem}.pt")


def load_state_file(ckpt_dir: Path, stem: str) -> Any:
    if (ckpt_dir / f"{stem}.json").is_file():
        return json.loads((ckpt_dir / f"{stem}.json").read_text(encoding="utf-8"))
    if (ckpt_dir / f"{stem}.pt").is_file():
        return torch.load(ckpt_dir / f"{stem}.pt", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{ckpt_dir}: no saved state {stem!r} (.json or .pt)")


def load_tensors_file(path: Path) -> Any:
    """`torch.load` restricted to tensors and plain containers (never arbitrary pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)
