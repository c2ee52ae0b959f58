"""Python policy hooks (the embedding counterpart of Postfix's policy
delegation, smtpd_policy_hooks).

A hook is an async callable ``hook(request: PolicyRequest) -> str | None``
consulted at each SMTP stage (``request.stage``: ``connect``, ``helo``,
``mail``, ``rcpt``, ``end-of-data``) for every hook named in
``smtpd_policy_hooks``.  It answers like an access(5) table: ``OK``,
``DUNNO`` (or None), ``REJECT text``, ``DEFER text``, ``4NN/5NN text``,
``HOLD``, ``DISCARD``, ``PREPEND Header: value``.  A hook that raises or
times out (``smtpd_policy_service_timeout``) answers ``451 4.3.5`` — an
application bug never rejects mail permanently.

Register globally with :func:`register_policy_hook` or per server with
``MailServer(config, policy_hooks={...})``; restriction lists may also name
a hook explicitly: ``check_python_policy NAME``.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from .smtpd.restrictions import Facts as PolicyRequest

PolicyHook = Callable[[PolicyRequest], Awaitable["str | None"]]

_REGISTRY: dict[str, PolicyHook] = {}


def register_policy_hook(name: str, hook: PolicyHook) -> None:
    if not name or " " in name:
        raise ValueError(f"bad policy hook name {name!r}")
    _REGISTRY[name] = hook


def unregister_policy_hook(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_policy_hooks() -> dict[str, PolicyHook]:
    return dict(_REGISTRY)


__all__ = ["PolicyRequest", "PolicyHook", "register_policy_hook", "unregister_policy_hook",
           "registered_policy_hooks"]
