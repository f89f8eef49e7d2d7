"""`python -m rlhf`: the `rlhf` command."""

from rlhf.cli import run

run()
