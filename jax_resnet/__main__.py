"""`python -m jax_resnet COMMAND ...`: the same as the `jax-resnet` command."""

import sys

from jax_resnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
