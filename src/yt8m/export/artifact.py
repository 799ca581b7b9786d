"""One self-contained file that predicts: a run, or a whole ensemble fused (2018 1st place §3.2: every
sub-model in one graph with one input and a weighted output), its weights stored in fp32, bf16 or the 1st
place's int8-partial scheme (`export.storage`), under an optional size budget.

The file (`torch.save`, loaded with `weights_only=True`) holds: `format`, `version`, `storage`,
`min_elements`, `num_classes`, every member's model config, frames (`max_frames`) and packed weights, the
ensemble's combiner (method, options, fitted state, the stores' top k, the feature size) or none for a
single run, where it came from, and `digest`: the SHA-256 of its content, checked at load (a file copied
without its `.sha256` is still checked). Weights are dequantized at load and computed in float32.

A fused ensemble reproduces the inputs its combiner was fitted on: each member's probabilities kept to the
ensemble's top k classes in float16, as the members' prediction stores hold them, so that with fp32 storage
it predicts what the ensemble directory predicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from yt8m.export.storage import DEFAULT_MIN_ELEMENTS, STORAGES, pack_state, packed_bytes, unpack_state

FORMAT = "yt8m-artifact"
VERSION = 1


def content_digest(payload: dict) -> str:
    """SHA-256 of an artifact's content (everything but `digest`), independent of how torch.save lays it out."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor:{value.dtype}:{list(value.shape)}".encode())
            digest.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                          if value.numel() else b"")
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(json.dumps(str(key)).encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(json.dumps(value).encode())

    feed({key: value for key, value in payload.items() if key != "digest"})
    return digest.hexdigest()


def parse_size(text: str) -> int:
    """Bytes of "1GB", "995MB", "500 MiB", "1e9": SI units (GB = 10^9 bytes) and binary ones (GiB = 2^30). The
    2018 rule's "1GB" was evidently 2^30 bytes: the 1st place's final ensemble was 1052 MB (its Table 4)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 < value < float("inf") or not value * units[unit] < 2**63:
        raise ValueError(f"budget: expected a size such as 1GB, 995MB or 500MiB, found {text!r}")
    return int(value * units[unit])


def _members_of(source: Path, weights: str | None) -> tuple[list, dict | None]:
    """(the RunPredictors of `source`, its ensemble's combiner record or None)."""
    from yt8m.ensemble.predictor import RunPredictor, load_predictor, source_kind

    kind = source_kind(source)
    if kind == "store":
        raise ValueError(f"{source} is a prediction store: a store holds scores, not a model to export")
    if kind == "artifact":
        raise ValueError(f"{source} is already an artifact: export its run or ensemble")
    if kind == "run":
        run = RunPredictor(source, device="cpu", weights=weights)
        if run.cascade_from:
            raise ValueError(f"{source} is a cascade: its input needs its upstream models, which an artifact does "
                             "not hold")
        return [run], None
    if weights is not None:
        raise ValueError("--weights applies to a run; an ensemble's members are exported with the weights it was "
                         "fitted on")
    ensemble = load_predictor(source, device="cpu")
    for member in ensemble.members:
        if member.kind != "run":
            what = "a store" if member.kind == "store" else "an ensemble"
            raise ValueError(f"member {member.path} of {source} is {what}: a fused artifact holds models; export "
                             "an ensemble of runs")
        if member.cascade_from:
            raise ValueError(f"member {member.path} of {source} is a cascade: its input needs its upstream models, "
                             "which an artifact does not hold")
    combiner = {"method": ensemble.config["method"], "options": ensemble.config.get("options") or {},
                "state": ensemble.combiner.state_dict(), "top_k": ensemble.top_k,
                "feature_dim": ensemble.config.get("feature_dim")}
    return ensemble.members, combiner


def artifact_payload(source: str | os.PathLike, storage: str = "fp32", min_elements: int = DEFAULT_MIN_ELEMENTS,
                     weights: str | None = None) -> dict:
    """The content of the artifact of `source` (a run directory, checkpoint or model file, or an ensemble of
    runs), its weights packed under `storage`."""
    if storage not in STORAGES:
        raise ValueError(f"storage: expected one of {', '.join(STORAGES)}, found {storage!r}")
    source = Path(source)
    members, combiner = _members_of(source, weights)
    records = [{"source": str(member.path), "model_config": dict(member.model.config),
                "max_frames": member.max_frames, "weights": pack_state(member.model.state_dict(), storage,
                                                                        min_elements)}
               for member in members]
    payload = {"format": FORMAT, "version": VERSION, "storage": storage, "min_elements": min_elements,
               "num_classes": members[0].num_classes, "members": records, "combiner": combiner,
               "source": str(source.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    payload["digest"] = content_digest(payload)
    return payload


def member_bytes(payload: dict) -> list[tuple[str, int]]:
    """(member source, bytes of its stored weights) of an artifact."""
    return [(member["source"], packed_bytes(member["weights"])) for member in payload["members"]]


def export_artifact(source: str | os.PathLike, output: str | os.PathLike, storage: str = "fp32",
                    min_elements: int = DEFAULT_MIN_ELEMENTS, budget: int | None = None, weights: str | None = None,
                    overwrite: bool = False) -> dict:
    """Writes the artifact of `source` to `output` (with its `.sha256` beside it); refuses, naming each member's
    weight bytes, when the file would exceed `budget` bytes. Returns {"path", "bytes", "members", "storage"}."""
    from yt8m.ensemble.predictor import run_of
    from yt8m.train.checkpoint import atomic_save, digest_path
    from yt8m.train.inference import check_output

    output, source = Path(output), Path(source)
    payload = artifact_payload(source, storage, min_elements, weights)
    sources = {run_of(source), *(run_of(Path(member["source"])) for member in payload["members"])}
    protect = [path for run in sources for path in ([run, digest_path(run)] if run.is_file() else [run])]
    check_output(output, protect=protect, overwrite=overwrite)
    check_output(digest_path(output), protect=protect, overwrite=True)
    rows = member_bytes(payload)

    def within_budget(written: Path) -> None:  # the file as written: its size is what the budget bounds
        size = written.stat().st_size
        if budget is not None and size > budget:
            breakdown = "; ".join(f"{Path(path).name}: {count / 1e6:.1f} MB" for path, count in rows)
            smaller = [s for s in ("bf16", "int8-partial") if STORAGES.index(s) > STORAGES.index(storage)]
            advice = f"try --storage {' or '.join(smaller)}, or fewer members" if smaller else "try fewer members"
            raise ValueError(f"the artifact takes {size:,} bytes ({size / 1e6:.1f} MB) under {storage}, over the "
                             f"budget of {budget:,} bytes (weights by member: {breakdown}); {advice}. Nothing was "
                             "written")

    atomic_save(payload, output, check=within_budget)
    return {"path": output, "bytes": output.stat().st_size, "members": rows, "storage": storage}


def load_artifact(path: str | os.PathLike) -> dict:
    """An artifact's content, its digest and structure checked (loaded with `weights_only=True`)."""
    from yt8m.train.checkpoint import CheckpointError, load_file

    path = Path(path)
    payload = load_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"not a yt8m artifact (format {FORMAT!r} expected)")
    if payload.get("version") != VERSION:
        raise CheckpointError(path, f"artifact version {payload.get('version')!r}, this yt8m reads {VERSION}")
    if payload.get("digest") != content_digest(payload):
        raise CheckpointError(path, "its content does not match the digest it records: the file changed or is "
                                    "damaged")
    return payload


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by `export_artifact`: its pickle's first key is "format" and its value
    FORMAT, read from the opcodes (`pickletools.genops`, which runs nothing). A damaged file is not an
    artifact here: loading it reports the damage."""
    import pickletools
    import zipfile

    path = Path(path)
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            pickled = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
            if pickled is None:
                return False
            with archive.open(pickled) as stream:
                strings = []
                for opcode, argument, _ in pickletools.genops(stream):
                    if isinstance(argument, str) and "UNICODE" in opcode.name:
                        strings.append(argument)
                        if len(strings) == 2:
                            return strings == ["format", FORMAT]
                    elif opcode.name not in ("PROTO", "FRAME", "EMPTY_DICT", "MARK", "MEMOIZE", "BINPUT",
                                             "LONG_BINPUT"):
                        return False
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return False


class _Member:
    """One model of an artifact, as `cached_scores` and `predict` take a predictor."""

    kind = "run"

    def __init__(self, model, max_frames: int, device, batch_size: int, digest: str, index: int, path: Path):
        self.model, self.max_frames, self.device, self.batch_size = model, max_frames, device, batch_size
        self.num_classes, self.level = model.num_classes, getattr(model, "level", "frame")
        self.digest, self.index, self.path = digest, index, path

    def identity(self) -> dict:
        from yt8m.ensemble.predictor import digest_of

        return {"kind": "artifact-member", "path": str(self.path), "member": self.index,
                "digest": digest_of(self.digest, self.index)}

    def cache_folder(self) -> Path:
        from yt8m.ensemble.predictor import _process_cache

        return _process_cache()

    def predict(self, files: list[str], batch_size: int | None = None, progress: bool = True,
                on_error: str = "raise") -> Iterator:
        from yt8m.train import predict_batches

        self.model.to(self.device)
        return predict_batches(self.model, files, self.num_classes, self.device, batch_size=batch_size or
                               self.batch_size, max_frames=self.max_frames, progress=progress, on_error=on_error,
                               desc=f"predict {self.path.name}[{self.index}]")


class ArtifactPredictor:
    """An exported artifact as a predictor: a run's model, or an ensemble's members and combiner."""

    kind = "artifact"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256):
        from yt8m.ensemble.methods import build_combiner
        from yt8m.train import resolve_device
        from yt8m.train.checkpoint import CheckpointError, model_from_state

        self.path = Path(path)
        payload = load_artifact(self.path)
        self.device = resolve_device(device)
        self.storage, self.digest = payload["storage"], payload["digest"]
        self.members = []
        for index, record in enumerate(payload["members"]):
            model = model_from_state({"model": unpack_state(record["weights"]), "model_config": record["model_config"]},
                                     self.path)
            self.members.append(_Member(model, record["max_frames"], self.device, batch_size, self.digest, index,
                                        self.path))
        self.num_classes = payload["num_classes"]
        self.combiner, self.top_k, self.config = None, None, {}
        if payload["combiner"] is not None:
            record = payload["combiner"]
            try:
                self.combiner = build_combiner(record["method"], len(self.members), self.num_classes,
                                               record["feature_dim"], record["options"])
                self.combiner.load_state_dict(record["state"])
            except (RuntimeError, ValueError, TypeError, KeyError) as error:
                raise CheckpointError(self.path, f"its combiner does not fit its members: {error}") from None
            self.combiner.eval()
            self.top_k, self.config = record["top_k"], {"method": record["method"]}

    def identity(self) -> dict:
        return {"kind": "artifact", "path": str(self.path.resolve()), "storage": self.storage,
                "digest": self.digest}

    def cache_folder(self) -> Path:
        from yt8m.ensemble.predictor import _process_cache

        return _process_cache()

    def predict(self, files: list[str], batch_size: int = 1024, progress: bool = True,
                on_error: str = "raise") -> Iterator:
        from yt8m.ensemble.predictor import cached_scores, joined

        if self.combiner is None:
            yield from self.members[0].predict(files, progress=progress, on_error=on_error)
            return
        stores = [cached_scores(member, files, self.top_k, progress) for member in self.members]
        with torch.inference_mode():
            for ids, probs, labels, features in joined(stores, files, self.num_classes, self.combiner.needs_features,
                                                       batch_size, on_error, progress):
                yield ids, self.combiner(probs, features), labels

    def scores(self, files: list[str], top_k: int | None, progress: bool = True):
        from yt8m.ensemble.predictor import cached_scores

        return cached_scores(self, files, top_k, progress)


__all__ = ["ArtifactPredictor", "content_digest", "export_artifact", "is_artifact", "load_artifact",
           "parse_size"]
