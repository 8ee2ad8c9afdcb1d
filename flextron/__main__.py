"""`python -m flextron` runs the command line (flextron.cli)."""

import sys

from flextron.cli import main

sys.exit(main())
