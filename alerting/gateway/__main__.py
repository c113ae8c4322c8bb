"""``python -m alerting.gateway``: the ``prism gateway`` command on its own."""

import sys

from alerting.gateway.cli import main

sys.exit(main())
