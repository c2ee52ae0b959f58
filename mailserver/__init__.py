"""mailserver: a Postfix-class mail transfer agent in one asyncio process.

Public API::

    from mailserver import Config, MailServer

    config = Config.from_file("config.toml")
    async with MailServer(config) as server:
        await server.serve_forever()
"""

__version__ = "0.1.0"

from .config import Config, ConfigError  # noqa: E402
from .server import MailServer, StartupError  # noqa: E402

__all__ = ["Config", "ConfigError", "MailServer", "StartupError", "__version__"]
