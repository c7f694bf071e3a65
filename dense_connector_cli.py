"""Entry point of the `dense-connector` console script.

It runs `dense_connector/cli.py` without importing the `dense_connector` package first: the package's `__init__`
imports torch and transformers to register its classes with the Auto classes, which takes seconds that
`dense-connector --help` and `--version` do not need. The package is imported when a subcommand runs.
"""

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    module = sys.modules.get("dense_connector.cli")
    if module is None:
        package = importlib.util.find_spec("dense_connector")  # finds the package without running its __init__
        spec = importlib.util.spec_from_file_location(
            "dense_connector.cli", Path(package.submodule_search_locations[0]) / "cli.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.main()


if __name__ == "__main__":
    sys.exit(main())
