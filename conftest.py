"""Load the harness plugin when the project is not installed (a plain ``pytest`` in a checkout).

Installed, the ``pytest11`` entry point loads it; registering it twice would be an error.
"""

from importlib.metadata import entry_points

_registered = any(ep.value == "harness.plugin" for ep in entry_points(group="pytest11"))
pytest_plugins = [] if _registered else ["harness.plugin"]
