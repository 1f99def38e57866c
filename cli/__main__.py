"""``python -m xpeft.cli ...``: the same as the ``xpeft`` console script."""

import sys

from xpeft.cli.main import main

sys.exit(main())
