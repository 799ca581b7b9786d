import pytest
import torch

from yt8m.export.storage import (DEFAULT_MIN_ELEMENTS, STORAGES, dequantize, pack_state, quantize, stored_bytes,
                                 unpack_state)

EPS = torch.finfo(torch.float32).eps


def tolerance(minimum: float, maximum: float) -> float:
    """Half a step, plus float32 rounding of the levels."""
    return (maximum - minimum) / 510 + 4 * EPS * max(abs(minimum), abs(maximum))


def small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "big.weight": torch.randn(130, 140, generator=generator) * 0.05,  # 18,200 elements: quantized
        "big.bias": torch.randn(17_000, generator=generator),  # exactly the threshold: kept
        "norm.running_var": torch.rand(64, generator=generator) + 0.5,
        "norm.num_batches_tracked": torch.tensor(1234, dtype=torch.int64),
        "lengths": torch.arange(20_000, dtype=torch.int32),  # not floating: never quantized
        "mask": torch.tensor([True, False, True]),
    }


def payload_bytes(packed: dict) -> int:
    """Independent count of what a packed state holds: its tensors' bytes, plus 8 (min, max) per quantized one."""
    total = 0
    for entry in packed["tensors"].values():
        if isinstance(entry, dict):
            total += entry["codes"].untyped_storage().nbytes() + 8
        else:
            total += entry.untyped_storage().nbytes()
    return total


def test_quantize_hand_made_unit_range():
    x = torch.tensor([0.0, 1.0, 0.4, 0.25, 0.33, 0.999])
    codes, minimum, maximum = quantize(x)
    assert (minimum, maximum) == (0.0, 1.0)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    # round(x * 255): 0, 255, 102, 63.75 -> 64, 84.15 -> 84, 254.745 -> 255
    assert codes.tolist() == [0, 255, 102, 64, 84, 255]
    levels = torch.linspace(0.0, 1.0, 256)
    assert torch.equal(levels[0:2], torch.tensor([0.0, 1 / 255]))
    restored = dequantize(codes, minimum, maximum)
    assert restored.dtype == torch.float32
    assert torch.equal(restored, levels[codes.long()])
    assert restored.tolist() == pytest.approx([0.0, 1.0, 102 / 255, 64 / 255, 84 / 255, 1.0], abs=1e-7)
    assert (restored - x).abs().max().item() <= tolerance(0.0, 1.0)


def test_quantize_negative_to_positive_range():
    x = torch.tensor([[-1.5, 2.5, 0.0], [1.0, -0.7, -1.5]])
    codes, minimum, maximum = quantize(x)
    assert (minimum, maximum) == (-1.5, 2.5)
    # round((x + 1.5) * 255 / 4): 0, 255, 95.625 -> 96, 159.375 -> 159, 51
    assert codes.tolist() == [[0, 255, 96], [159, 51, 0]]
    restored = dequantize(codes, minimum, maximum)
    assert restored[0, 0].item() == -1.5 and restored[0, 1].item() == 2.5
    assert (restored - x).abs().max().item() <= tolerance(-1.5, 2.5)


def test_quantize_is_the_nearest_level():
    x = torch.randn(5_000, generator=torch.Generator().manual_seed(1)) * 3 + 1
    codes, minimum, maximum = quantize(x)
    assert (minimum, maximum) == (x.min().item(), x.max().item())
    levels = torch.linspace(minimum, maximum, 256)
    nearest = (x[:, None].double() - levels[None, :].double()).abs().argmin(dim=1)  # ties: the lower level
    assert torch.equal(codes.long(), nearest)
    step = (maximum - minimum) / 255
    formula = torch.round((x.double() - minimum) / step).long()
    assert (codes.long() - formula).abs().max().item() <= 1
    assert (codes.long() != formula).float().mean().item() < 0.01
    assert (dequantize(codes, minimum, maximum) - x).abs().max().item() <= tolerance(minimum, maximum)


def test_quantize_exact_tie_goes_to_the_lower_level():
    codes, minimum, maximum = quantize(torch.tensor([0.0, 127.5, 3.5, 255.0]))  # step 1: integer levels
    assert codes.tolist() == [0, 127, 3, 255]


