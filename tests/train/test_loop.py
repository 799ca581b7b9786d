import json
import math

import pytest
import torch

from yt8m.models import VideoClassifier, entry
from yt8m.train import TrainConfig, TrainingError, load_model, load_yaml, train
from yt8m.train.checkpoint import checkpoints
from yt8m.train.loop import clip_gradients, staircase_lr

NUM_CLASSES = 12
BATCH_SIZE = 8  # 56 training videos: 7 steps an epoch
SMALL = {"dbof": {"num_clusters": 64, "hidden_size": 32}, "lstm": {"hidden_size": 32}}


def make_config(corpus, output, model: str = "dbof", **overrides) -> TrainConfig:
    level = entry(model).builder.level
    values = dict(model=model, model_options=dict(SMALL.get(model, {})),
                  train_data=[str(p) for p in corpus.files[level]["train"]], output=str(output),
                  num_classes=NUM_CLASSES, epochs=2, batch_size=BATCH_SIZE, max_frames=40, log_every=1,
                  checkpoint_every=3, shuffle_buffer=16, device="cpu")
    return TrainConfig(**{**values, **overrides})


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_adam_at(monkeypatch, call: int) -> dict:
    """Makes the `call`-th Adam step raise KeyboardInterrupt (a killed run); returns the call counter,
    whose "at" can be set to None to stop interrupting."""
    original = torch.optim.Adam.step
    calls = {"n": 0, "at": call}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return calls


# checkpoint_every=3 and 7 steps an epoch: checkpoints at steps 3, 6, 7 (epoch end), 9, 12, 14
@pytest.mark.parametrize("model, kill_at, resumed_from", [
    ("dbof", 6, 3),    # random frame sampling; killed in the first epoch, resumes mid-epoch
    ("dbof", 12, 9),   # killed in the second epoch, after the epoch-end checkpoint
    ("moe", 10, 9),    # video level
    ("lstm", 5, 3),
])
def test_resume_after_a_kill_gives_the_weights_of_an_uninterrupted_run(tiny_corpus, tmp_path, monkeypatch,
                                                                       model, kill_at, resumed_from):
    train(make_config(tiny_corpus, tmp_path / "straight", model), progress=False)

    calls = interrupt_adam_at(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_corpus, tmp_path / "killed", model), progress=False)
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert torch.load(checkpoints(tmp_path / "killed")[-1], weights_only=True)["step"] == resumed_from
    calls.update(n=0, at=None)
    summary = train(make_config(tiny_corpus, tmp_path / "killed", model), resume=True, progress=False)

    assert (summary["steps"], summary["examples"]) == (14, 112)
    assert calls["n"] == 14 - resumed_from  # it went on from the checkpoint, not from the start
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))


def test_resume_of_a_finished_run_changes_nothing(tiny_corpus, tmp_path):
    config = make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1)
    train(config, progress=False)
    before = final_weights(tmp_path / "run")
    summary = train(config, resume=True, progress=False)
    assert summary["steps"] == 7
    assert_same_weights(before, final_weights(tmp_path / "run"))


def test_resume_with_more_epochs_continues_the_run(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "straight", "moe", epochs=2), progress=False)
    train(make_config(tiny_corpus, tmp_path / "staged", "moe", epochs=1), progress=False)
    summary = train(make_config(tiny_corpus, tmp_path / "staged", "moe", epochs=2), resume=True, progress=False)
    assert summary["steps"] == 14
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "staged"))


def test_two_runs_with_the_same_seed_give_identical_weights(tiny_corpus, tmp_path):
    for name in ("a", "b"):
        train(make_config(tiny_corpus, tmp_path / name, epochs=1), progress=False)
    train(make_config(tiny_corpus, tmp_path / "other_seed", epochs=1, seed=1), progress=False)
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    other = final_weights(tmp_path / "other_seed")
    assert not torch.equal(final_weights(tmp_path / "a")["clusters.weight"], other["clusters.weight"])


