"""Reading a shard up to its damage (no Ray): which samples survive a cut at any byte offset."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipelines.dataset.decode import IMAGE_FIELD
from pipelines.dataset.shard_reader import ShardSamples
from pipelines.dataset.shards import write_tar
from tests.fixtures import image_bytes

N = 6


def _shard() -> bytes:
    buf = io.BytesIO()
    write_tar(buf, [(f"s000000_{p:07d}", "png", image_bytes("L", size=(20, 20), seed=p), {"sample_index": p})
                    for p in range(N)])
    return buf.getvalue()


def member_ends(data: bytes) -> dict[str, list[tuple[str, int, int]]]:
    """Key -> (member name, first data byte, end of data) of an intact tar, from tarfile's own offsets."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            out.setdefault(member.name.split(".", 1)[0], []).append(
                (member.name, member.offset_data, member.offset_data + member.size))
    return out


def whole_before(data: bytes, cut: int) -> list[int]:
    """Positions of the samples whose members all end at or before byte ``cut``."""
    ends = member_ends(data)
    return [pos for pos, key in enumerate(sorted(ends)) if max(e for _, _, e in ends[key]) <= cut]


def _read(data: bytes, expected: int | None = N) -> tuple[list[dict], ShardSamples]:
    samples = ShardSamples(io.BytesIO(data), "shard-000000.tar", expected)
    return list(samples), samples


def test_an_intact_shard_gives_every_sample_with_its_members() -> None:
    data = _shard()
    rows, samples = _read(data)
    assert [r["__key__"] for r in rows] == [f"s000000_{p:07d}" for p in range(N)]
    assert all(set(r) == {"__key__", "__url__", IMAGE_FIELD, "json"} for r in rows)
    assert samples.damage is None and samples.read == N


def _cuts(data: bytes) -> dict[str, int]:
    ends = member_ends(data)
    keys = sorted(ends)
    (json3, png3) = ends[keys[3]]
    return {
        "inside the fourth sample's image data": png3[1] + 100,
        "between a sample's json and its image": json3[2] + 10,
        "right after a sample's last member": png3[2],
        "inside the next header": png3[2] + 600,
        "inside the first header": 100,
        "nothing left": 0,
    }


@pytest.mark.parametrize("where", ["inside the fourth sample's image data", "between a sample's json and its image",
                                   "right after a sample's last member", "inside the next header",
                                   "inside the first header", "nothing left"])
def test_a_cut_anywhere_keeps_exactly_the_whole_samples_before_it(where: str) -> None:
    data = _shard()
    cut = _cuts(data)[where]
    rows, samples = _read(data[:cut])
    kept = [int(r["__key__"].rsplit("_", 1)[1]) for r in rows]
    assert kept == whole_before(data, cut)
    assert kept == {"inside the fourth sample's image data": [0, 1, 2],
                    "between a sample's json and its image": [0, 1, 2],
                    "right after a sample's last member": [0, 1, 2, 3], "inside the next header": [0, 1, 2, 3],
                    "inside the first header": [], "nothing left": []}[where]
    assert all(IMAGE_FIELD in r and "json" in r for r in rows)
    assert samples.read == len(kept) and samples.damage is not None


def test_without_an_expected_count_an_end_at_a_sample_boundary_is_not_damage() -> None:
    data = _shard()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmember(f"s000000_{4:07d}.json").offset  # the header of sample 4: samples 0-3 whole
    rows, samples = _read(data[:boundary], expected=None)
    assert len(rows) == 4 and samples.damage is None
    rows, samples = _read(data[:boundary])  # with the count from dataset.json the shortfall is damage
    assert len(rows) == 4 and samples.damage == "the tar ends after 4 of 6 samples"
