"""``python -m prism_tui.cli``: the ``prism`` command without the console script."""

import sys

from prism_tui.cli import main

sys.exit(main())
