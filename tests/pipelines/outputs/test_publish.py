"""Publishing an output, interrupted at every storage step: readers see the old whole set, the new whole set, or
nothing with a refusal; never a mix (pandas, pyarrow.dataset, DuckDB globs and this project's reader; no Ray)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import pipelines.outputs.publish as publish_mod
from pipelines.outputs.assignments import output_dir, published_files, read_assignments, read_marker
from pipelines.outputs.evaluation import evaluate_assignments
from pipelines.outputs.publish import new_attempt, publish, remove_stale_staging, staging_dir
from pipelines.outputs.schema import SCHEMA_VERSION, assignment_schema
from pipelines.storage import Storage, join
from tests.pipelines.run_builders import make_dataset

RUN, NAME, N = "run", "assignments", 30
COLUMNS = ["sample_index", "checkpoint"]
OUT = output_dir(RUN, NAME)


class _Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` in the code under test can catch it."""


def _table(tag: str, version: int = SCHEMA_VERSION) -> pa.Table:
    """N rows of one head; the ``checkpoint`` column says which publish (``tag``) wrote them."""
    schema = assignment_schema(1, version=version)
    ids = np.arange(N, dtype=np.int64)
    columns: dict[str, Any] = {
        "sample_index": ids, "key": [f"k{i}" for i in ids], "shard": ["shard-000000.tar"] * N,
        "source": [f"/lake/img{i}.png" for i in ids], "cluster_h0": (ids % 3).astype(np.int32),
        "similarity_h0": np.full(N, 0.5, np.float32), "confidence_h0": np.full(N, 0.9, np.float32),
        "run_id": [RUN] * N, "checkpoint": [tag] * N, "checkpoint_epoch": np.zeros(N, np.int32)}
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


def _marker(tag: str) -> dict[str, Any]:
    return {"run_id": RUN, "name": NAME, "schema_version": SCHEMA_VERSION, "dataset": "tiny", "train_dataset": "tiny",
            "checkpoint": tag, "checkpoint_epoch": 0, "num_heads": 1, "ks": [3], "embedding_dim": None}


def _stage(storage: Storage, tag: str, files: int = 3) -> str:
    """Write ``_table(tag)`` into a fresh staging folder in ``files`` files, as Ray's writer would."""
    staging = staging_dir(OUT, new_attempt())
    table = _table(tag)
    bounds = np.linspace(0, N, files + 1).astype(int)
    for i in range(files):
        buf = io.BytesIO()
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), buf)
        storage.write_bytes_atomic(join(staging, f"{i}_000000_{tag}.parquet"), buf.getvalue())
    return staging


def _publish(storage: Storage, tag: str) -> dict[str, Any]:
    remove_stale_staging(storage, OUT)
    return publish(storage, OUT, _stage(storage, tag), _marker(tag))


def _write_legacy(storage: Storage, tag: str) -> None:
    """An output as the code before versions wrote it: files and a version-1 marker in the prefix itself,
    schema version 1 (no ``source``), and a leftover staging folder of a killed attempt inside the prefix."""
    table = _table(tag, version=1)
    files = []
    for i, part in enumerate((table.slice(0, 10), table.slice(10))):
        buf = io.BytesIO()
        pq.write_table(part, buf)
        storage.write_bytes_atomic(join(OUT, f"part-{i:05d}.parquet"), buf.getvalue())
        files.append({"path": f"part-{i:05d}.parquet", "rows": part.num_rows})
    storage.write_bytes_atomic(join(OUT, "_staging-20250101T000000-00000000", "x.parquet"), buf.getvalue())
    marker = _marker(tag) | {"schema_version": 1, "marker_version": 1, "files": files, "rows": N}
    storage.write_bytes_atomic(join(OUT, "_SUCCESS"), json.dumps(marker).encode())


@contextlib.contextmanager
def _killed_at(step: int) -> Iterator[list[str]]:
    """Count publish's storage steps; the one numbered ``step`` raises ``_Killed`` instead of running."""
    done: list[str] = []

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if len(done) == step:
                raise _Killed(name)
            done.append(name)
            return fn(*args, **kwargs)
        return run

    with pytest.MonkeyPatch.context() as mp:
        for name in ("_rename", "_swap_link", "delete_dir"):
            mp.setattr(publish_mod, name, wrap(name, getattr(publish_mod, name)))
        for name in ("write_bytes_atomic", "delete"):
            mp.setattr(Storage, name, wrap(name, getattr(Storage, name)))
        yield done


