"""``python -m kdcli``: the command line, as under ``torchrun -m kdcli``."""

from kdcli.cli import main

main()
