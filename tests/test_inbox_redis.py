"""The Redis inbox beyond the shared contract (tests/test_inbox_contract.py): the backend chosen
by the config, the admin view over it, and a Redis that cannot be reached."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import orjson
import pytest

from bot.inbox_admin import retry, show
from bot.inbox_factory import StoreSpec
from bot.inbox_redis import RedisInboxDb, redacted
from bot.store import InboxState, StorageError
from server.config import load_config
from server.errors import ConfigError
from tests.test_inbox_contract import message


def redis_config(tmp_path: Path, url: str, prefix: str) -> Path:
    path = tmp_path / "vlbridge.toml"
    path.write_text(f'[storage]\nbackend = "redis"\nredis_url = "{url}"\nredis_prefix = "{prefix}"\n')
    return path


def test_the_config_chooses_the_backend_and_a_bad_one_is_named(tmp_path: Path) -> None:
    spec = StoreSpec.from_config(load_config(None), "feishu")
    assert (spec.backend, spec.where) == ("sqlite", str(Path("data") / "feishu-inbox.sqlite3"))
    environ = {"VLBRIDGE_STORAGE_REDIS_URL": "redis://:pw@cache:6379/2"}
    config = load_config(redis_config(tmp_path, "redis://127.0.0.1:6379/0", "team-a"), environ)
    spec = StoreSpec.from_config(config, "feishu")
    assert (spec.backend, spec.where, spec.prefix) == ("redis", "redis://:pw@cache:6379/2", "team-a")
    assert spec.name == "redis redis://:***@cache:6379/2"
    assert StoreSpec.from_dict(orjson.loads(orjson.dumps(spec.as_dict()))) == spec  # to the worker
    (tmp_path / "bad.toml").write_text('[storage]\nbackend = "mysql"\n')
    with pytest.raises(ConfigError, match=r"storage\.backend"):
        load_config(tmp_path / "bad.toml")


def test_passwords_never_leave_in_names() -> None:
    assert redacted("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("rediss://:pw@host:6380") == "rediss://:***@host:6380"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_an_unreachable_redis_is_one_clear_error_at_start_and_later(tmp_path: Path) -> None:
    url = f"unix://:s3cret@{tmp_path}/nothing.sock"
    inbox = StoreSpec(backend="redis", where=url, platform="feishu", retention_hours=12).inbox()
    with pytest.raises(StorageError) as caught:
        inbox.open_now()
    text = str(caught.value)
    assert text.startswith(f"inbox redis unix://:***@{tmp_path}/nothing.sock: ") and "\n" not in text
    assert "is Redis running" in text and "s3cret" not in text
    assert not inbox.is_open
    # The worker's commit before an ack: a StorageError (the handler raises, nothing is acked).
    store = RedisInboxDb(url, platform="feishu")
    with pytest.raises(StorageError, match="is Redis running"):
        store.receive(message("om_1"), b"{}", 1.0)
    store.close()
    with pytest.raises(StorageError, match="set \\[storage\\] redis_url"):
        RedisInboxDb("http://not-redis", platform="feishu")


def test_the_admin_lists_and_retries_messages_kept_in_redis(redis_server: str, tmp_path: Path) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    config = load_config(redis_config(tmp_path, redis_server, prefix))
    store = RedisInboxDb(redis_server, platform="feishu", prefix=prefix)
    store.receive(message("om_ok", "oc_a"), b"{}", time.time() - 60)
    store.receive(message("om_bad", "oc_b"), b"{}", time.time() - 30)
    store.start("om_bad")
    store.finish("om_bad", InboxState.FAILED, "the service ended 3 times while answering it")
    out = io.StringIO()
    assert show(config, out, states=["failed"], chat_id="", since="1h", limit=10, as_json=True) == 0
    [row] = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert (row["message_id"], row["state"], row["attempts"]) == ("om_bad", "failed", 1)
    out = io.StringIO()
    assert retry(config, "om_bad", out, io.StringIO()) == 0
    assert "queued again" in out.getvalue()
    again = store.get("om_bad")
    assert again is not None and (again.state, again.attempts) == (InboxState.RECEIVED, 0)
    err = io.StringIO()
    assert retry(config, "om_ok", io.StringIO(), err) == 1
    assert "message om_ok is received; only a failed message can be retried" in err.getvalue()
    store.close()
