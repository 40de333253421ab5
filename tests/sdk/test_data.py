"""Tests for edgetune.data: demo text, user files, held-out split, packing and sampling."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgetune.data import (
    PROFILES,
    BlockSampler,
    DataError,
    discover_device_files,
    generate_device_texts,
    load_texts,
    pack_blocks,
    profile_for_device,
    split_heldout,
    write_demo_data,
)

N_PROFILES = len(PROFILES)
_HEADER = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d) [^,]+, [^:]+ \d+: ")


def _words(texts: list[str]) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


# --- synthetic ------------------------------------------------------------------------------


def test_profiles_are_distinct_and_enough():
    names = [p.name for p in PROFILES]
    assert len(names) >= 6
    assert len(set(names)) == len(names)
    assert profile_for_device(N_PROFILES + 2) is PROFILES[2]


def test_generation_is_byte_identical_for_a_seed(tmp_path: Path):
    paths_a = write_demo_data(tmp_path / "a", n_devices=3, n_records=30, seed=5)
    paths_b = write_demo_data(tmp_path / "b", n_devices=3, n_records=30, seed=5)
    assert [p.name for p in paths_a] == ["device-1.txt", "device-2.txt", "device-3.txt"]
    for a, b in zip(paths_a, paths_b):
        assert a.read_bytes() == b.read_bytes()
    assert generate_device_texts(1, 30, seed=6) != generate_device_texts(1, 30, seed=5)


def test_output_is_pinned():
    # Guards "identical across platforms and versions": if this changes on purpose (new
    # vocabulary or templates), update the expected line in the same commit.
    assert generate_device_texts(0, 1, seed=0) == [
        "2024-03-24 18:02 shift B, filler 1: routine check, fill height 19 mm below neck, in spec."
    ]


def test_devices_sharing_a_profile_get_different_text():
    first, same_profile = generate_device_texts(0, 50), generate_device_texts(N_PROFILES, 50)
    assert profile_for_device(0) is profile_for_device(N_PROFILES)
    assert not set(first) & set(same_profile)


def test_records_are_single_line_entries_in_time_order():
    for device in range(N_PROFILES):
        records = generate_device_texts(device, 60, seed=1)
        assert len(records) == 60
        stamps = []
        for record in records:
            assert "\n" not in record
            match = _HEADER.match(record)
            assert match, record
            stamps.append(match.group(1))
            assert record.endswith(".")
            assert 1 <= len(re.split(r"(?<=\.) ", record)) <= 3, record
        assert stamps == sorted(stamps)


def test_text_is_non_iid_across_profiles():
    # Word sets of two devices on the same line overlap far more than those of different lines.
    within = [_jaccard(_words(generate_device_texts(i, 150)),
                       _words(generate_device_texts(i + N_PROFILES, 150)))
              for i in range(N_PROFILES)]
    across = [_jaccard(_words(generate_device_texts(i, 150)), _words(generate_device_texts(j, 150)))
              for i in range(N_PROFILES) for j in range(i + 1, N_PROFILES)]
    assert min(within) > 0.8
    assert max(across) < 0.35
    assert min(within) > 2.5 * max(across)


def test_write_demo_data_writes_one_record_per_line_and_no_temp_files(tmp_path: Path):
    paths = write_demo_data(tmp_path / "new" / "dir", n_devices=2, n_records=7)
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["device-1.txt", "device-2.txt"]
    lines = paths[1].read_text(encoding="utf-8").splitlines()
    assert lines == generate_device_texts(1, 7)
    assert paths[1].read_bytes().endswith(b".\n")


@pytest.mark.parametrize("kwargs, field", [({"n_devices": 0}, "n_devices"),
                                           ({"n_devices": 1, "n_records": 0}, "n_records")])
def test_write_demo_data_rejects_bad_counts(tmp_path: Path, kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field):
        write_demo_data(tmp_path, **kwargs)


def test_generate_rejects_negative_arguments():
    with pytest.raises(ValueError, match="device_index"):
        generate_device_texts(-1, 3)
    with pytest.raises(ValueError, match="n_records"):
        generate_device_texts(0, -1)


# --- files ----------------------------------------------------------------------------------


def test_load_txt_skips_blank_lines_and_strips(tmp_path: Path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"\xef\xbb\xbffirst entry\r\n\n   \n  second entry  \nthird")
    assert load_texts(path) == ["first entry", "second entry", "third"]


def test_load_jsonl(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "two \u00e9"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n"
                    + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert load_texts(path) == ["one", "two \u00e9"]


@pytest.mark.parametrize(
    "name, content, line, expected",
    [
        ("d.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', 2, "invalid JSON"),
        ("d.jsonl", b'{"text": "ok"}\n\n["a list"]\n', 3, "expected a JSON object"),
        ("d.jsonl", b'{"body": "x"}\n', 1, 'missing the "text" field (keys found: body)'),
        ("d.jsonl", b'{"text": "ok"}\n{"text": 42}\n', 2, '"text" must be a string, got int'),
        ("d.jsonl", b'{"text": "  "}\n', 1, '"text" is empty'),
        ("d.txt", b"fine\n\xff\xfe broken\n", 2, "not valid UTF-8"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path: Path, name: str, content: bytes, line: int,
                                        expected: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_texts(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert expected in message


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.txt", None, "file not found"),
        ("d.csv", b"a,b\n", "unsupported file type '.csv'; use .txt"),
        ("d.txt", b"", "no records"),
        ("d.jsonl", b"\n  \n", "no records"),
    ],
)
def test_load_file_level_errors(tmp_path: Path, name: str, content: bytes | None, expected: str):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_texts(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_rejects_a_folder(tmp_path: Path):
    with pytest.raises(DataError, match="not a regular file"):
        load_texts(tmp_path)


def test_discover_device_files_sorted_naturally(tmp_path: Path):
    for name in ("device-10.txt", "device-2.jsonl", "device-1.txt", ".hidden.txt", "notes.md"):
        (tmp_path / name).write_text("x\n")
    found = discover_device_files(tmp_path)
    assert list(found) == ["device-1", "device-2", "device-10"]
    assert found["device-2"] == tmp_path / "device-2.jsonl"


def test_discover_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no .txt or .jsonl files") as info:
        discover_device_files(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="not a folder"):
        discover_device_files(tmp_path / "absent")
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"two files for device 'a' \(a.jsonl and a.txt\)"):
        discover_device_files(tmp_path)


def test_discover_rejects_names_that_cannot_be_device_ids(tmp_path: Path):
    (tmp_path / "my device.txt").write_text("x\n")
    with pytest.raises(DataError, match="rename the file"):
        discover_device_files(tmp_path)


# --- split ----------------------------------------------------------------------------------


def test_split_heldout_is_deterministic_and_sized():
    records = [f"r{i}" for i in range(50)]
    train, heldout = split_heldout(records, fraction=0.2, seed=3)
    assert (train, heldout) == split_heldout(records, fraction=0.2, seed=3)
    assert len(heldout) == 10 and len(train) == 40
    assert Counter(train + heldout) == Counter(records)
    assert train == sorted(train, key=records.index)  # original order kept
    assert split_heldout(records, fraction=0.2, seed=4)[1] != heldout


def test_split_heldout_bounds():
    assert split_heldout(["a", "b"], fraction=0.9) in ((["a"], ["b"]), (["b"], ["a"]))
    train, heldout = split_heldout([str(i) for i in range(10)], fraction=0.01, min_heldout=3)
    assert (len(train), len(heldout)) == (7, 3)
    with pytest.raises(DataError, match="need at least 2"):
        split_heldout(["only"])
    with pytest.raises(DataError, match="need at least 4"):
        split_heldout(["a", "b", "c"], min_heldout=3)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_heldout_validates_fraction(fraction: float):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        split_heldout(["a", "b", "c"], fraction=fraction)


def test_pack_blocks_without_eos_drops_the_tail():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], seq_len=4, eos_id=None)
    assert blocks.dtype == np.int64
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_pack_blocks_with_eos_ends_every_document():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> exactly three blocks
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])


def test_pack_blocks_errors():
    with pytest.raises(DataError, match=r"too small: 5 tokens .* seq_len=6"):
        pack_blocks([[1, 2], [3]], seq_len=6, eos_id=9)
    with pytest.raises(DataError, match="too small: 0 tokens"):
        pack_blocks([], seq_len=2, eos_id=None)
    with pytest.raises(ValueError, match="seq_len"):
        pack_blocks([[1]], seq_len=0, eos_id=None)


def _row_ids(batch: np.ndarray) -> list[int]:
    return batch[:, 0].tolist()  # each block's first token is its index


def test_block_sampler_visits_every_block_once_per_epoch():
    n, t = 7, 3
    blocks = np.repeat(np.arange(n, dtype=np.int64)[:, None], t, axis=1)  # (N, T), row i = i
    sampler = BlockSampler(blocks, seed=11)
    batches = [sampler.next_batch(3) for _ in range(7)]  # 21 blocks = 3 epochs
    assert all(b.shape == (3, t) for b in batches)
    seen = [i for b in batches for i in _row_ids(b)]
    epochs = [seen[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert sampler.state == (3, 0)


def test_block_sampler_is_deterministic_and_resumable():
    blocks = np.arange(40, dtype=np.int64).reshape(10, 4)
    a, b = BlockSampler(blocks, seed=2), BlockSampler(blocks, seed=2)
    stream_a = [a.next_batch(4) for _ in range(6)]
    stream_b = [b.next_batch(4) for _ in range(6)]
    for x, y in zip(stream_a, stream_b):
        np.testing.assert_array_equal(x, y)
    other = BlockSampler(blocks, seed=3)
    assert [_row_ids(other.next_batch(4)) for _ in range(3)] != [_row_ids(x) for x in stream_a[:3]]

    resumed = BlockSampler(blocks, seed=2)
    resumed.next_batch(4)
    epoch, position = resumed.state
    fresh = BlockSampler(blocks, seed=2, epoch=epoch, position=position)
    for _ in range(5):
        np.testing.assert_array_equal(fresh.next_batch(4), resumed.next_batch(4))


def test_block_sampler_batch_larger_than_epoch_and_validation():
    blocks = np.arange(6, dtype=np.int64).reshape(3, 2)
    sampler = BlockSampler(blocks, seed=0)
    batch = sampler.next_batch(7)  # spans three epochs
    assert batch.shape == (7, 2)
    assert sampler.state == (2, 1)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.next_batch(0)
    with pytest.raises(ValueError, match="shape"):
        BlockSampler(np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="position"):
        BlockSampler(blocks, position=3)
