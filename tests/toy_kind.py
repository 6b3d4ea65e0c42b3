"""A toy SAE kind from outside raysae, a plugin (``RAYSAE_PLUGINS=tests.toy_kind``): importing
it registers the kind, in the test process and in each Ray trial that imports the driver's
plugins. tests/test_kind_registry.py checks that it reaches the CLI, the search, the
comparisons and the report with no other edit."""

from raysae.core.kinds import register_kind
from raysae.core.topk import TopK

MODULE = "tests.toy_kind"


@register_kind
class ToyKind(TopK):
    """TopK under another name: a baseline, with a style of its own."""

    name, label = "toykind", "ToyKind"
    baseline = True
    style = {"color": "#e01a4f", "ls": "-.", "marker": "*"}
