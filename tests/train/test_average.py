import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.train import TrainConfig, load_checkpoint, load_model, train
from yt8m.train.average import average_run, average_states, recompute_batch_norm, select_checkpoints

CLASSES = 12


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory) -> Path:
    """A small DBoF (BatchNorm inside) with a checkpoint every 2 steps, 4 kept."""
    output = tmp_path_factory.mktemp("average") / "run"
    train(TrainConfig(model="dbof", model_options={"num_clusters": 16, "hidden_size": 8}, num_classes=CLASSES,
                      train_data=[str(p) for p in tiny_corpus.files["frame"]["train"]], output=str(output),
                      epochs=2, batch_size=8, checkpoint_every=2, keep_checkpoints=4), progress=False)
    return output


def steps_of(paths) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in paths]


def test_the_average_is_the_mean_of_the_state_dicts(run, tmp_path):
    paths = select_checkpoints(run, last=3)
    states = [load_checkpoint(p)["model"] for p in paths]
    written, averaged = average_run(run, tmp_path / "avg.pt", last=3)
    assert averaged == steps_of(paths)
    result = load_checkpoint(written)["model"]
    for key, value in result.items():
        if value.is_floating_point():  # weights and BatchNorm running statistics
            torch.testing.assert_close(value, sum(s[key] for s in states) / 3)
        else:  # num_batches_tracked: the newest
            assert torch.equal(value, states[-1][key])
    assert any("running_mean" in key for key in result)
    assert load_model(written).num_classes == CLASSES


def test_average_states_keeps_dtypes_and_refuses_other_tensors():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(5)}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["h"].dtype == torch.float16
    assert out["n"].item() == 5
    with pytest.raises(ValueError, match="different tensors"):
        average_states([a, {"w": a["w"]}])


def test_checkpoints_are_chosen_by_last_or_by_steps(run):
    available = steps_of(select_checkpoints(run, last=4))
    assert steps_of(select_checkpoints(run, steps=[available[2], available[0]])) == [available[0], available[2]]
    with pytest.raises(ValueError, match="no checkpoint of step"):
        select_checkpoints(run, steps=[10**6])
    with pytest.raises(ValueError, match="fewer than the last 9"):
        select_checkpoints(run, last=9)
    with pytest.raises(ValueError, match="either last"):
        select_checkpoints(run)


def test_update_bn_recomputes_the_statistics_with_pytorchs_update_bn(run, tiny_corpus, tmp_path):
    files = [str(p) for p in tiny_corpus.files["frame"]["train"]]
    averaged, _ = average_run(run, tmp_path / "a.pt", last=2)
    recomputed, _ = average_run(run, tmp_path / "b.pt", last=2, update_bn=files, bn_batches=3, bn_batch_size=8)
    a, b = load_checkpoint(averaged)["model"], load_checkpoint(recomputed)["model"]
    stats = [key for key in a if "running_" in key]
    assert stats and all(not torch.equal(a[key], b[key]) for key in stats)
    weights = [key for key in a if "running_" not in key and "num_batches" not in key]
    assert all(torch.equal(a[key], b[key]) for key in weights)  # only the statistics change
    model = load_model(averaged)
    recompute_batch_norm(model, files, 3, 8, 300, CLASSES)
    for key in stats:  # the same batches (the loader's fixed shuffle) give the same statistics
        torch.testing.assert_close(model.state_dict()[key], b[key])


def test_the_average_command_writes_a_model_that_eval_takes(run, tiny_corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["average", str(run), "--last", "2", "--output", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert "averaged steps" in result.output
    validate = ",".join(str(p) for p in tiny_corpus.files["frame"]["validate"])
    result = runner.invoke(main, ["eval", str(tmp_path / "m.pt"), "--data", validate, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["num_videos"] == 16
    again = runner.invoke(main, ["average", str(run), "--last", "2", "--output", str(tmp_path / "m.pt")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    wrong = runner.invoke(main, ["average", str(run), "--steps", "1,x"])
    assert wrong.exit_code == 2 and "step numbers" in wrong.output
    empty = runner.invoke(main, ["average", str(run), "--steps", ","])
    assert empty.exit_code == 2 and "at least one step" in empty.output
    default = runner.invoke(main, ["average", str(run), "--last", "2"])
    assert default.exit_code == 0 and list(run.glob("average-*.pt"))
