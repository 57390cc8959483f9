"""gpuload against its peers and the hardware limits, in one run: the script
form of ``gpuload bench`` (same options; the code ships in gpuload.bench so
that an installed wheel runs it too).

    python bench/run.py --preset cpu-2gb [--modes warm] [--out bench/results]
"""

from __future__ import annotations

import sys

from gpuload.bench import main

if __name__ == "__main__":
    sys.exit(main())
