"""``python -m mep_hw`` is ``mep-hw``."""

import sys

from mep_hw.cli import main

sys.exit(main())
