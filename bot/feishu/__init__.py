"""The Feishu/Lark adapter: `build_adapter(config, answers)` is the one entry point."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.config import Config
from server.inference.api import AnswerSource

if TYPE_CHECKING:
    from server.platform import PlatformAdapter


def require_credentials(config: Config) -> None:
    """Raise `server.errors.ConfigError` when Feishu is enabled without the credentials its mode
    needs. `vlbridge serve` (through `build_adapter`) and `vlbridge check-config` both ask this."""
    from server.errors import ConfigError

    feishu = config.feishu
    if not feishu.enabled:
        return
    if not feishu.app_id or not feishu.app_secret.get_secret_value():
        raise ConfigError(
            f"{config.source}: feishu.app_id and VLBRIDGE_FEISHU_APP_SECRET are required when feishu.enabled"
        )
    if feishu.mode == "webhook" and not (
        feishu.encrypt_key.get_secret_value() or feishu.verification_token.get_secret_value()
    ):
        raise ConfigError(
            f"{config.source}: feishu.mode = webhook needs VLBRIDGE_FEISHU_ENCRYPT_KEY and/or "
            "VLBRIDGE_FEISHU_VERIFICATION_TOKEN (else anyone could post events)"
        )


def build_adapter(config: Config, answers: AnswerSource) -> PlatformAdapter | None:
    """The configured Feishu adapter, or None when ``feishu.enabled`` is false.

    Raises `server.errors.ConfigError` when enabled without the credentials the mode needs, and
    `bot.inbox.StorageError` when its inbox cannot be used (checked now, before a model loads).
    """
    if not config.feishu.enabled:
        return None
    require_credentials(config)
    from bot.feishu.adapter import FeishuAdapter

    adapter = FeishuAdapter(config, answers)
    adapter.open_storage()
    return adapter
