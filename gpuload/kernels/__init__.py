"""The gather kernels: the Numba CUDA gather and its numpy twin.

Their sources live in ``kernels/`` at the repository root; each module here
is a link to one of them, so the wheel ships them as ``gpuload.kernels``
while a Python started in the repository root never finds a top-level
package ``kernels`` that would shadow the PyPI package of that name (which
transformers imports). A new kernel module needs its link here:
``tests/test_packaging.py`` fails for a source the wheel lacks.

They import only numpy and ``numba.cuda``, never the rest of gpuload (the
import contract in ``pyproject.toml`` checks it), so they run unchanged under
``NUMBA_ENABLE_CUDASIM=1``.
"""
