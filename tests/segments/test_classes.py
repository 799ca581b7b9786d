import re

import numpy as np
import pytest
import torch
from small_models import SMALL, inputs
from torch import nn

from yt8m.models import available, build, entry
from yt8m.segments.classes import class_positions, find_whitelist, read_whitelist, remap_head

VIDEO_CLASSES = 12
WHITELIST = np.array([1, 4, 5, 9, 11])
PROBABILITY_GATED = [name for name in available() if entry(name).defaults.get("gated_moe")]  # WILLOW's gated MoE
# models whose heads read every class's prediction (Chaining's projections): sliced, they mix in fewer classes
MIXES_CLASSES = [name for name in available() if getattr(entry(name).builder, "mixes_classes", False)]


def write_lines(path, *lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the whitelist file


def test_read_whitelist_agrees_with_the_synthetic_corpus_and_is_found_from_its_segment_shards(tiny_corpus):
    shards = [str(path) for path in tiny_corpus.files["segment"]["validate"]]
    assert find_whitelist(shards) == tiny_corpus.segment_label_ids.absolute()
    whitelist = read_whitelist(find_whitelist(shards))
    assert whitelist.dtype == np.int64
    np.testing.assert_array_equal(whitelist, tiny_corpus.whitelist)


def test_read_whitelist_keeps_file_order_and_accepts_crlf_and_a_blank_last_line(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_bytes(b"Index\r\n3\r\n7\r\n1200\r\n\r\n")
    np.testing.assert_array_equal(read_whitelist(path), [3, 7, 1200])


@pytest.mark.parametrize("lines, message", [
    (("Id", "1"), r"line 1: expected the header 'Index', found 'Id'"),
    ((), r"line 1: expected the header 'Index', found an empty file"),
    (("Index", "1", "x2"), r"line 3: expected a non-negative integer class id, found 'x2'"),
    (("Index", "-1"), r"line 2: expected a non-negative integer class id, found '-1'"),
    (("Index", "1", "4", "4"), r"line 4: class id 4 is listed twice"),
    (("Index", "1", "5", "4"), r"line 4: class ids must be ascending, found 4 after 5"),
    (("Index",), r"no class ids after the header"),
], ids=["header", "empty file", "not an integer", "negative", "duplicate", "unsorted", "no ids"])
def test_read_whitelist_names_the_file_and_line_of_a_bad_entry(tmp_path, lines, message):
    path = write_lines(tmp_path / "segment_label_ids.csv", *lines)
    with pytest.raises(ValueError, match=message) as error:
        read_whitelist(path)
    assert str(path) in str(error.value)


def test_find_whitelist_looks_beside_the_first_file_and_up_to_three_folders_above(tmp_path):
    beside = write_lines(tmp_path / "beside" / "segment_label_ids.csv", "Index", "0")
    assert find_whitelist([str(beside.parent / "a.tfrecord"), "elsewhere/b.tfrecord"]) == beside
    root = write_lines(tmp_path / "segment_label_ids.csv", "Index", "0")
    assert find_whitelist([str(tmp_path / "1" / "2" / "3" / "a.tfrecord")]) == root
    searched = ", ".join(str(tmp_path.joinpath(*"1234"[:n])) for n in (4, 3, 2, 1))
    with pytest.raises(FileNotFoundError, match=f"no segment_label_ids.csv in {re.escape(searched)} .*"
                                                "config key `segment_label_ids`"):
        find_whitelist([str(tmp_path / "1" / "2" / "3" / "4" / "a.tfrecord")])


def test_class_positions_inverts_the_whitelist():
    positions = class_positions(WHITELIST, VIDEO_CLASSES)
    np.testing.assert_array_equal(positions, [-1, 0, -1, -1, 1, 2, -1, -1, -1, 3, -1, 4])
    assert positions.dtype == np.int64
    with pytest.raises(ValueError, match=r"in \[0, 11\), found \[11\]"):
        class_positions(WHITELIST, 11)


# ----------------------------------------------------------------------------- the head


def small_model(name: str, num_classes: int, **overrides) -> nn.Module:
    """A small model with random weights and random BatchNorm affine terms and running statistics, in eval mode."""
    torch.manual_seed(num_classes)
    model = build(name, num_classes=num_classes, **{**SMALL.get(name, {}), **overrides})
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
        for parameter in model.parameters():
            if parameter.dim() == 1:  # biases and BatchNorm affine terms (often 0 or 1 as built)
                parameter.add_(torch.randn_like(parameter), alpha=0.3)
    return model.eval()


def remapped(name: str) -> tuple[nn.Module, nn.Module]:
    video = small_model(name, VIDEO_CLASSES)
    segment = small_model(name, len(WHITELIST))
    segment.load_state_dict(remap_head(video.state_dict(), segment, WHITELIST, VIDEO_CLASSES), strict=True)
    return video, segment


@pytest.mark.parametrize("name", [name for name in available() if name not in PROBABILITY_GATED + MIXES_CLASSES])
def test_the_remapped_segment_model_gives_the_video_logits_of_the_whitelisted_classes(name):
    video, segment = remapped(name)
    batch = inputs(video)
    with torch.no_grad():
        expected = video(*batch)[:, WHITELIST]
        torch.testing.assert_close(segment(*batch), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PROBABILITY_GATED)
def test_probability_gating_is_sliced_to_the_whitelist_and_mixes_in_fewer_classes(name):
    video, segment = remapped(name)
    batch = inputs(video)
    whitelist = torch.from_numpy(WHITELIST)
    torch.testing.assert_close(segment.probability_gating.gate.weight,
                               video.probability_gating.gate.weight[whitelist][:, whitelist], rtol=0, atol=0)
    with torch.no_grad():
        video_features, segment_features = video.forward_features(*batch), segment.forward_features(*batch)
        torch.testing.assert_close(segment_features, video_features, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(segment.head(segment_features), video.head(video_features)[:, WHITELIST],
                                   rtol=1e-6, atol=1e-6)
        # the gate of a whitelisted class no longer sees the other classes' probabilities
        assert not torch.allclose(segment(*batch), video(*batch)[:, WHITELIST], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", MIXES_CLASSES)
def test_a_model_that_mixes_classes_is_sliced_to_the_whitelist_and_runs(name):
    video, segment = remapped(name)
    batch = inputs(video)
    with torch.no_grad():
        logits = segment(*batch)
    assert logits.shape == (len(batch[0]), len(WHITELIST)) and torch.isfinite(logits).all()


def test_probability_gating_models_are_registered():
    assert "netvlad" in PROBABILITY_GATED


def test_remap_head_returns_contiguous_tensors_in_the_segment_models_dtypes():
    video = small_model("moe", VIDEO_CLASSES)
    segment = small_model("moe", len(WHITELIST)).double()
    state = remap_head(video.state_dict(), segment, WHITELIST, VIDEO_CLASSES)
    assert all(tensor.dtype == torch.float64 and tensor.is_contiguous() for tensor in state.values())
    torch.testing.assert_close(state["head.experts.bias"].view(5, 2),
                               video.head.experts.bias.double().view(12, 2)[WHITELIST], rtol=0, atol=0)


def test_remap_head_rejects_another_architecture_with_the_key_and_both_shapes():
    video = small_model("dbof", VIDEO_CLASSES, hidden_size=32)
    with pytest.raises(ValueError, match=r"hidden\.weight: video shape \[32, 64\] and segment shape \[16, 64\]"):
        remap_head(video.state_dict(), small_model("dbof", len(WHITELIST), hidden_size=16), WHITELIST, VIDEO_CLASSES)
    video = small_model("netvlad", VIDEO_CLASSES)
    with pytest.raises(ValueError, match=r"probability_gating\.gate\.weight: in the video state dict "
                                         r"\(shape \[12, 12\]\)"):
        remap_head(video.state_dict(), small_model("netvlad", len(WHITELIST), gated_moe=False), WHITELIST,
                   VIDEO_CLASSES)
    with pytest.raises(ValueError, match=r"head\.linear\.weight: in the segment model \(shape \[5, 1152\]\)"):
        remap_head({}, small_model("logistic", len(WHITELIST)), WHITELIST, VIDEO_CLASSES)


def test_remap_head_rejects_a_whitelist_outside_the_video_classes():
    video = small_model("logistic", VIDEO_CLASSES)
    with pytest.raises(ValueError, match=r"in \[0, 12\), found \[12\]"):
        remap_head(video.state_dict(), small_model("logistic", 2), np.array([3, 12]), VIDEO_CLASSES)
