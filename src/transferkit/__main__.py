"""`python -m transferkit` (and `torchrun ... -m transferkit`): the command line."""

from .cli import main

main()
