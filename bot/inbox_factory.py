"""Which store keeps the inbox: ``[storage] backend = "sqlite" | "redis"``.

`StoreSpec` says where one platform's inbox lives; it is built once from the config and handed
as plain values to whoever opens the store: the service (`StoreSpec.inbox`, the async face),
the long-connection worker process (`as_dict` over its stdin, then `StoreSpec.from_dict(...).open()`)
and `vlbridge inbox`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bot.cancels import Cancels, LocalCancels
from bot.inbox import Inbox, InboxDb
from bot.store import InboxStore

if TYPE_CHECKING:  # the worker process opens a store without loading the config machinery
    from server.config import Config


@dataclass(frozen=True, slots=True)
class StoreSpec:
    backend: Literal["sqlite", "redis"]
    where: str  # the SQLite file, or the Redis URL
    platform: str
    retention_hours: float
    prefix: str = "vlbridge"  # Redis keys: <prefix>:{<platform>}:...

    @classmethod
    def from_config(cls, config: Config, platform: str) -> StoreSpec:
        storage = config.storage
        if storage.backend == "redis":
            where = storage.redis_url
        else:
            where = str(config.storage_path / f"{platform}-inbox.sqlite3")
        return cls(
            backend=storage.backend,
            where=where,
            platform=platform,
            retention_hours=config.feishu.dedup_hours,
            prefix=storage.redis_prefix,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreSpec:
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        """Where the inbox is, for log lines (a Redis URL without its password)."""
        if self.backend == "redis":
            from bot.inbox_redis import redacted

            return f"redis {redacted(self.where)}"
        return self.where

    def open(self) -> InboxStore:
        """The synchronous store (raises `StorageError` for a bad file or URL; a Redis server is
        first reached by `check()`)."""
        if self.backend == "redis":
            from bot.inbox_redis import RedisInboxDb  # redis-py is imported only when used

            return RedisInboxDb(
                self.where, platform=self.platform, retention_hours=self.retention_hours, prefix=self.prefix
            )
        return InboxDb(Path(self.where), platform=self.platform, retention_hours=self.retention_hours)

    def cancels(self) -> Cancels:
        """How a `/cancel` reaches the services sharing this store."""
        if self.backend == "redis":
            from bot.cancels import RedisCancels

            return RedisCancels(self.where, prefix=self.prefix, platform=self.platform)
        return LocalCancels()

    def inbox(self) -> Inbox:
        """The service's inbox. One service per SQLite file (a lock file beside it)."""
        return Inbox(
            self.open,
            name=self.name,
            retention_hours=self.retention_hours,
            lock_beside=Path(self.where) if self.backend == "sqlite" else None,
        )
