"""`python -m seqtopk.cli`: the same as the `seqtopk` command."""

import sys

from seqtopk.cli import main

sys.exit(main())
