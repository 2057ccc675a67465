"""``python -m mars_ray`` = the ``mars`` command."""

import sys

from mars_ray.cli import main

sys.exit(main())
