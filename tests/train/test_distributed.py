"""DDP training through torchrun on the CPU (gloo): two ranks, one run directory."""

import json
import subprocess
import sys

import pytest
import torch

from yt8m.train import load_model


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_trains_one_model_with_two_ranks(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "yt8m.cli", "train", "moe",
               "--train-data", str(tiny_corpus.out_dir / "video" / "train*.tfrecord"),
               "--valid-data", str(tiny_corpus.out_dir / "video" / "validate*.tfrecord"),
               "--output", str(run_dir), "--num-classes", "12", "--epochs", "2", "--batch-size", "8", "--quiet",
               "--set", "device=cpu"]  # gloo, also on a machine with fewer GPUs than ranks
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained moe") == 1  # rank 0 reports
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_gap" in r]
    assert len(valid) == 2 and valid[-1]["valid_num_videos"] == tiny_corpus.num_videos["validate"]
    # the ranks split the 56 training videos: rank 0 takes fewer than all 7 batches of an epoch
    assert 0 < max(r["step"] for r in records) < 14
    model = load_model(run_dir)
    assert model.config["name"] == "moe"
    # the examples the ranks trained on, summed (not steps x batch x ranks: 64 a epoch here)
    assert torch.load(run_dir / "model.pt", weights_only=True)["examples_seen"] == 2 * 56


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_max_steps_stops_every_rank_though_their_shards_differ(tiny_corpus, tmp_path):
    # rank 0 reads 32 videos an epoch (4 batches), rank 1 24 (3): their step counts part within an epoch
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "yt8m.cli", "train", "moe", "--train-data", str(tiny_corpus.out_dir / "video" / "train*.tfrecord"),
               "--output", str(run_dir), "--num-classes", "12", "--epochs", "5", "--batch-size", "8", "--max-steps", "4",
               "--quiet", "--set", "device=cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run_dir / "model.pt", weights_only=True)["step"] == 4
