"""Stand-in for sgl-kernel's compiled ``common_ops`` library, found by ``import common_ops``.

``sgl_kernel/load_utils.py`` tries the compiled library for the GPU architecture, then any
``common_ops.*`` next to the package, and finally a plain ``import common_ops``. On a machine
without a GPU driver the first two fail, and this module (on ``PYTHONPATH`` through
``evict.testing.cpu_server``) answers the third: it registers EVICT's pure-torch stand-ins for the
CPU operators as ``torch.ops.sgl_kernel.*`` (see ``evict.testing.cpu_ops``).
"""

from evict.testing.cpu_ops import register

REGISTERED = register()
