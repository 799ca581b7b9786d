import json

import numpy as np
import pytest
import torch

from yt8m.ensemble.store import MissingVideosError, ScoreStore, StoreWriter, copy_store, data_digest, write_store


def batches(probabilities: torch.Tensor, ids: list[str], size: int):
    for start in range(0, len(ids), size):
        yield ids[start:start + size], probabilities[start:start + size]


@pytest.fixture
def scores() -> tuple[list[str], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = [f"v{i:03d}" + "x" * (i % 7) for i in range(53)]  # ids of several lengths
    ids[5], ids[6] = "a\rb", "é-ü"  # a carriage return and non-ASCII characters are ids like any
    return ids, torch.rand(53, 30, generator=generator)


@pytest.mark.parametrize("top_k", [5, None, 30, 100])
def test_a_store_round_trips_through_numpy_alone(tmp_path, scores, top_k):
    ids, probabilities = scores
    path = write_store(tmp_path / "s", batches(probabilities, ids, 8), 30, top_k=top_k, source={"kind": "test"})
    header = json.loads((path / "header.json").read_text())
    assert header["num_videos"] == 53 and header["num_classes"] == 30
    dense = top_k is None or top_k >= 30
    assert header["top_k"] == (None if dense else top_k)
    read_ids = np.load(path / "ids.npy", mmap_mode="r")
    assert [i.decode() for i in read_ids] == ids
    stored = np.load(path / "scores.npy", mmap_mode="r")
    assert stored.dtype == np.float16
    if dense:
        assert not (path / "classes.npy").exists()
        np.testing.assert_array_equal(stored, probabilities.numpy().astype(np.float16))
    else:
        classes = np.load(path / "classes.npy", mmap_mode="r")
        expected_scores, expected_classes = torch.topk(probabilities, top_k, dim=1)
        np.testing.assert_array_equal(classes, expected_classes.numpy())
        np.testing.assert_array_equal(stored, expected_scores.numpy().astype(np.float16))
        assert (np.diff(stored.astype(np.float32), axis=1) <= 0).all()  # best first


def test_dense_reads_zero_for_a_class_outside_the_top_k(tmp_path, scores):
    ids, probabilities = scores
    store = ScoreStore(write_store(tmp_path / "s", batches(probabilities, ids, 16), 30, top_k=4))
    rows = np.array([3, 0, 52, 7])
    dense = store.dense(rows)
    for out_row, row in zip(dense, rows):
        kept = torch.topk(probabilities[row], 4).indices
        expected = torch.zeros(30)
        expected[kept] = probabilities[row][kept].half().float()
        torch.testing.assert_close(out_row, expected, rtol=0, atol=0)
    torch.testing.assert_close(store.dense(np.arange(5, 9)), store.dense(np.array([5, 6, 7, 8])))


def test_rows_are_found_by_id_and_unknown_ids_named(tmp_path, scores):
    ids, probabilities = scores
    store = ScoreStore(write_store(tmp_path / "s", batches(probabilities, ids, 16), 30))
    wanted = [ids[10], ids[2], ids[52]]
    np.testing.assert_array_equal(store.rows_of(wanted), [10, 2, 52])
    with pytest.raises(MissingVideosError, match=r"no scores for 2 video\(s\) .*nope, v000xxxxxxxxx"):
        store.rows_of([ids[1], "nope", "v000xxxxxxxxx"])


def test_a_store_is_published_whole_or_not_at_all(tmp_path, scores):
    ids, probabilities = scores
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", 30) as writer:
        writer.add(ids[:8], probabilities[:8])
        raise RuntimeError("stopped midway")
    assert list(tmp_path.iterdir()) == []
    write_store(tmp_path / "s", batches(probabilities, ids, 16), 30)
    with pytest.raises(FileExistsError):
        StoreWriter(tmp_path / "s", 30)


def test_bad_stores_and_batches_are_clear_errors(tmp_path, scores):
    ids, probabilities = scores
    with pytest.raises(ValueError, match="not a prediction store"):
        ScoreStore(tmp_path)
    path = write_store(tmp_path / "s", batches(probabilities, ids, 16), 30)
    header = json.loads((path / "header.json").read_text())
    (path / "header.json").write_text(json.dumps({**header, "num_videos": 54}))
    with pytest.raises(ValueError, match=r"shape \(53,\), but header.json says \(54,\)"):
        ScoreStore(path)
    with StoreWriter(tmp_path / "t", 30) as writer, pytest.raises(ValueError, match="expected shape"):
        writer.add(ids[:3], probabilities[:2])


def test_copy_store_refuses_to_replace_what_is_not_a_store(tmp_path, scores):
    ids, probabilities = scores
    path = write_store(tmp_path / "s", batches(probabilities, ids, 16), 30)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a prediction store"):
        copy_store(path, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an empty folder takes the store
    assert ScoreStore(copy_store(path, tmp_path / "empty")).num_videos == 53
    copy = copy_store(path, tmp_path / "copy")
    with pytest.raises(FileExistsError, match="--overwrite"):
        copy_store(path, copy)
    copy_store(path, copy, overwrite=True)
    np.testing.assert_array_equal(ScoreStore(copy).scores, ScoreStore(path).scores)


def test_the_data_digest_follows_the_file_list_not_its_order(tmp_path):
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
    paths = [str(tmp_path / name) for name in "abc"]
    before = data_digest(paths)
    assert before == data_digest(paths[::-1])
    assert before != data_digest(paths[:2])
    (tmp_path / "a").write_bytes(b"longer")
    assert data_digest(paths) != before
