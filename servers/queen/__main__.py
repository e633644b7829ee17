"""``python -m servers.queen ...`` is ``trio-jobs queen ...``."""

import sys

from ..cli import main

sys.exit(main(["queen", *sys.argv[1:]]))
