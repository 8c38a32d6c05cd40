"""The typed errors (defined in the SDK package so local and remote callers share them)."""

from adsvc_protocol.errors import *  # noqa: F403
from adsvc_protocol.errors import ERROR_CLASSES, AdsvcError  # noqa: F401