def test_quantize_constant_tensor():
    x = torch.full((3, 4), 0.7)
    codes, minimum, maximum = quantize(x)
    assert minimum == maximum == torch.tensor(0.7).item()
    assert codes.tolist() == [[0] * 4] * 3
    assert torch.equal(dequantize(codes, minimum, maximum), x)


def test_quantize_max_and_min_at_several_places():
    x = torch.tensor([3.0, -1.0, 3.0, 0.2, 3.0, -1.0])
    codes, minimum, maximum = quantize(x)
    assert codes[[0, 2, 4]].tolist() == [255, 255, 255]
    assert codes[[1, 5]].tolist() == [0, 0]
    restored = dequantize(codes, minimum, maximum)
    assert restored[[0, 2, 4]].tolist() == [3.0] * 3 and restored[[1, 5]].tolist() == [-1.0] * 2


def test_quantize_rejects_what_it_cannot_code():
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.arange(5))
    with pytest.raises(ValueError, match="non-empty"):
        quantize(torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        quantize(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(3, dtype=torch.int8), 0.0, 1.0)
    with pytest.raises(ValueError, match="min <= max"):
        dequantize(torch.zeros(3, dtype=torch.uint8), 1.0, 0.0)


def test_min_elements_rule_is_more_than():
    state = {"below": torch.randn(16_999), "at": torch.randn(17_000), "above": torch.randn(17_001)}
    packed = pack_state(state, "int8-partial")
    assert packed["storage"] == "int8-partial" and packed["min_elements"] == DEFAULT_MIN_ELEMENTS == 17_000
    tensors = packed["tensors"]
    assert isinstance(tensors["above"], dict) and tensors["above"]["codes"].dtype == torch.uint8
    assert tensors["below"].dtype == tensors["at"].dtype == torch.float32
    restored = unpack_state(packed)
    assert torch.equal(restored["below"], state["below"]) and torch.equal(restored["at"], state["at"])
    above = state["above"]
    assert (restored["above"] - above).abs().max().item() <= tolerance(above.min().item(), above.max().item())

    custom = pack_state({"ten": torch.randn(10), "eleven": torch.randn(11)}, "int8-partial", min_elements=10)
    assert custom["min_elements"] == 10
    assert isinstance(custom["tensors"]["eleven"], dict) and isinstance(custom["tensors"]["ten"], torch.Tensor)
    assert stored_bytes(torch.randn(11), "int8-partial", 10) == 11 + 8
    assert stored_bytes(torch.randn(10), "int8-partial", 10) == 40


@pytest.mark.parametrize("storage", STORAGES)
def test_round_trips(storage):
    state = small_state()
    restored = unpack_state(pack_state(state, storage))
    assert list(restored) == list(state)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
            continue
        assert restored[name].dtype == torch.float32 and restored[name].shape == tensor.shape, name
        if storage == "fp32" or tensor.numel() <= DEFAULT_MIN_ELEMENTS and storage == "int8-partial":
            assert torch.equal(restored[name], tensor), name
        elif storage == "bf16":
            assert torch.equal(restored[name], tensor.to(torch.bfloat16).float()), name
        else:
            bound = tolerance(tensor.min().item(), tensor.max().item())
            assert (restored[name] - tensor).abs().max().item() <= bound, name


def test_pack_converts_other_floats_and_copies():
    weight = torch.randn(4, 8, dtype=torch.float64)
    base = torch.randn(100)
    packed = pack_state({"weight": weight, "view": base[10:20]}, "fp32")
    assert packed["tensors"]["weight"].dtype == torch.float32
    assert packed["tensors"]["view"].untyped_storage().nbytes() == 10 * 4  # not the 100-element buffer
    packed["tensors"]["view"].zero_()
    assert base[10:20].abs().sum() > 0  # the model's tensors are not aliased
    assert unpack_state(pack_state({"half": torch.ones(3, dtype=torch.float16)}, "bf16"))["half"].dtype \
        == torch.float32


@pytest.mark.parametrize("storage", STORAGES)
def test_packed_state_survives_save_and_safe_load(storage, tmp_path):
    state = small_state()
    packed = pack_state(state, storage)
    path = tmp_path / f"{storage}.pt"
    torch.save(packed, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["storage"] == storage and loaded["min_elements"] == DEFAULT_MIN_ELEMENTS
    expected, restored = unpack_state(packed), unpack_state(loaded)
    assert all(torch.equal(restored[name], expected[name]) for name in state)


@pytest.mark.parametrize("storage", STORAGES)
def test_stored_bytes_is_the_packed_payload(storage):
    state = small_state()
    packed = pack_state(state, storage, min_elements=1_000)
    assert sum(stored_bytes(t, storage, 1_000) for t in state.values()) == payload_bytes(packed)
    # and the count holds for the unpacked state too, as size reports compute it
    assert sum(stored_bytes(t, storage, 1_000) for t in unpack_state(packed).values()) == payload_bytes(packed)


def test_stored_bytes_by_scheme():
    weight, counter = torch.randn(200, 100), torch.tensor(3, dtype=torch.int64)
    assert stored_bytes(weight, "fp32") == 80_000
    assert stored_bytes(weight, "bf16") == 40_000
    assert stored_bytes(weight, "int8-partial") == 20_000 + 8
    assert stored_bytes(weight.double(), "fp32") == 80_000
    assert [stored_bytes(counter, storage) for storage in STORAGES] == [8, 8, 8]
    with pytest.raises(ValueError, match="storage: expected one of fp32, bf16, int8-partial, found 'int4'"):
        stored_bytes(weight, "int4")
    with pytest.raises(ValueError, match="min_elements"):
        pack_state({"weight": weight}, "int8-partial", min_elements=-1)


def test_int8_partial_is_about_four_times_smaller_on_a_real_model():
    from yt8m.models import build

    state = build("nextvlad", num_classes=100, num_clusters=16, groups=4, hidden_size=64).state_dict()
    sizes = {storage: sum(stored_bytes(t, storage) for t in state.values()) for storage in STORAGES}
    assert sizes["fp32"] == sum(t.numel() * t.element_size() for t in state.values())
    assert 3.5 < sizes["fp32"] / sizes["int8-partial"] < 4
    assert 1.9 < sizes["fp32"] / sizes["bf16"] <= 2
    assert sizes["int8-partial"] == payload_bytes(pack_state(state, "int8-partial"))


def malformed(change) -> dict:
    packed = pack_state({"weight": torch.randn(30), "small": torch.randn(3)}, "int8-partial", min_elements=20)
    change(packed)
    return packed


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("storage"), "missing key.*storage"),
    (lambda p: p.pop("tensors"), "missing key.*tensors"),
    (lambda p: p.update(format="yt8m-artifact"), "expected format 'yt8m-state' version 1"),
    (lambda p: p.update(storage="int4"), "storage: expected one of fp32, bf16, int8-partial, found 'int4'"),
    (lambda p: p.update(min_elements="many"), "min_elements: expected an integer >= 0"),
    (lambda p: p.update(tensors=[1, 2]), "expected a dict of tensors, found list"),
    (lambda p: p["tensors"]["weight"].pop("max"), r"'weight': expected keys \['codes', 'max', 'min'\]"),
    (lambda p: p["tensors"]["weight"].update(codes=p["tensors"]["weight"]["codes"].to(torch.int8)),
     "'weight': codes: expected a uint8 tensor, found torch.int8"),
    (lambda p: p["tensors"]["weight"].update(min=5.0, max=-5.0), "'weight': .*expected finite min <= max"),
    (lambda p: p["tensors"]["weight"].update(min="0"), "'weight': min: expected a number, found str"),
    (lambda p: p.update(min_elements=100), "'weight': quantized with 30 elements.*more than 100"),
    (lambda p: p.update(min_elements=1), "'small': 3 elements stored as torch.float32.*more than 1"),
    (lambda p: p.update(storage="bf16"), "'weight': a quantized entry in a bf16 state"),
    (lambda p: p["tensors"].update(small=torch.ones(3, dtype=torch.bfloat16)),
     "'small': expected torch.float32 under int8-partial, found torch.bfloat16"),
    (lambda p: p["tensors"].update(small=[1.0, 2.0]), "'small': expected a tensor or a quantized entry, found list"),
])
def test_malformed_packed_states_raise(change, message):
    with pytest.raises(ValueError, match=message):
        unpack_state(malformed(change))


def test_not_a_packed_state():
    with pytest.raises(ValueError, match="expected a dict, found Tensor"):
        unpack_state(torch.zeros(3))
    with pytest.raises(ValueError, match="state\\['x'\\]: expected a tensor, found float"):
        pack_state({"x": 1.0}, "fp32")
