"""The `maskdino` command line (the top layer: it may import every other package of ours).
`maskdino COMMAND ...` and `python -m cli COMMAND ...` (what torchrun and the deepspeed launcher run)
are the same program."""
from cli.app import build_parser, main

__all__ = ["build_parser", "main"]