def test_a_second_run_into_the_same_output_is_refused(tiny_corpus, tmp_path):
    config = make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1)
    train(config, progress=False)
    before = final_weights(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(config, progress=False)
    assert_same_weights(before, final_weights(tmp_path / "run"))


def test_a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    original = VideoClassifier.loss
    calls = {"n": 0}

    def loss(self, logits, labels):
        calls["n"] += 1
        value = original(self, logits, labels)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(VideoClassifier, "loss", loss)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="loss is nan at step 5") as error:
        train(make_config(tiny_corpus, run_dir, checkpoint_every=2), progress=False)
    last_good = run_dir / "checkpoints" / "step-00000004.pt"
    assert str(last_good) in str(error.value)
    assert last_good.exists() and checkpoints(run_dir)[-1] == last_good
    assert not (run_dir / "model.pt").exists()
    assert torch.load(last_good, weights_only=True)["step"] == 4


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_infinite_gradients_stop_before_the_update(tiny_corpus, tmp_path, monkeypatch):
    original = VideoClassifier.loss
    calls = {"n": 0}

    def loss(self, logits, labels):  # a finite loss whose gradient is infinite at the 4th step
        calls["n"] += 1
        value = original(self, logits, labels)
        return InfiniteGradient.apply(value) if calls["n"] == 4 else value

    monkeypatch.setattr(VideoClassifier, "loss", loss)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="gradient norm is (inf|nan).* at step 4") as error:
        train(make_config(tiny_corpus, run_dir, "moe", checkpoint_every=2), progress=False)
    assert "step-00000002.pt" in str(error.value)
    assert all(torch.isfinite(v).all() for v in torch.load(checkpoints(run_dir)[-1], weights_only=True)["model"].values())


def test_resume_forgets_what_the_stopped_run_logged_after_its_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    calls = interrupt_adam_at(monkeypatch, 5)  # checkpoints at 3; steps 4 logged, then killed
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_corpus, run_dir), progress=False)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    calls["at"] = None
    train(make_config(tiny_corpus, run_dir), resume=True, progress=False)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 15))


