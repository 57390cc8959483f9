"""``gpuload bench``: gpuload against its peers and the hardware limits, in one run.

Shipped inside the package (not only as ``bench/run.py``) so that an
installed wheel, the Docker image's, runs it. Modules, one per concern:

* :mod:`.presets`: which synthetic models, and the 12 GB card arithmetic;
* :mod:`.contenders`: gpuload and the peers behind small adapters;
* :mod:`.limits`: pread into (pinned) memory, fio; :mod:`.gpu`: H2D, D2D,
  device memory, through torch or cupy;
* :mod:`.cold`: page-cache eviction, verified with mincore;
* :mod:`.oracle`: the byte check every contender passes before it is timed;
* :mod:`.timing`: median of N runs after a warm-up, the machine record;
* :mod:`.report`, :mod:`.goals`, :mod:`.output`: table, JSON, plot, goals;
* :mod:`.args`: the command line; :mod:`.runner`: the order of work.

Nothing here is imported by ``import gpuload``.
"""

from gpuload.bench.args import add_arguments
from gpuload.bench.runner import main, run

__all__ = ["add_arguments", "main", "run"]
