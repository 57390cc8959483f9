"""``python -m gpuload``: the same command line as ``gpuload``."""

import sys

from gpuload.cli.main import main

sys.exit(main())
