"""`python -m flatquant ...` is the `flatquant` command."""
import sys

from flatquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
