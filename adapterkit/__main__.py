"""`python -m adapterkit ...`: the same command line as the `adapterkit` script."""
import sys

from adapterkit.train.cli.main import main

sys.exit(main())
