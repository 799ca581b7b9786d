import math

import numpy as np
import torch
import torch.nn.functional as F
from test_loop import final_weights, make_config

from yt8m.models import build
from yt8m.train import train
from yt8m.train.bagging import bag_weights


def test_bag_weights_depend_on_the_seed_and_the_video_alone():
    ids = [f"v{i}" for i in range(50)]
    weights = bag_weights(ids, seed=3)
    torch.testing.assert_close(bag_weights(ids[::-1], seed=3), weights.flip(0))  # any order, batch or rank
    torch.testing.assert_close(bag_weights(ids[:7], seed=3), weights[:7])
    assert not torch.equal(bag_weights(ids, seed=4), weights)


def test_bag_weights_are_poisson_one_counts():
    weights = bag_weights([f"video-{i}" for i in range(20_000)], seed=0).numpy()
    assert np.array_equal(weights, np.round(weights)) and weights.min() == 0
    assert abs(weights.mean() - 1) < 0.03 and abs(weights.var() - 1) < 0.05
    for count in range(4):  # P(k) = e^-1 / k!
        assert abs((weights == count).mean() - math.exp(-1) / math.factorial(count)) < 0.01


def test_the_weighted_loss_is_the_weighted_mean_of_the_examples_losses():
    torch.manual_seed(0)
    model = build("logistic", num_classes=5)
    logits, labels = torch.randn(4, 5), (torch.rand(4, 5) < 0.4).float()
    weights = torch.tensor([0.0, 1.0, 2.0, 3.0])
    per_example = [F.binary_cross_entropy_with_logits(logits[i], labels[i], reduction="sum") for i in range(4)]
    expected = sum(w * loss for w, loss in zip(weights, per_example)) / 4
    torch.testing.assert_close(model.loss(logits, labels, weights), expected)
    torch.testing.assert_close(model.loss(logits, labels, torch.ones(4)), model.loss(logits, labels))


def test_a_bag_trains_on_its_own_sample(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "plain", epochs=1), progress=False)
    for name, seed in (("bag0", 0), ("bag0_again", 0), ("bag1", 1)):
        train(make_config(tiny_corpus, tmp_path / name, epochs=1, bag_seed=seed), progress=False)
    plain, bag0, again, bag1 = (final_weights(tmp_path / n) for n in ("plain", "bag0", "bag0_again", "bag1"))
    assert all(torch.equal(bag0[k], again[k]) for k in bag0)
    assert any(not torch.equal(bag0[k], plain[k]) for k in plain)
    assert any(not torch.equal(bag0[k], bag1[k]) for k in plain)


def test_a_mixtures_every_loss_term_takes_the_weights():
    torch.manual_seed(0)
    model = build("mix_nextvlad", num_classes=6, num_clusters=16, groups=4, hidden_size=64, num_members=2).train()
    rgb, audio, frames = torch.randn(3, 8, 1024), torch.randn(3, 8, 128), torch.tensor([8, 6, 7])
    outputs, labels = model(rgb, audio, frames), (torch.rand(3, 6) < 0.5).float()
    torch.testing.assert_close(model.loss(outputs, labels, torch.ones(3)), model.loss(outputs, labels))
    doubled = model.loss(outputs, labels, torch.full((3,), 2.0))
    torch.testing.assert_close(doubled, 2 * model.loss(outputs, labels))  # every term scaled


def test_the_bag_command_trains_the_bags_and_writes_their_mean_ensemble(tiny_corpus, tmp_path):
    import yaml
    from click.testing import CliRunner

    from yt8m.cli import main

    train_files = ",".join(str(p) for p in tiny_corpus.files["frame"]["train"])
    validate = ",".join(str(p) for p in tiny_corpus.files["frame"]["validate"])
    command = ["bag", "dbof", "--bags", "2", "--train-data", train_files, "--valid-data", validate, "--output",
               str(tmp_path / "bags"), "--num-classes", "12", "--epochs", "1", "--batch-size", "8", "--quiet",
               "--set", "model_options.num_clusters=16", "--set", "model_options.hidden_size=8",
               "--set", "max_frames=16", "--set", "device=cpu", "--set", "seed=5"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    configs = [yaml.safe_load((tmp_path / "bags" / f"bag-{i}" / "config.yaml").read_text()) for i in (1, 2)]
    assert [(c["bag_seed"], c["seed"]) for c in configs] == [(1, 5), (2, 6)]
    ensemble = yaml.safe_load((tmp_path / "bags" / "ensemble" / "ensemble.yaml").read_text())
    assert ensemble["method"] == "mean" and [m["relative"] for m in ensemble["members"]] == ["../bag-1", "../bag-2"]
    assert ensemble["holdout"]["num_videos"] == 16
    weights = [final_weights(tmp_path / "bags" / f"bag-{i}") for i in (1, 2)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    again = CliRunner().invoke(main, command)
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = CliRunner().invoke(main, [*command, "--resume"])
    assert resumed.exit_code == 0 and resumed.output.count("is finished") == 2, resumed.output
    assert all(torch.equal(final_weights(tmp_path / "bags" / "bag-1")[k], weights[0][k]) for k in weights[0])
    no_holdout = CliRunner().invoke(main, [arg for arg in command if arg != validate and arg != "--valid-data"]
                                    + ["--output", str(tmp_path / "other")])
    assert no_holdout.exit_code == 2 and "--holdout or --valid-data" in no_holdout.output
    one = CliRunner().invoke(main, [*command[:2], "--bags", "1", *command[4:]])
    assert one.exit_code == 2 and "--bags" in one.output
