"""``python -m servers.cli ...`` is ``trio-jobs ...``."""

import sys

from . import main

sys.exit(main())
