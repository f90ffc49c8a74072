"""`python -m cli COMMAND ...`: the `maskdino` command, for launchers that start a module
(`torchrun -m cli train ...`, `deepspeed --module cli train ...`, the Ray job entrypoint)."""
import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main())
