"""`python -m dense_connector.training ARGS` (and `accelerate launch -m dense_connector.training ARGS`): the
`dense-connector train` command."""

import sys

from .command import main


if __name__ == "__main__":
    sys.exit(main())
