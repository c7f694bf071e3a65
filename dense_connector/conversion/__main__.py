"""`python -m dense_connector.conversion --original ... --output ...`: the conversion's command line."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main())
