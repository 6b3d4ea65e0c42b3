"""The SAE, its kinds, penalties and trainers (torch only).

Importing the package registers every built-in SAE kind (the kinds in modules of their own
subclass raysae.core.kinds), then the plugin modules named by ``RAYSAE_PLUGINS``
(raysae.core.kind_registry), so any module that looks a kind up sees them all.
"""

# Each built-in kind registers itself when its module is imported, in this order (the
# order of every list of kinds); a new kind is one module and one line here.
# isort: off
from raysae.core import topk as _topk  # noqa: F401
from raysae.core import jumprelu as _jumprelu  # noqa: F401
from raysae.core import matryoshka as _matryoshka  # noqa: F401
from raysae.core import gated as _gated  # noqa: F401
# isort: on
from raysae.core.kind_registry import load_plugins

load_plugins()  # last: plugin kinds may subclass any built-in one
