"""adsvc SDK: talk to an adsvc server with the same interface as `adsvc.local()`."""

from adsvc_protocol.errors import AdsvcError  # noqa: F401


def connect(target: str, **kw):
    from adsvc_client.remote import RemoteClient

    return RemoteClient(target, **kw)
