"""``python -m servers ...`` is ``trio-jobs ...``."""

import sys

from .cli import main

sys.exit(main())
