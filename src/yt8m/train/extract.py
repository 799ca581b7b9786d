"""One member out of a mixture: a distilled NeXtVLAD (or MixNeXtVLAD sub-tree) of a trained `mix_nextvlad` or
`mod_nextvlad`, written as a standalone model file that `eval` and `predict` take.

This is the "NeXtVLAD distill" row of [mod2019] Table 1 and §4.3.1: one of the 12 NeXtVLADs trained together in
MOD NeXtVLAD with online distillation, the other 11 removed at inference, scored 0.81509 private LB (83M
parameters), above a NeXtVLAD trained alone (0.79642) and a 320M-parameter NeXtVLAD large (0.80586).

A member is "I" (member I of the mixture: a `nextvlad` of a mix_nextvlad, a `mix_nextvlad` with its own gate of a
mod_nextvlad) or "I.J" (member J of sub-tree I of a mod_nextvlad: a `nextvlad`), counted from 0. The member's
options are the mixture's (the ones its registered model takes, and the two conventions), never the member's
defaults: the members of a mixture squeeze by the mixture's `gating_reduction` (16), a lone nextvlad by 8.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from yt8m.models.nextvlad import DistilledMixture
from yt8m.models.registry import available, option_names, resolve
from yt8m.train.checkpoint import (
    atomic_save,
    check_weights,
    chosen_weights,
    digest_path,
    load_checkpoint,
    model_file,
    model_from_config,
    model_from_state,
)
from yt8m.train.inference import check_output

_MEMBER = re.compile(r"(\d+)(?:\.(\d+))?")


def _registered_name(module: nn.Module) -> str:
    """The registered model name whose builder is the class of `module`."""
    for name in available():
        if resolve(name, from_preset=False)[0].builder is type(module):
            return name
    raise ValueError(f"{type(module).__name__} is no registered model")


def extract_member(run: str | os.PathLike, member: str, output: str | os.PathLike | None = None,
                   weights: str | None = None, overwrite: bool = False) -> Path:
    """Writes member `member` ("I" or "I.J") of the mixture of `run` (a run directory, or a checkpoint or model
    file) to `output` (default member-MEMBER.pt in the run directory, or beside the file) as a model of its own,
    from the weights eval would use (`weights` None: the EMA where the file has one; "ema"; "raw"); returns it."""
    run = Path(run)
    source = model_file(run)
    match = _MEMBER.fullmatch(member)
    if match is None:
        raise ValueError(f"{source}: member: expected I (member I of the mixture) or I.J (member J of sub-tree I "
                         f"of a mod_nextvlad), counted from 0; found {member!r}")
    check_weights(weights)  # before anything is read
    output = Path(output) if output is not None else (run if run.is_dir() else run.parent) / f"member-{member}.pt"
    check_output(output, protect=[source, digest_path(source)], overwrite=overwrite)

    state = load_checkpoint(source)
    chosen, weighted = chosen_weights(state, weights, source)
    mixture = model_from_state(weighted, source)

    module, name, path = mixture, state["model_config"]["name"], ""
    for index in (int(i) for i in match.groups() if i is not None):
        if not isinstance(module, DistilledMixture) and not path:
            raise ValueError(f"{source}: model {name!r} has no members: extract applies to mix_nextvlad and "
                             "mod_nextvlad")
        if not isinstance(module, DistilledMixture):
            raise ValueError(f"{source}: member {path} is a {name}, which has no members: I.J applies to "
                             f"mod_nextvlad only, this is a {mixture.config['name']}")
        where = f"member {path}" if path else f"the {name}"
        if index >= len(module.members):
            raise ValueError(f"{source}: {where} has {len(module.members)} members (0 to {len(module.members) - 1}), "
                             f"no member {index}")
        module, path = module.members[index], f"{path}.{index}" if path else str(index)
        name = _registered_name(module)

    accepted = option_names(resolve(name, from_preset=False)[0])
    missing = sorted(set(accepted) - set(mixture.config))
    if missing:
        raise ValueError(f"{source}: the {mixture.config['name']} config lacks the option(s) {missing} that a "
                         f"{name} takes")
    config = {"name": name, "num_classes": mixture.num_classes, **{key: mixture.config[key] for key in accepted}}
    try:
        standalone = model_from_config(config)
        standalone.load_state_dict(module.state_dict())
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"{source}: member {member} does not load as a {name} of the mixture's options: "
                         f"{error}") from None
    atomic_save({"model": standalone.state_dict(), "model_config": standalone.config,
                 "train_config": state.get("train_config", {}),
                 "extracted": {"from": str(source), "member": member, "weights": chosen}}, output)
    return output


__all__ = ["extract_member"]