def _rows(table: pa.Table | pd.DataFrame) -> list[tuple[int, str]]:
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    if len(frame) == 0:
        return []
    return sorted(zip(frame["sample_index"].tolist(), frame["checkpoint"].tolist(), strict=True))


def _outcome(read: Callable[[], Any], expected: dict[str, list[tuple[int, str]]]) -> str:
    """``A`` / ``B`` (exactly that whole set), ``nothing`` (no rows), ``refused`` (an error), else ``MIXED``."""
    try:
        rows = _rows(read())
    except (OSError, pa.ArrowException, duckdb.Error):  # FileNotFoundError is an OSError
        return "refused"
    if not rows:
        return "nothing"
    return next((tag for tag, want in expected.items() if rows == want), f"MIXED {len(rows)} rows")


def _duckdb(sql: str) -> pd.DataFrame:
    return duckdb.connect().execute(sql).df()


def _local_readers(storage: Storage) -> dict[str, Callable[[], Any]]:
    path = storage.path(OUT)
    return {
        "pandas.read_parquet(dir)": lambda: pd.read_parquet(path, columns=COLUMNS),
        "pyarrow.dataset": lambda: pads.dataset(path, format="parquet").to_table(columns=COLUMNS),
        "duckdb '<dir>/*.parquet'": lambda: _duckdb(f"SELECT sample_index, checkpoint FROM '{path}/*.parquet'"),
        "duckdb '<dir>/**/*.parquet'": lambda: _duckdb(f"SELECT sample_index, checkpoint FROM '{path}/**/*.parquet'"),
        "read_assignments": lambda: read_assignments(storage, RUN, NAME, columns=COLUMNS),
    }


def _s3_readers(storage: Storage) -> dict[str, Callable[[], Any]]:
    path, fs = storage.path(OUT), storage.filesystem
    return {
        "pandas.read_parquet(prefix)": lambda: pd.read_parquet(path, filesystem=fs),
        "pyarrow.dataset": lambda: pads.dataset(path, filesystem=fs, format="parquet").to_table(),
        "read_assignments": lambda: read_assignments(storage, RUN, NAME, columns=COLUMNS),
    }


EXPECTED = {"A": [(i, "A") for i in range(N)], "B": [(i, "B") for i in range(N)]}


def _kill_at_every_step(storage_at: Callable[[int], Storage], start: Callable[[Storage], None],
                        readers: Callable[[Storage], dict[str, Callable[[], Any]]]) -> list[dict[str, str]]:
    """For step k = 0, 1, ...: publish A (``start``), publish B killed at step k, record what each reader sees,
    then re-run the publish of B and check it completes. Ends with the first k that no longer interrupts."""
    seen = []
    for step in range(100):
        storage = storage_at(step)
        start(storage)
        staging = _stage(storage, "B")
        with _killed_at(step) as done:
            try:
                publish(storage, OUT, staging, _marker("B"))
            except _Killed:
                pass
            else:
                break
        outcome = {reader: _outcome(read, EXPECTED) for reader, read in readers(storage).items()}
        seen.append(outcome | {"killed before": f"step {step} (after {done})"})
        if outcome["read_assignments"] == "refused":
            with pytest.raises(FileNotFoundError, match="_SUCCESS is missing"):
                read_marker(storage, RUN, NAME)
        _publish(storage, "B")  # the re-run completes it
        assert {_outcome(read, EXPECTED) for read in readers(storage).values()} <= {"B", "nothing"}
        assert storage.list(join("runs", RUN, "_staging"), recursive=True) == []
    else:
        raise AssertionError("publish never completed")
    return seen


def _publish_a(storage: Storage) -> None:
    """Two versions, so that publishing B has a version to prune after its switch (a step to be killed at)."""
    _publish(storage, "Z")
    _publish(storage, "A")


def test_local_publish_killed_at_every_step_shows_old_or_new_never_a_mix(tmp_path: Path) -> None:
    seen = _kill_at_every_step(lambda k: Storage(str(tmp_path / f"k{k}")), _publish_a, _local_readers)
    for outcome in seen:
        states = {v for k, v in outcome.items() if k != "killed before"}
        assert len(states) == 1 and states <= {"A", "B"}, outcome  # every reader agrees, each on a whole set
    order = [next(iter({v for k, v in o.items() if k != "killed before"})) for o in seen]
    assert order == sorted(order) and order[0] == "A" and order[-1] == "B", seen  # old until the switch, then new


