"""medrobust: medical-imaging deep learning with pluggable adversarial-robustness callbacks."""

__version__ = "0.1.0"

# the configs' own resolvers (${launch_dir:}, ${by_dims:...}, ...), so any composition of conf/ resolves, also one
# through Hydra's compose API in a notebook
from medrobust.resolvers import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
