import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from test_loop import assert_same_weights, interrupt_adam_at, make_config

from yt8m.cli import main
from yt8m.ensemble.predictor import RunPredictor
from yt8m.train import train
from yt8m.train.loop import ema_model, ema_state


def test_ema_follows_the_closed_form_on_weights_and_batch_norm_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    halflife = 4.0
    decay = 1 - 1 / halflife
    ema = ema_model(model, halflife)
    expected = None
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3))  # moves the BatchNorm running statistics
        current = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        expected = current if expected is None else {k: decay * expected[k] + (1 - decay) * current[k]
                                                     for k in current}
        ema.update_parameters(model)
    shadow = ema.module.state_dict()
    for key, value in expected.items():  # weights and running_mean / running_var alike
        torch.testing.assert_close(shadow[key], value)
    assert {"1.running_mean", "1.running_var"} <= expected.keys()
    restored = ema_model(model, halflife, ema_state(ema)["ema"])
    assert int(restored.n_averaged) == 5
    assert_same_weights(restored.module.state_dict(), shadow)


def test_ema_halflife_is_checked():
    from yt8m.train import TrainConfig

    with pytest.raises(ValueError, match="ema_halflife must be > 1"):
        TrainConfig(model="dbof", train_data=["x"], output="o", ema_halflife=1)


def test_a_resumed_run_ends_with_the_ema_of_an_uninterrupted_one(tiny_corpus, tmp_path, monkeypatch):
    train(make_config(tiny_corpus, tmp_path / "straight", ema_halflife=3), progress=False)
    calls = interrupt_adam_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_corpus, tmp_path / "killed", ema_halflife=3), progress=False)
    calls.update(n=0, at=None)
    train(make_config(tiny_corpus, tmp_path / "killed", ema_halflife=3), resume=True, progress=False)
    straight, killed = (torch.load(tmp_path / name / "model.pt", weights_only=True)["ema"]
                        for name in ("straight", "killed"))
    assert straight["n_averaged"] == killed["n_averaged"] == 14
    assert_same_weights(straight["model"], killed["model"])


def test_eval_uses_the_ema_weights_when_the_run_has_them(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "ema", ema_halflife=3), progress=False)
    train(make_config(tiny_corpus, tmp_path / "plain"), progress=False)
    saved = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)
    assert RunPredictor(tmp_path / "ema").weights == "ema"
    assert_same_weights(RunPredictor(tmp_path / "ema").model.state_dict(), saved["ema"]["model"])
    assert_same_weights(RunPredictor(tmp_path / "ema", weights="raw").model.state_dict(), saved["model"])
    assert RunPredictor(tmp_path / "plain").weights == "raw"
    validate = ",".join(str(p) for p in tiny_corpus.files["frame"]["validate"])
    runner = CliRunner()
    ema, raw = (json.loads(runner.invoke(main, ["eval", str(tmp_path / "ema"), "--data", validate, "--json",
                                                *extra]).stdout) for extra in ([], ["--weights", "raw"]))
    assert ema["gap"] != raw["gap"]
    said = runner.invoke(main, ["eval", str(tmp_path / "ema"), "--data", validate])
    assert "the run's EMA weights" in said.stdout  # the default is said
    assert "EMA" not in runner.invoke(main, ["eval", str(tmp_path / "ema"), "--data", validate, "--weights",
                                             "raw"]).stdout
    refused = runner.invoke(main, ["eval", str(tmp_path / "plain"), "--data", validate, "--weights", "ema"])
    assert refused.exit_code == 2 and "holds no EMA weights" in refused.output


def test_the_ema_epochs_run_after_the_normal_ones_at_a_lower_rate(tiny_corpus, tmp_path):
    from test_loop import read_metrics

    summary = train(make_config(tiny_corpus, tmp_path / "run", epochs=1, ema_halflife=3, ema_epochs=1,
                                ema_lr_factor=0.2, lr_decay=1.0), progress=False)
    assert summary["steps"] == 14  # 7 steps an epoch, 2 epochs
    rates = [record["lr"] for record in read_metrics(tmp_path / "run") if "lr" in record]
    assert rates[0] == pytest.approx(rates[-1] / 0.2) and rates[-1] < rates[0]
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["ema"]["n_averaged"] == 14
    from yt8m.train import TrainConfig

    with pytest.raises(ValueError, match="needs ema_halflife"):
        TrainConfig(model="dbof", train_data=["x"], output="o", ema_epochs=2)
