"""The size table a 2018 competitor needed before choosing members: parameters and bytes of each component
(pooling, hidden, gating, classifier), per member of an ensemble or a mixture, under each storage scheme, and
the total against a budget."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from yt8m.export.storage import DEFAULT_MIN_ELEMENTS, STORAGES, stored_bytes

COMPONENTS = ("pooling", "hidden", "gating", "classifier")
_MEMBER = re.compile(r"^((?:members\.\d+\.)+)")


def component_of(key: str) -> str:
    """The component of a state-dict key (inside its mixture member, if any): the classifier head, a gating
    (context gating, SE gating, probability gating, a mixture's gate), the hidden layer, or the pooling (the
    rest: input normalisation, clusters, recurrent cells)."""
    name = _MEMBER.sub("", key)
    if name.startswith("head."):
        return "classifier"
    if "gating" in name or name.startswith("gate."):
        return "gating"
    if "hidden" in name:
        return "hidden"
    return "pooling"


def member_of(key: str) -> str:
    """"" for a single model's key, "0", "1.2" ... for a mixture member's (its path in members.I.members.J)."""
    match = _MEMBER.match(key)
    return "" if match is None else ".".join(re.findall(r"members\.(\d+)\.", match.group(1)))


def _states(source: str, num_classes: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(label, state dict) of each model of `source`: a run, checkpoint or model file, an ensemble of runs, an
    exported artifact, or a preset or model name (built on the meta device: no memory)."""
    from yt8m.ensemble.predictor import source_kind
    from yt8m.export.artifact import load_artifact
    from yt8m.export.storage import unpack_state
    from yt8m.models import build

    if not os.path.exists(source):
        if os.sep in source or source.endswith((".pt", ".onnx", ".ts")):
            raise FileNotFoundError(f"no run, model file, ensemble or artifact at {source}")
        with torch.device("meta"):
            return [(source, build(source, num_classes=num_classes).state_dict())]
    kind = source_kind(source)
    if kind == "artifact":
        payload = load_artifact(source)
        return [(Path(m["source"]).name, unpack_state(m["weights"])) for m in payload["members"]]
    if kind == "store":
        raise ValueError(f"{source} is a prediction store: it holds scores, not a model")
    from yt8m.ensemble.predictor import load_predictor

    predictor = load_predictor(source, device="cpu")
    members = predictor.members if kind == "ensemble" else [predictor]
    return [(Path(member.path).name, member.model.state_dict()) for member in members]


def size_report(source: str, num_classes: int = 3862, min_elements: int = DEFAULT_MIN_ELEMENTS) -> dict:
    """{"rows": [{"model", "member", "component", "parameters", "bytes": {storage: n}}], "total": {...}}; a
    model's rows are per mixture member where it has members."""
    rows: dict[tuple[str, str, str], dict] = {}
    for label, state in _states(source, num_classes):
        for key, tensor in state.items():
            row = rows.setdefault((label, member_of(key), component_of(key)),
                                  {"model": label, "member": member_of(key), "component": component_of(key),
                                   "parameters": 0, "bytes": dict.fromkeys(STORAGES, 0)})
            if tensor.is_floating_point():
                row["parameters"] += tensor.numel()
            for storage in STORAGES:
                row["bytes"][storage] += stored_bytes(tensor, storage, min_elements)
    ordered = sorted(rows.values(), key=lambda r: (r["model"], [int(p) for p in r["member"].split(".") if p],
                                                    COMPONENTS.index(r["component"])))
    total = {"parameters": sum(r["parameters"] for r in ordered),
             "bytes": {s: sum(r["bytes"][s] for r in ordered) for s in STORAGES}}
    return {"source": source, "num_classes": num_classes, "min_elements": min_elements, "rows": ordered,
            "total": total}


def format_report(report: dict, storages: tuple[str, ...] = STORAGES, budget: int | None = None) -> str:
    """The report as a fixed-width table (MB = 10^6 bytes, as the 2018 rules), with the total against `budget`."""
    head = f"{'model':24s} {'member':>6s} {'component':10s} {'parameters':>12s} " + \
        " ".join(f"{s + ' MB':>16s}" for s in storages)
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        lines.append(f"{row['model'][:24]:24s} {row['member'] or '-':>6s} {row['component']:10s} "
                     f"{row['parameters']:12,d} " + " ".join(f"{row['bytes'][s] / 1e6:16.1f}" for s in storages))
    total = report["total"]
    lines.append(f"{'total':24s} {'':>6s} {'':10s} {total['parameters']:12,d} " +
                 " ".join(f"{total['bytes'][s] / 1e6:16.1f}" for s in storages))
    if budget is not None:
        verdicts = [f"{s}: {'fits' if total['bytes'][s] <= budget else 'over'} "
                    f"({total['bytes'][s] / budget:.0%} of {budget / 1e6:,.0f} MB)" for s in storages]
        lines.append("budget: " + "; ".join(verdicts) + " (weights only; the file adds its configs, a few KB)")
    return "\n".join(lines)


__all__ = ["COMPONENTS", "component_of", "format_report", "member_of", "size_report"]
