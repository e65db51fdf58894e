"""`synth-cpt`: run from a terminal what the sensor and the daemon do, in the same Dagster instance.

Runs go through the instance at $DAGSTER_HOME, so every one shows in the UI with its logs, checks and
metadata, exactly as if the sensor had launched it. One module per domain registers its commands.
"""

from __future__ import annotations

import argparse
import sys

from synth_cpt.cli import gc, generation, ingest, lineage, outputs, prompts
from synth_cpt.cli.common import quiet_console
from synth_cpt.core.config import ConfigError, load_config


def cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else load_config()
    print(config.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synth-cpt", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline YAML (default: $SYNTH_CPT_CONFIG or the shipped defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    for domain in (ingest, generation, outputs, prompts, lineage, gc):
        domain.register(sub)
    cfg = sub.add_parser("config", help="validate the pipeline config and print it with every default filled in")
    cfg.set_defaults(func=cmd_config)
    return parser


# Commands that load Dagster, vLLM or transformers: their warnings and engine logs go to a log file.
NOISY = {"ingest", "generate", "synthesize", "mix", "evals", "prompts", "serve"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in NOISY:
            return args.func(args)
        with quiet_console(args.command, args.config):
            try:
                return args.func(args)
            finally:
                from synth_cpt.generation.settings import release_engines

                release_engines(force=True)  # while its shutdown messages still go to the log
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
