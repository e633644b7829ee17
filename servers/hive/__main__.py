"""``python -m servers.hive ...`` is ``trio-jobs hive ...``."""

import sys

from ..cli import main

sys.exit(main(["hive", *sys.argv[1:]]))
