"""mailserver: a Postfix-class mail transfer agent in one asyncio process.

Public API::

    from mailserver import Config, MailServer

    config = Config.from_file("config.toml")
    async with MailServer(config) as server:
        await server.serve_forever()
"""

__version__ = "0.1.0"

from . import delivery, errors  # noqa: E402
from .config import Config, ConfigError  # noqa: E402
from .delivery import Delivered, PermanentFailure, TemporaryFailure  # noqa: E402
from .delivery.python import TransportEnvelope, register_transport, unregister_transport  # noqa: E402
from .events import DeliveryEvent  # noqa: E402
from .hooks import PolicyRequest, register_policy_hook, unregister_policy_hook  # noqa: E402
from .server import MailServer, StartupError  # noqa: E402

__all__ = ["Config", "ConfigError", "MailServer", "StartupError", "DeliveryEvent", "Delivered",
           "TemporaryFailure", "PermanentFailure", "TransportEnvelope", "PolicyRequest", "register_transport",
           "unregister_transport", "register_policy_hook", "unregister_policy_hook", "delivery", "errors",
           "__version__"]
