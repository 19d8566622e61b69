"""Command line: a thin shell over the public functions. Mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from cptune.demo import DemoSettings, format_table, run_demo

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""


def _demo_parser(sub) -> None:
    defaults = DemoSettings()
    p = sub.add_parser("demo", help="zero-shot vs ICL vs CPT on a built-in dataset (the main job)",
                       description=DemoSettings.__doc__)
    helps = {
        "model": "embedded default name, local folder, .gguf file or hub id",
        "dataset": "built-in dataset",
        "shots": "demonstrations in the context (balanced across classes)",
        "test_size": "balanced test examples, disjoint from the shots",
        "seed": "seed of the split and of training",
        "steps": "CPT optimizer steps",
        "batch_size": "queries per step",
        "lr": "AdamW learning rate",
        "eps_input": "projection epsilon of input-text tokens",
        "eps_format": "projection epsilon of template tokens",
        "decay": "loss decay factor gamma in (0, 1]",
        "output": "folder for adapter/ and results.json",
    }
    for f in fields(DemoSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"{helps[f.name]} (default: %(default)s)")


def _run_demo(args) -> int:
    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    print(f"cptune demo: {settings}", flush=True)
    report = run_demo(settings)
    print()
    print(f"{settings.dataset}, {settings.shots} shots, {settings.test_size} test examples, seed {settings.seed}, "
          f"model {settings.model}")
    print(format_table(report))
    print(f"adapter saved to {settings.output}/adapter; results in {settings.output}/results.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptune", description="Context-aware Prompt Tuning for few-shot classification")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cptune`` command."""
    args = build_parser().parse_args(argv)
    handlers = {"demo": _run_demo}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, UserError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"cptune: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cptune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
