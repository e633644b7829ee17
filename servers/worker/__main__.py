"""``python -m servers.worker ...`` is ``trio-jobs worker ...``."""

import sys

from ..cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