def test_a_nan_loss_before_any_checkpoint_says_so(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(VideoClassifier, "loss", lambda self, logits, labels: logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match=r"step 1 .*none \(no checkpoint written yet\)"):
        train(make_config(tiny_corpus, tmp_path / "run", "moe"), progress=False)


def test_staircase_learning_rate():
    config = TrainConfig(model="moe", train_data="x", output="y", lr_decay=0.5, lr_decay_examples=100)
    assert [staircase_lr(config, 0.1, seen) for seen in (0, 99, 100, 250, 300)] == [0.1, 0.1, 0.05, 0.025, 0.0125]


def test_the_logged_learning_rate_follows_the_staircase(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", lr=0.01, lr_decay=0.5, lr_decay_examples=20), progress=False)
    logged = {record["step"]: record["lr"] for record in read_metrics(run_dir) if "lr" in record}
    assert sorted(logged) == list(range(1, 15))
    for step, lr in logged.items():
        seen_before = (step - 1) * BATCH_SIZE
        assert lr == pytest.approx(0.01 * 0.5 ** (seen_before // 20))


def model_with_large_gradients() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    for parameter in model.parameters():
        parameter.grad = 10 * torch.randn_like(parameter)
    model[1].bias.grad = torch.full_like(model[1].bias, 1e-3)  # one small gradient
    return model


def test_per_parameter_clipping_bounds_each_gradient_norm():
    model = model_with_large_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model, "per_parameter", 1.0)
    for old, parameter in zip(before, model.parameters()):
        norm = parameter.grad.norm()
        if old.norm() > 1.0:
            assert norm == pytest.approx(1.0, rel=1e-4)
            torch.testing.assert_close(parameter.grad, old / old.norm(), rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(parameter.grad, old)


def test_global_clipping_bounds_the_total_norm_and_keeps_the_direction():
    model = model_with_large_gradients()
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    clip_gradients(model, "global", 2.0)
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert after.norm() == pytest.approx(2.0, rel=1e-4)
    torch.testing.assert_close(after, before * (2.0 / before.norm()), rtol=1e-4, atol=1e-6)


def test_no_clipping_leaves_the_gradients():
    model = model_with_large_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model, "none", 1.0)
    assert all(torch.equal(old, p.grad) for old, p in zip(before, model.parameters()))


def test_the_loop_clips_every_gradient(tiny_corpus, tmp_path, monkeypatch):
    norms = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        norms.append([p.grad.norm().item() for group in self.param_groups for p in group["params"]
                      if p.grad is not None])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    train(make_config(tiny_corpus, tmp_path / "run", epochs=1, clip_norm=0.01), progress=False)
    assert len(norms) == 7
    assert max(max(step_norms) for step_norms in norms) <= 0.01 * (1 + 1e-4)


def test_l2_shrinks_the_classifier_weights(tiny_corpus, tmp_path):
    norms = {}
    for l2 in (0.0, 10.0):
        run_dir = tmp_path / f"l2-{l2}"
        train(make_config(tiny_corpus, run_dir, "logistic", l2=l2, epochs=3, lr=0.01), progress=False)
        model = load_model(run_dir)
        norms[l2] = model.head.linear.weight.norm().item()
    assert norms[10.0] < 0.5 * norms[0.0]


def test_retention_keeps_the_last_checkpoints(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", checkpoint_every=2, keep_checkpoints=2), progress=False)
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000012.pt", "step-00000014.pt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000012.pt", "step-00000012.pt.sha256", "step-00000014.pt", "step-00000014.pt.sha256"]
    last = torch.load(checkpoints(run_dir)[-1], weights_only=True)
    assert (last["step"], last["epoch"], last["batches_in_epoch"], last["examples_seen"]) == (14, 2, 0, 112)
    assert_same_weights(last["model"], final_weights(run_dir))


def test_metrics_log_training_and_validation(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    config = make_config(tiny_corpus, run_dir, log_every=2,
                         valid_data=[str(p) for p in tiny_corpus.files["frame"]["validate"]])
    summary = train(config, progress=False)
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_gap" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12, 14]
    for record in steps:
        assert {"step", "loss", "lr", "examples_per_s", "batch_gap", "batch_hit_at_one", "batch_perr"} <= set(record)
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["lr"] == pytest.approx(0.01) and record["examples_per_s"] > 0
        for key in ("batch_gap", "batch_hit_at_one", "batch_perr"):
            assert 0.0 <= record[key] <= 1.0
    assert [(r["step"], r["epoch"]) for r in valid] == [(7, 1), (14, 2)]
    for record in valid:
        assert record["valid_num_videos"] == 16
        for key in ("valid_gap", "valid_map", "valid_hit_at_one", "valid_perr"):
            assert 0.0 <= record[key] <= 1.0
    assert summary["valid"] == {key.removeprefix("valid_"): value for key, value in valid[-1].items()
                                if key.startswith("valid_")}


def test_training_lowers_the_loss(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=4), progress=False)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert sum(losses[-7:]) < 0.8 * sum(losses[:7])


def test_config_yaml_round_trips(tiny_corpus, tmp_path):
    config = make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1, lr=0.003, clip="global",
                         model_options={"num_mixtures": 3})
    train(config, progress=False)
    assert TrainConfig.from_dict(load_yaml(tmp_path / "run" / "config.yaml")) == config
    assert load_model(tmp_path / "run").config["num_mixtures"] == 3


def test_load_model_gives_the_trained_model_in_eval_mode(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, epochs=1), progress=False)
    model = load_model(run_dir)
    assert not model.training and model.config["num_clusters"] == 64
    assert_same_weights(model.state_dict(), final_weights(run_dir))


def test_a_tail_batch_of_one_video_does_not_stop_batch_norm_models(tiny_corpus, tmp_path):
    # 56 training videos in batches of 11: the last batch of each epoch holds one video
    summary = train(make_config(tiny_corpus, tmp_path / "run", batch_size=11), progress=False)
    assert summary["steps"] == 10 and summary["examples"] == 110


@pytest.mark.parametrize("model", ["moe", "dbof", "lstm"])
def test_bf16_autocast_trains(tiny_corpus, tmp_path, model):
    summary = train(make_config(tiny_corpus, tmp_path / "run", model, epochs=1, precision="bf16"), progress=False)
    assert summary["steps"] == 7 and math.isfinite(summary["loss"])
    assert all(v.dtype != torch.bfloat16 for v in final_weights(tmp_path / "run").values())


def test_max_steps_stops_early_with_a_checkpoint(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(make_config(tiny_corpus, run_dir, "moe", max_steps=9, checkpoint_every=100), progress=False)
    assert summary["steps"] == 9
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000007.pt", "step-00000009.pt"]


def test_a_run_stopped_by_max_steps_resumes_where_it_stopped(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "straight", "moe", max_steps=12), progress=False)
    train(make_config(tiny_corpus, tmp_path / "staged", "moe", max_steps=9), progress=False)
    stopped = final_weights(tmp_path / "staged")
    assert train(make_config(tiny_corpus, tmp_path / "staged", "moe", max_steps=9), resume=True,
                 progress=False)["steps"] == 9  # already done: no step more
    assert_same_weights(stopped, final_weights(tmp_path / "staged"))
    assert train(make_config(tiny_corpus, tmp_path / "staged", "moe", max_steps=12), resume=True,
                 progress=False)["steps"] == 12
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "staged"))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("clip", "norm"),
                                          ("precision", "fp8"), ("keep_checkpoints", 0), ("max_steps", 0),
                                          ("lr_decay_examples", 0)])
