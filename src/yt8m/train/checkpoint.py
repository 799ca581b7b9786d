"""Checkpoints and models in a run directory: written atomically with a SHA-256 digest, loaded safely.

Every `.pt` file yt8m writes holds tensors and plain Python values only, so it loads with
`torch.load(..., weights_only=True)`: a file carrying any other pickled object is refused
before anything in it runs. Next to each file lies `NAME.sha256`, in the format of
`sha256sum` (`sha256sum -c step-00000200.pt.sha256` checks it by hand); loading checks it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from yt8m.models import build
from yt8m.models.registry import upgrade_options

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "model.pt"
DIGEST_SUFFIX = ".sha256"
_NAME = re.compile(r"step-(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")  # what `temporary_path` makes


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used: empty, truncated, unreadable, failing its
    digest, or carrying pickled objects that loading would have to run."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def temporary_path(path: Path) -> Path:
    """A hidden name next to `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: never a torn file, and a link
    at `path` is replaced, not followed."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        _replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path, check=None) -> None:
    """torch.save to a temporary file, its digest beside it, then rename: a killed run never leaves
    half a file under the final name, and two writers never share a temporary file. `check(tmp)` may refuse
    the written file (by raising) before anything is published (a size budget)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        if check is not None:
            check(tmp)
        # the digest first: a crash between the two renames leaves a digest that the old file
        # fails (reported, never trusted), not a new file without a digest
        atomic_write_text(digest_path(path), f"{file_digest(tmp)}  {path.name}\n")
        _replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def recorded_digest(path: Path) -> str | None:
    """The SHA-256 recorded next to `path` when it was written, None when there is none."""
    try:
        text = digest_path(path).read_text().split()
    except FileNotFoundError:
        return None
    if not text or not re.fullmatch(r"[0-9a-f]{64}", text[0]):
        raise CheckpointError(digest_path(path), "not a SHA-256 digest file")
    return text[0]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    require_digest: bool = False) -> dict:
    """A checkpoint or model file's contents, after checking its digest; never runs pickled code.

    Raises CheckpointError (naming the file) for an empty, truncated or unreadable file, one whose
    bytes differ from the digest recorded when it was written, or one holding anything but
    tensors and plain values. A file without a recorded digest loads with a warning, or with
    `require_digest` (resuming a run, whose every checkpoint gets one) is refused.
    """
    state = load_file(path, map_location, require_digest)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("model_config"), dict) or "name" not in state["model_config"]:
        raise CheckpointError(path, "not a yt8m checkpoint or model (no 'model' weights and 'model_config')")
    return state


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", require_digest: bool = False):
    """What `atomic_save` wrote to `path`, checked as `load_checkpoint` checks it, whatever its structure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or model file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (a write that never finished?)")
    expected = recorded_digest(path)
    if expected is None:
        trust = (f"if you trust it, record its digest: cd {path.parent} && sha256sum {path.name} > "
                 f"{digest_path(path).name}")
        if require_digest:
            raise CheckpointError(path, f"no {DIGEST_SUFFIX} digest beside it (written before digests, or its "
                                        f"digest was removed); {trust}")
        warnings.warn(f"{path}: no {DIGEST_SUFFIX} digest beside it, so its integrity cannot be checked ({trust})",
                      stacklevel=2)
    elif (found := file_digest(path)) != expected:
        raise CheckpointError(path, f"SHA-256 {found[:16]}… differs from the {expected[:16]}… recorded when it "
                                    "was written: the file changed or is damaged")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, "not a PyTorch checkpoint or model (torch.save writes a zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        what = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                    lines[0] if lines else type(error).__name__).split(". Please")[0]  # torch's advice follows
        raise CheckpointError(path, "refused: it holds pickled objects other than tensors and plain values, "
                                    f"which loading would have to run ({what}). yt8m never writes such "
                                    "files; load it only if you trust its origin.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(path, f"unreadable, truncated or not a PyTorch file ({error})") from None
    return state


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = [p for p in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt") if _NAME.search(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file `step-N.pt`."""
    return int(_NAME.search(Path(path).name).group(1))


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    path = Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"
    atomic_save(state, path)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    return path


def latest_intact_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu",
                             report=None) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that loads and passes its digest; None without any.

    Each newer one that fails is passed to `report(CheckpointError)`. Raises CheckpointError,
    naming every failure, when checkpoints exist but none is intact.
    """
    failures: list[CheckpointError] = []
    candidates = checkpoints(run_dir)
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path, map_location, require_digest=True)
        except CheckpointError as error:
            failures.append(error)
            if report is not None:
                report(error)
    if failures:
        raise CheckpointError(Path(run_dir) / CHECKPOINT_DIR, "no intact checkpoint to resume from:\n  "
                              + "\n  ".join(str(error) for error in failures))
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Deletes the temporary files of writes that never finished (a killed run), and digests whose
    file is gone; call only while holding the run's lock. Returns what it removed."""
    removed = []
    for directory in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            orphan = path.name.endswith(DIGEST_SUFFIX) and not path.with_name(path.name[:-len(DIGEST_SUFFIX)]).exists()
            if path.is_file() and (_TEMPORARY.match(path.name) or orphan):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def model_from_config(model_config: dict) -> nn.Module:
    """The (untrained) model that a saved `model.config` records: every option as saved, none from a preset,
    so that an edited preset cannot change a saved run."""
    config = upgrade_options(model_config)
    if "train_frames" in config:  # saved before sample_at_eval existed: it evaluated on every frame
        config.setdefault("sample_at_eval", False)
    return build(config.pop("name"), from_preset=False, **config)


def model_from_state(state: dict, source: Path) -> nn.Module:
    """The model a checkpoint or model state (read from `source`) describes, with its weights, in eval mode."""
    try:
        model = model_from_config(state["model_config"])
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(source, f"its model config and weights do not make a model: {error}") from None
    return model.eval()


def model_file(path: str | os.PathLike) -> Path:
    """The file `load_model(path)` reads: the file itself, or a run's final model, else its latest checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory or model file at {path}")
    final = path / FINAL_MODEL
    sources = [final] if final.exists() else checkpoints(path)[-1:]
    if not sources:
        raise FileNotFoundError(f"{path} holds no {FINAL_MODEL} and no checkpoint: was it trained?")
    return sources[0]


def check_weights(weights: str | None) -> None:
    """Refuses a `weights` choice other than None (the EMA where there is one), "ema" or "raw"."""
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights: expected ema or raw, found {weights!r}")


def chosen_weights(state: dict, weights: str | None, source: Path) -> tuple[str, dict]:
    """("ema" or "raw", the model state of those weights) of a checkpoint or model `state`: `weights` None takes
    the EMA shadow weights where the file has them (as `eval` and `predict` do), "ema" requires them."""
    check_weights(weights)
    if weights == "ema" and not state.get("ema"):
        raise ValueError(f"{source} holds no EMA weights (the run trained without ema_halflife); use --weights raw")
    chosen = "ema" if state.get("ema") and weights != "raw" else "raw"
    return chosen, {**state, "model": state["ema"]["model"]} if chosen == "ema" else state


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               weights: str | None = None) -> nn.Module:
    """The trained model of a run directory (its final model, else its latest checkpoint), or of one
    checkpoint or model file, in eval mode, with the weights `eval` uses (`chosen_weights`: the EMA where the
    file has one, unless `weights="raw"`). Loads with `weights_only=True` and checks digests."""
    source = model_file(path)
    return model_from_state(chosen_weights(load_checkpoint(source, map_location), weights, source)[1], source)
