"""Small configurations of every registered model, and their inputs, shared by the tests of several folders
(`tests/` is on the import path: its conftest.py puts it there)."""

import torch

from yt8m.data import AUDIO_DIM, RGB_DIM

SMALL = {"dbof": {"num_clusters": 64, "hidden_size": 32}, "lstm": {"hidden_size": 32}, "gru": {"hidden_size": 16},
         "nextvlad": {"num_clusters": 4, "groups": 2, "expansion": 1, "hidden_size": 16},
         "mix_nextvlad": {"num_clusters": 4, "groups": 2, "expansion": 1, "hidden_size": 16},
         "mod_nextvlad": {"num_subtrees": 2, "num_members": 2, "num_clusters": 4, "groups": 2, "expansion": 1,
                          "hidden_size": 16},
         **{name: {"num_clusters": 8, "hidden_size": 32}
            for name in ("netvlad", "netrvlad", "netfv", "nonlocal_netvlad")},
         **{name: {"num_clusters": 64, "hidden_size": 32} for name in ("soft_dbof", "gated_dbof")},
         # the 2017 models ([monkeytyping2017], [uts2017])
         "recurrent": {"hidden_size": 8, "num_mixtures": 2},
         "hierarchical_rnn": {"hidden_size": 8, "clip_frames": 3, "dropout": 0.0},
         "multirate_rnn": {"hidden_size": 8, "num_layers": 1, "dropout": 0.0},
         "context_rnn": {"hidden_size": 8, "num_layers": 1, "clip_frames": 3},
         "parallel_moe": {"num_mixtures": 3, "class_group": 5},
         "attention_lstm": {"hidden_size": 16, "attention_groups": 3, "num_mixtures": 2},
         "attention_vlad": {"num_clusters": 4, "attention_dim": 8},
         "multihop_attention_gru": {"hidden_size": 8, "attention_dim": 8, "num_hops": 3},
         "chaining_moe": {"num_stages": 2, "projection_dim": 8, "num_mixtures": 2},
         "chaining_cnn": {"num_stages": 2, "channels": (4, 4, 8), "projection_dim": 8, "num_mixtures": 2},
         "chaining_lstm_cnn": {"num_stages": 2, "channels": (4, 4, 8), "first_channels": (4, 8, 4),
                               "recurrent_cells": (8, 4), "projection_dim": 8, "num_mixtures": 2},
         "chaining_lstm": {"num_stages": 1, "hidden_size": 8, "projection_dim": 8, "num_mixtures": 2},
         "multiresolution_lstm": {"num_stages": 2, "hidden_sizes": (8, 4), "projection_dim": 8, "num_mixtures": 2},
         "text_cnn": {"channels": [16, 16, 32], "num_mixtures": 2},  # its L2-normalised max: wider to overfit
         "cnn_lstm": {"channels": [4, 4, 8], "hidden_size": 8, "num_mixtures": 2},
         "multiscale_cnn_lstm": {"num_scales": 3, "channels": [4, 4, 8], "hidden_size": 8, "num_mixtures": 2},
         "resnet1d": {"stem_channels": 8, "widths": [8, 8, 16, 16], "blocks": [1, 2, 1, 1]}}
NUM_FRAMES = torch.tensor([10, 3, 1, 7, 10])


def inputs(model, num_frames: torch.Tensor = NUM_FRAMES, max_frames: int = 10, seed: int = 0):
    """A batch as `prepare_batch` makes it: (rgb, audio, num_frames), padding frames zero."""
    generator = torch.Generator().manual_seed(seed)
    num_frames = torch.as_tensor(num_frames)
    batch = len(num_frames)
    if model.level == "video":
        return torch.randn(batch, RGB_DIM, generator=generator), torch.randn(batch, AUDIO_DIM, generator=generator), \
            torch.ones(batch, dtype=torch.int64)
    rgb = torch.randn(batch, max_frames, RGB_DIM, generator=generator)
    audio = torch.randn(batch, max_frames, AUDIO_DIM, generator=generator)
    padding = torch.arange(max_frames)[None, :] >= num_frames[:, None]
    rgb[padding], audio[padding] = 0.0, 0.0
    return rgb, audio, num_frames
