"""The scheduler's public names; the implementation lives in the `swapper.sched` package."""

from .sched import *  # noqa: F401,F403
from .sched import __all__  # noqa: F401
