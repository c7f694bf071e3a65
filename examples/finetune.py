"""`dense-connector train` as a script, for `accelerate launch examples/finetune.py ARGS` (as is
`accelerate launch -m dense_connector.training ARGS`). Options, recipes and data: docs/training.md, or `--help`."""

import sys

from dense_connector.training.command import main


if __name__ == "__main__":
    sys.exit(main())
