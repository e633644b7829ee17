"""``python -m servers.worker ...`` is ``trio-jobs worker ...``."""

import gc
import sys

from ..cli import main

code = main(["worker", *sys.argv[1:]])
# The worker has stopped (its jobs ended, its streams closed). Freezing what is left spares
# the interpreter's final collections, which took ~1 s of the hive's SIGKILL grace on a
# busy machine (0.1 s with this).
gc.freeze()
sys.exit(code)
