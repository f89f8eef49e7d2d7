"""`python -m rlhf`: the `rlhf` command."""

import sys

from rlhf.cli import main

sys.exit(main())
