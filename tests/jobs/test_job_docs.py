"""jobs/README.md and the jobs' help state exactly the options and keys each job takes."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "jobs" / "README.md"
JOBS = ("ingest", "train", "self_label", "infer", "evaluate", "report", "recluster", "demo")
OPTIONS_CLASSES = {"ingest": ("pipelines.dataset.ingest", "IngestOptions"),
                   "infer": ("pipelines.outputs.inference", "InferenceOptions"),
                   "report": ("pipelines.outputs.report", "ReportOptions")}


def table() -> dict[str, list[str]]:
    """job -> the cells of its row in the README's options table."""
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(\w+)` \|(.*)\|$", line)
        if match and match.group(1) in JOBS:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def parser_options(name: str) -> tuple[set[str], set[str]]:
    """(every long option, the required ones) of a job's parser."""
    parser = importlib.import_module(f"jobs.{name}").build_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    longest = {a: max(a.option_strings, key=len) for a in actions}
    return set(longest.values()), {opt for a, opt in longest.items() if a.required}


def common_options(name: str) -> set[str]:
    """The options the README states for every job (its first paragraph under "Options of every job")."""
    common = {"--log-level", "--storage"}
    if name != "demo":
        common |= {"--s3-endpoint", "--s3-region"}
    if name != "evaluate":
        common |= {"--config", "--set"}
    return common


@pytest.mark.parametrize("name", JOBS)
def test_readme_table_states_exactly_the_options_of_the_job(name: str) -> None:
    options_cell = table()[name][0]
    documented = set(re.findall(r"`(--[a-z-]+)`", options_cell))
    required = set(re.findall(r"\*\*`(--[a-z-]+)`\*\*", options_cell))
    options, required_by_parser = parser_options(name)
    own = options - common_options(name) | ({"--storage"} if name == "demo" else set())
    assert documented == own
    assert required == required_by_parser - {"--storage"}
    assert common_options(name) <= options


@pytest.mark.parametrize("name", sorted(OPTIONS_CLASSES))
def test_documented_keys_are_the_options_dataclass_fields(name: str) -> None:
    module, cls = OPTIONS_CLASSES[name]
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert set(re.findall(r"`(\w+)`", table()[name][1])) == fields
    doc = importlib.import_module(f"jobs.{name}").__doc__ or ""
    listed = re.search(r"Options \(--config FILE .*?\): (.*?)\.\n", doc, re.S)
    assert listed is not None
    assert {k.strip() for k in listed.group(1).replace("\n", " ").split(",")} == fields


def test_evaluate_alone_has_no_settings() -> None:
    assert table()["evaluate"][1].startswith("(none")
    assert "--config" not in parser_options("evaluate")[0]
