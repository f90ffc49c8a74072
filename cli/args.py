"""What several commands share: the help layout (what the command does, what it needs, one example),
`key=value` overrides, the model and storage options of evaluate and predict, the Ray dashboard
address, and comma-separated lists."""
from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from core.config import load_config
from core.storage import Storage, StorageConfig

WIDTH = 100  # help paragraphs are wrapped here (RawDescriptionHelpFormatter keeps the example lines as written)


class CommandParser(argparse.ArgumentParser):
    """A command's parser that takes options between and after its positionals, so that
    `maskdino train CONFIG --dry-run run_dir=...` works: plain argparse matches `overrides` (nargs="*")
    empty before the option and then rejects the `key=value` after it. A parser with subcommands of
    its own (jobs, metrics) parses as plain argparse does (intermixed parsing does not support them)."""

    _intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if has_subcommands or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def paragraphs(*texts: str) -> str:
    """Each text wrapped to WIDTH; lines starting with two spaces (commands) are kept as they are."""
    out = []
    for text in texts:
        lines = text.splitlines() or [""]
        out.append("\n".join(line if line.startswith("  ") else textwrap.fill(line, WIDTH) for line in lines))
    return "\n\n".join(out)


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, *, required: str, example: str,
                details: Sequence[str] = (), **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does (summary, details), what it needs and one example;
    `summary` is also its line in the parent's command list."""
    return sub.add_parser(name, help=summary, description=paragraphs(summary[0].upper() + summary[1:] + ".",
                                                                      *details),
                          epilog=paragraphs(f"required: {required}", "example:\n  " + example),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_overrides(p: argparse.ArgumentParser, what: str, example: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{what}, e.g. {example}")


def comma_list(text: str) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`."""
    return [item.strip() for item in text.split(",") if item.strip()]


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="", help="Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                                                 "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model to run (a bundle, or a config with weights) and where: evaluate and predict."""
    p.add_argument("--model", default="", help="model bundle folder (local or s3://) with config.yaml, "
                                               "model.safetensors and categories.json")
    p.add_argument("--config", default="", help="model config YAML, instead of --model")
    p.add_argument("--weights", default="", help="with --config: .safetensors (ours) or the authors' .pth")
    p.add_argument("--categories", default="", help="with --config: categories.json for class names/ids")
    p.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="key=value",
                   help="model config override, e.g. --set inference.test_topk_per_image=50 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--storage", dest="storage_overrides", action="append", default=[], metavar="key=value",
                   help="storage setting, e.g. --storage endpoint_url=http://127.0.0.1:9000 (repeatable)")


def storage_from(overrides: Sequence[str]) -> Storage:
    """A Storage configured by `key=value` settings (endpoint_url=..., region=..., profile=...)."""
    return Storage(load_config(StorageConfig, None, list(overrides)))