def test_invalid_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(model="moe", train_data="x", output="y", **{field: value})


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\].*epochs"):
        TrainConfig.from_dict({"model": "moe", "train_data": "x", "output": "y", "epoch": 3})


def test_a_run_saved_before_a_rename_and_a_preset_edit_resumes_and_loads_as_it_was(tiny_corpus, tmp_path,
                                                                                   monkeypatch):
    """A run records its whole model: neither renamed options (cluster_size), nor options added since
    (sample_at_eval, which then did not exist: every frame at evaluation), nor a preset of its model's
    name edited after it was saved, change what it resumes or loads."""
    from yt8m.train.checkpoint import atomic_save, load_checkpoint

    run = tmp_path / "old"
    train(make_config(tiny_corpus, run, epochs=1), progress=False)
    for path in checkpoints(run):  # what a checkpoint of the earlier version held
        state = load_checkpoint(path)
        options = dict(state["model_config"])
        options["cluster_size"] = options.pop("num_clusters")
        del options["sample_at_eval"], options["batch_norm_convention"], options["init_convention"]
        state["model_config"] = options
        state["train_config"]["model_options"] = {"cluster_size": 64, "hidden_size": 32}
        atomic_save(state, path)
    (run / "model.pt").unlink()
    monkeypatch.setenv("YT8M_CONFIG_DIR", str(tmp_path))  # a `dbof` preset of other sizes, written since
    (tmp_path / "dbof.yaml").write_text("model: dbof\noptions: {num_clusters: 16, hidden_size: 8}\n")
    config = make_config(tiny_corpus, run, epochs=2, model_options={"cluster_size": 64, "hidden_size": 32})
    with pytest.raises(ValueError, match=r"cluster_size is now num_clusters"):
        train(config, resume=True, progress=False)  # today's name is asked for...
    config = make_config(tiny_corpus, run, epochs=2)
    assert train(config, resume=True, progress=False)["steps"] == 14  # ...and the old run resumes under it
    model = load_model(run / "checkpoints" / checkpoints(run)[-1].name)
    assert model.config["num_clusters"] == 64 and model.config["sample_at_eval"] is False
    assert model.eval_sampling is None