def test_publish_over_an_output_of_older_code_is_old_nothing_or_new(tmp_path: Path) -> None:
    def legacy_then_cleanup(storage: Storage) -> None:
        _write_legacy(storage, "A")
        assert remove_stale_staging(storage, OUT) == ["_staging-20250101T000000-00000000"]  # first, under the lock

    seen = _kill_at_every_step(lambda k: Storage(str(tmp_path / f"k{k}")), legacy_then_cleanup, _local_readers)
    order = []
    for outcome in seen:
        states = {v for k, v in outcome.items() if k != "killed before"}
        assert len(states) == 1 and states <= {"A", "B", "refused"}, outcome
        order.append(states.pop())
    # The one moment between moving the old directory away and linking the new version: absent, refused.
    assert order[0] == "A" and "refused" in order, seen
    assert order == ["A"] * order.count("A") + ["refused"] * order.count("refused") + ["B"] * order.count("B")


def test_s3_publish_killed_at_every_step_serves_old_or_new_through_success(
        moto_endpoint: str, s3_bucket: str) -> None:
    def storage_at(k: int) -> Storage:
        return Storage(f"s3://{s3_bucket}/k{k}", s3_endpoint=moto_endpoint)

    seen = _kill_at_every_step(storage_at, _publish_a, _s3_readers)
    for outcome in seen:  # a glob of the prefix finds no data files on S3: nothing, never a partial set
        assert outcome["pandas.read_parquet(prefix)"] == outcome["pyarrow.dataset"] == "nothing", outcome
    order = [o["read_assignments"] for o in seen]
    assert order[0] == "A" and order[-1] == "B" and order == sorted(order), seen


def test_a_reader_that_listed_the_old_version_never_gets_new_files(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    _publish(storage, "A")
    listed_a = published_files(storage, RUN, NAME)
    discovered = pads.dataset(storage.path(OUT), format="parquet")  # lists the files now, opens them later
    _publish(storage, "B")
    with pytest.raises(FileNotFoundError):
        discovered.to_table()  # names are unique per version: the old names are not in the new folder
    # The replaced version stays until the next publish, so a reader holding its file list can finish.
    assert _rows(pq.read_table(listed_a)) == EXPECTED["A"]
    _publish(storage, "C")
    assert not any(Path(p).exists() for p in listed_a)
    assert len(list(Path(storage.path("runs", RUN, "_versions", NAME)).iterdir())) == 2


def test_outputs_of_older_code_still_read_and_get_sources_from_the_manifest(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", N, shard_size=N)
    _write_legacy(storage, "A")

    table = read_assignments(storage, RUN, NAME)
    assert table.schema.equals(assignment_schema(1, version=1)) and table.num_rows == N
    with_source = read_assignments(storage, RUN, NAME, columns=["sample_index", "source"])
    ids = with_source["sample_index"].to_pylist()
    assert with_source["source"].to_pylist() == [f"synthetic:train:{i}" for i in ids]
    assert evaluate_assignments(storage, RUN, NAME)["protocol"]["rows"] == N
    with pytest.raises(ValueError, match=r"has no columns \['nope'\]"):
        read_assignments(storage, RUN, NAME, columns=["nope"])

    _publish(storage, "B")  # the first publish over it moves the old directory aside and links the new version
    assert Path(storage.path(OUT)).is_symlink()
    assert _rows(read_assignments(storage, RUN, NAME, columns=COLUMNS)) == EXPECTED["B"]
    assert read_assignments(storage, RUN, NAME)["source"].to_pylist() == [f"/lake/img{i}" + ".png" for i in range(N)]


def test_duckdb_through_success_as_docs_inference_md_shows(tmp_path: Path) -> None:
    """The docs' DuckDB recipe for S3 (file list from ``_SUCCESS``), run against a local root."""
    docs = (Path(__file__).resolve().parents[3] / "docs" / "inference.md").read_text()
    statement = next(block for block in docs.split("```sql\n")[1:] if "SET VARIABLE files" in block).split(";")[0]
    storage = Storage(str(tmp_path))
    _publish(storage, "A")
    _publish(storage, "B")
    connection = duckdb.connect()
    connection.execute(statement.replace("s3://bucket/prefix/", f"{storage.root}/")
                       .replace("runs/fm1/assignments", f"runs/{RUN}/{NAME}"))
    rows = connection.execute("SELECT sample_index, checkpoint FROM read_parquet(getvariable('files'))").fetchall()
    assert sorted(rows) == EXPECTED["B"]
