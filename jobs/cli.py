"""The ``secu`` console script: the same subcommands as ``python -m jobs.<name>``."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS = {
    "ingest": "jobs.ingest",
    "train": "jobs.train",
    "infer": "jobs.infer",
    "evaluate": "jobs.evaluate",
    "report": "jobs.report",
    "self-label": "jobs.self_label",
    "recluster": "jobs.recluster",
    "demo": "jobs.demo",
}

USAGE = """usage: secu [--version] [--help] <command> [<args>]

Deep clustering of image collections with SeCu on Ray. Commands:
  ingest     write images into WebDataset shards with stable ids
  train      train SeCu (Ray Train, coordinator actor, checkpoints)
  infer      write cluster assignments to Parquet
  evaluate   ACC/NMI/ARI and cluster statistics of an inference run
  report     a static HTML report of the clusters
  self-label fine-tune a trained run on its confident images (second stage)
  recluster  scheduled reclustering: ingest new images, warm start, infer, drift summary
  demo       the whole chain on Fashion-MNIST on this machine

`secu <command> --help` shows the options of a command. Every command is also
`python -m jobs.<command>`, the form to use with `ray job submit`.
"""


def _version() -> str:
    try:
        return version("secu-ray")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the job module of the subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "--version":
        print(f"secu {_version()}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"secu: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command])
    except ModuleNotFoundError as err:
        if err.name == COMMANDS[command]:
            print(f"secu: the {command!r} command is not available in this version", file=sys.stderr)
            return 2
        raise
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
