import pytest
import torch
import torch.nn.functional as F
from small_models import SMALL, inputs

from yt8m.models import build
from yt8m.models.cascade import add_cascade
from yt8m.models.layers import frame_mask, l2_normalize, masked_mean

NUM_CLASSES = 6


def small(name: str, **overrides):
    torch.manual_seed(0)
    return build(name, num_classes=NUM_CLASSES, **{**SMALL[name], **overrides})


def stage_inputs(model, batch) -> list[torch.Tensor]:
    """What each MoE of the model's chain reads, caught by hooks."""
    seen = []
    hooks = [stage.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for stage in model.chain.stages]
    with torch.no_grad():
        model(*batch)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("previous", ["all", "last"])
def test_each_stage_reads_its_feature_and_the_relu_l2_projections_of_the_earlier_stages(previous):
    model = small("chaining_moe", previous=previous).eval()  # 3 MoEs, every feature the normalised means
    with torch.no_grad():  # a hand-made projection: a negative bias, so the ReLU zeroes some units
        for projection in model.chain.projections:
            # unit i reads class i % C with weight (i + 1) / 2: (i + 1) p / 2 - 0.5 < 0 for i = 0, > 0 for i = 7
            scale = (torch.arange(8)[:, None] + 1) / 2
            projection.weight.copy_(torch.eye(NUM_CLASSES)[torch.arange(8) % NUM_CLASSES] * scale)
            projection.bias.fill_(-0.5)
    batch = inputs(model)
    x = l2_normalize(torch.cat(batch[:2], -1))
    seen = stage_inputs(model, batch)
    projected = []
    for stage, moe in enumerate(model.chain.stages):
        earlier = projected if previous == "all" else projected[-1:]
        torch.testing.assert_close(seen[stage], torch.cat([x, *earlier], -1))
        p = torch.sigmoid(moe(seen[stage]))
        if stage < 2:
            hidden = torch.stack([(i + 1) / 2 * p[:, i % NUM_CLASSES] for i in range(8)], -1) - 0.5
            assert (hidden < 0).any() and (hidden > 0).any()
            projected.append(torch.relu(hidden) / torch.relu(hidden).norm(dim=-1, keepdim=True))
    assert seen[2].shape[-1] == 1152 + 8 * (2 if previous == "all" else 1)


def test_the_loss_weighs_the_final_stage_by_one_minus_s_and_every_earlier_stage_by_s():
    model = small("chaining_moe", aux_loss_weight=0.3).train()
    batch = inputs(model)
    labels = (torch.rand(len(batch[2]), NUM_CLASSES, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    outputs = model(*batch)
    stages = model.chain([l2_normalize(torch.cat(batch[:2], -1))] * 3)
    torch.testing.assert_close(outputs["logits"], stages[-1])
    assert len(outputs["aux_logits"]) == 2

    def bce(logits):
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / len(labels)

    expected = 0.7 * bce(stages[2]) + 0.3 * (bce(stages[0]) + bce(stages[1]))
    torch.testing.assert_close(model.loss(outputs, labels), expected)


@pytest.mark.parametrize("name", ["chaining_moe", "chaining_cnn", "chaining_lstm_cnn", "chaining_lstm",
                                  "multiresolution_lstm"])
def test_eval_returns_the_last_stage_and_training_its_dict(name):
    model = small(name)
    batch = inputs(model)
    with torch.no_grad():
        trained = model.train()(*batch)
        model.eval()
        evaluated = model(*batch)
        stages = model.chain(model.forward_features(*batch))
    torch.testing.assert_close(evaluated, stages[-1])
    torch.testing.assert_close(trained["logits"], evaluated)  # no dropout or BatchNorm in these models
    assert len(trained["aux_logits"]) == len(model.chain.stages) - 1
    assert model.mixes_classes
    assert model.classifier_weights() == model.chain.classifier_weights()
    with pytest.raises(ValueError, match="no single head"):
        add_cascade(model, 4)


def test_chaining_cnn_stages_after_the_first_read_the_raw_frame_mean():
    model = small("chaining_cnn").eval()
    batch = inputs(model)
    seen = stage_inputs(model, batch)
    frames = torch.cat(batch[:2], -1)
    mean = masked_mean(frames, frame_mask(batch[2], frames.shape[1]))
    assert seen[0].shape[-1] == 16  # the first CNN's pooled map alone
    for stage in (1, 2):
        torch.testing.assert_close(seen[stage][:, :1152], mean)
        assert seen[stage].shape[-1] == 1152 + 16 + 8 + 8 * stage  # mean, map, FC(mean), projections


def test_deep_cnn_chains_the_input_mean_and_each_layers_map():
    model = small("chaining_cnn", cnn_layers=2).eval()
    assert [stage.gates.in_features for stage in model.chain.stages] == [1152, 16 + 8, 16 + 16]
    with pytest.raises(ValueError, match="num_stages = cnn_layers"):
        small("chaining_cnn", cnn_layers=3)


def test_multiresolution_halves_the_frames_at_each_resolution_keeping_every_second_output():
    model = small("multiresolution_lstm").eval()
    num_frames = torch.tensor([10, 3, 1, 0, 7])
    rgb, audio, _ = inputs(model, num_frames=num_frames)
    with torch.no_grad():
        levels = model.sequences(rgb, audio, num_frames)
        outputs, _ = model.resolutions[0](model.inputs(rgb, audio), num_frames, layers="all")
    assert [x.shape[1] for x, _, _ in levels] == [10, 5, 3]
    assert [counts.tolist() for _, counts, _ in levels] == [[10, 3, 1, 0, 7], [5, 2, 1, 0, 4], [3, 1, 1, 0, 2]]
    torch.testing.assert_close(levels[1][0][0], outputs[0, 1::2])  # SELECT: frames 1, 3, 5, 7, 9
    assert [memory.shape[-1] for _, _, memory in levels] == [2 * 8 + 2 * 4] * 3


def lstm_parameters(in_dim: int, hidden: int) -> int:
    return 4 * hidden * (in_dim + hidden) + 8 * hidden  # PyTorch's two bias vectors


def moe_parameters(in_dim: int, classes: int, mixtures: int) -> int:
    return in_dim * classes * (mixtures + 1) + in_dim * classes * mixtures + classes * mixtures


def test_chaining_lstm_preset_has_the_hand_counted_parameters_at_paper_size():
    with torch.device("meta"):
        model = build("monkeytyping_chaining_lstm", num_classes=4716)
    stack = lstm_parameters(1152, 1024) + lstm_parameters(1024, 1024)
    chain = moe_parameters(2048, 4716, 4) + 2 * moe_parameters(2048 + 200, 4716, 4) + 2 * (4716 * 200 + 200)
    assert sum(p.numel() for p in model.parameters()) == 3 * stack + chain


def test_chaining_cnn_preset_has_the_hand_counted_parameters_at_paper_size():
    with torch.device("meta"):
        model = build("monkeytyping_chaining_cnn", num_classes=4716)
    conv = 1152 * (1 * 128 + 2 * 128 + 3 * 256)  # no bias
    later = 1152 + 512 + 128
    chain = moe_parameters(512, 4716, 4) + sum(moe_parameters(later + 128 * k, 4716, 4) for k in range(1, 5))
    expected = 5 * conv + (1152 * 128 + 128) + chain + 4 * (4716 * 128 + 128)
    assert sum(p.numel() for p in model.parameters()) == expected
