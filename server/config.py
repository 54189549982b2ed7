"""The one configuration object, read once at the process edge.

`load_config(path, environ)` reads a TOML file, applies ``VLBRIDGE_<SECTION>_<KEY>``
environment overrides and returns a frozen, typed `Config`. Nothing deeper in the
program reads the environment or the file again.

Any problem raises `ConfigError` whose message is one line naming the file and the key
(or, for a value from the environment, the variable), what was expected and what was found;
unknown keys are errors (a typo must never be silently ignored), and so is a ``VLBRIDGE_*``
variable that is neither a key nor one of `OTHER_VARIABLES`. Secrets (`feishu.app_secret`,
`feishu.encrypt_key`, `feishu.verification_token`, `model.api_key`) are accepted only from the
environment and are held as `SecretStr`, so they never appear in logs or reprs.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from server.auth import normalize_origin
from server.errors import ConfigError

ENV_PREFIX = "VLBRIDGE_"
# VLBRIDGE_* variables that are not config keys but are read by other parts of the project.
OTHER_VARIABLES = {
    "VLBRIDGE_TOKEN": "`vlbridge chat`'s auth token",
    "VLBRIDGE_CONFIG": "the config file docker/compose*.yaml mounts",
}
SECRET_KEYS = {
    ("feishu", "app_secret"),
    ("feishu", "encrypt_key"),
    ("feishu", "verification_token"),
    ("model", "api_key"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    auth_tokens: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own (see server.auth)
    ping_interval: float = Field(45.0, gt=0)
    ping_timeout: float = Field(10.0, gt=0)
    max_sessions: int = Field(10_000, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images: int = Field(8, ge=1)
    max_frame_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_frames_per_second: float = Field(50.0, gt=0)
    resume_ttl: float = Field(300.0, ge=0)
    resume_buffer_frames: int = Field(2048, ge=16)
    history_turns: int = Field(16, ge=0)
    max_asks_per_session: int = Field(4, ge=1)
    max_turns: int = Field(1024, ge=1)
    agent_check_port: int = Field(0, ge=0, le=65535)
    allow_remote_images: bool = False
    shutdown_grace: float = Field(20.0, ge=0)
    header_timeout: float = Field(20.0, gt=0)
    body_timeout: float = Field(20.0, gt=0)
    body_min_rate: float = Field(16384.0, gt=0)
    test_page: bool = True

    @field_validator("auth_tokens")
    @classmethod
    def _tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for token in value:
            if not token or token != token.strip():
                # a client can never present it (headers are stripped): no one could get in
                raise ValueError("expected tokens without surrounding spaces, none empty")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        normalized = []
        for origin in value:
            clean = normalize_origin(origin)
            if clean is None:
                raise ValueError(
                    f'expected origins like "https://example.com" or "http://host:port", got {origin!r}'
                )
            normalized.append(clean)
        return tuple(normalized)


class ModelConfig(_Section):
    path: str = ""
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_new_tokens: int = Field(512, ge=1)
    max_pixels: int = Field(1280 * 32 * 32, ge=32 * 32)
    max_image_side: int = Field(16384, ge=32)
    max_decode_pixels: int = Field(16_777_216, ge=32 * 32)
    max_context_tokens: int = Field(16384, ge=64)
    cuda_graphs: bool = True
    # keys and values in the paged cache: "auto" = the model's dtype; "fp8" = float8 e4m3, half the
    # bytes of bf16: twice the tokens in the same memory (not faster on an H200, less exact; README)
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # the language model's linear layers: "auto" = the model's dtype; "fp8" = float8 e4m3 weights
    # and activations, scaled per channel and per token (W8A8): half the weights' bytes, faster
    # on GPUs with float8 tensor cores (H100/H200), less exact (README)
    weights_dtype: Literal["auto", "fp8"] = "auto"
    # torch threads on the CPU; "auto": 1 for tiny models (the demo), else usable cores - 1
    cpu_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    download_log_seconds: float = Field(5.0, gt=0)  # a hub download's progress is logged this often
    # backend = "openai": answers come from OpenAI-compatible servers (vLLM, SGLang, their
    # routers, another vlbridge) at base_urls; the keys above but max_new_tokens are then unused.
    backend: Literal["local", "openai"] = "local"
    base_urls: tuple[str, ...] = Field((), validate_default=True)
    model: str = ""  # the upstream's model name; "" = `path`, or else the upstream's first model
    api_key: SecretStr = SecretStr("")  # environment only: VLBRIDGE_MODEL_API_KEY
    connect_timeout: float = Field(5.0, gt=0)
    first_token_timeout: float = Field(120.0, gt=0)  # the whole answer: executor.request_timeout
    eject_seconds: float = Field(10.0, gt=0)  # a failing upstream is left out this long, then probed

    @field_validator("base_urls")
    @classmethod
    def _base_urls(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("backend") == "openai" and not value:
            raise ValueError('backend "openai" needs at least one URL, e.g. ["http://gpu-1:8000/v1"]')
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f'expected URLs like "http://host:8000/v1", got {url!r}')
        return tuple(url.rstrip("/") for url in value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("expected auto|cpu|cuda|cuda:N")


class ExecutorConfig(_Section):
    max_batch: int = Field(32, ge=1, le=1024)
    queue_size: int = Field(256, ge=1)
    request_timeout: float = Field(300.0, gt=0)
    max_batch_tokens: int = Field(262_144, ge=256)
    prefill_chunk_tokens: int = Field(16_384, ge=256)
    prefill_decoding_tokens: int = Field(8_192, ge=256)  # the same while answers stream
    # ... grown up to prefill_chunk_tokens while a slice's measured pause stays under this; 0 = fixed
    prefill_stall_target: float = Field(0.12, ge=0, le=10)
    prepare_workers: int = Field(0, ge=0, le=64)  # picture decoding threads; 0 = min(8, CPU cores)
    # processes decoding pictures off the server's GIL; -1 = min(8, cores // 2) from 8 cores, else 0;
    # 0 = decode on the threads
    prepare_processes: int = Field(-1, ge=-1, le=64)
    prefix_cache: bool = True  # reuse the KV pages of earlier turns (and equal prompt starts)
    vision_cache_mb: int = Field(512, ge=0)  # vision-encoder outputs kept by picture hash; 0 = off
    stream_interval: float = Field(0.02, ge=0, le=1)  # seconds between text hand-offs of an answer
    profile_seconds: float = Field(10.0, ge=0)  # a log line of step/prefill timings this often; 0 = off


class FeishuConfig(_Section):
    enabled: bool = False
    app_id: str = ""
    app_secret: SecretStr = SecretStr("")
    mode: Literal["longconn", "webhook"] = "longconn"
    domain: str = "https://open.feishu.cn"
    encrypt_key: SecretStr = SecretStr("")
    verification_token: SecretStr = SecretStr("")
    allowed_chats: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    language: Literal["zh", "en"] = "zh"
    max_message_age: float = Field(1800.0, gt=0)
    user_rate_per_minute: int = Field(10, ge=1)
    context_hours: float = Field(24.0, gt=0)  # a chat's memory lasts this long after its last answer
    dedup_hours: float = Field(24.0, ge=12.0)
    watchdog_interval: float = Field(10.0, gt=0)
    stream_interval: float = Field(0.3, gt=0)  # before a card's first update; later gaps grow
    stream_growth: float = Field(1.3, ge=1.0)  # each card update waits this much longer than the last
    max_card_updates: int = Field(20, ge=1)  # streaming updates per answer card at most
    card_actions: Literal["asker", "chat"] = "asker"  # who may press Stop / Try again on an answer
    receipt_emoji: str = "OnIt"  # reaction on a message waiting for room; "" for none
    max_attempts: int = Field(3, ge=1)  # a message whose answer ended the process this often: failed


class StorageConfig(_Section):
    path: str = "data"
    backend: Literal["sqlite", "redis"] = "sqlite"  # where the Feishu inbox lives
    redis_url: str = "redis://127.0.0.1:6379/0"  # backend "redis": redis://, rediss:// or unix://
    redis_prefix: str = Field("vlbridge", min_length=1)  # keys <prefix>:{feishu}:...; one per deployment
    lease_seconds: float = Field(
        30.0, ge=1.0
    )  # a running message of a silent process is taken over after this

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('expected a URL like "redis://host:6379/0" (or rediss://, unix://)')
        return value


class Config(BaseModel):
    """Everything configurable, typed and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerConfig = ServerConfig()
    model: ModelConfig = ModelConfig()
    executor: ExecutorConfig = ExecutorConfig()
    feishu: FeishuConfig = FeishuConfig()
    storage: StorageConfig = StorageConfig()
    source: str = Field("<defaults>", exclude=True)
    from_env: tuple[str, ...] = Field((), exclude=True)  # "section.key" of the values the environment set

    def origin(self, section: str, key: str) -> str:
        """Where ``section.key``'s value came from, to start an error message with:
        ``environment VLBRIDGE_MODEL_PATH`` or ``vlbridge.toml: model.path``."""
        if f"{section}.{key}" in self.from_env:
            return f"environment {env_name(section, key)}"
        return f"{self.source}: {section}.{key}"

    @property
    def storage_path(self) -> Path:
        return Path(self.storage.path).expanduser()


_SECTIONS: dict[str, type[_Section]] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "executor": ExecutorConfig,
    "feishu": FeishuConfig,
    "storage": StorageConfig,
}


def _describe(value: Any) -> str:
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _env_value(raw: str, annotation: Any) -> Any:
    """Turn an environment string into the TOML-ish value its field expects (for a union such as
    `int | "auto"`, the first of its types that takes the string)."""
    if get_origin(annotation) in (Union, UnionType):
        for member in get_args(annotation):
            value = _env_value(raw, member)
            if value is not raw:
                return value
        return raw
    kind = getattr(annotation, "__origin__", annotation)
    if kind is tuple:
        raw = raw.strip()
        if raw.startswith("["):
            return orjson.loads(raw)
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        return raw
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            return raw
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _env_names() -> list[str]:
    return [env_name(section, key) for section, model in _SECTIONS.items() for key in model.model_fields]


def _unknown_variable(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, [*_env_names(), *OTHER_VARIABLES], n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(
        f"environment {name}: not a setting of vlbridge; {hint}"
        f"settings are VLBRIDGE_<SECTION>_<KEY> for the keys of vlbridge.toml"
    )


def _apply_env(data: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Merge ``VLBRIDGE_SECTION_KEY`` variables into *data*; return which variable set which key.

    Raises `ConfigError` naming a ``VLBRIDGE_*`` variable that is no key (a typo there must not be
    silently ignored either) or whose list value is not valid JSON."""
    used: dict[tuple[str, str], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        model = _SECTIONS.get(section)
        if model is None or key not in model.model_fields:
            raise _unknown_variable(name)
        annotation = model.model_fields[key].annotation
        try:
            value: Any = raw if annotation is SecretStr else _env_value(raw, annotation)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"environment {name}: not a valid JSON list ({exc})") from None
        data.setdefault(section, {})[key] = value
        used[(section, key)] = name
    return used


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read *path* (or defaults when None) plus environment overrides into a `Config`.

    Raises `ConfigError` with a one-line message naming file, key, expectation and finding.
    """
    environ = {} if environ is None else environ
    source = "<defaults>" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        for section, table in data.items():
            if section not in _SECTIONS:
                raise ConfigError(
                    f"{source}: unknown section [{section}]; expected one of {', '.join(_SECTIONS)}"
                )
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{source}: {section}: expected a table [{section}], found {_describe(table)}"
                )
            for key in table:
                if (section, key) in SECRET_KEYS:
                    env = env_name(section, key)
                    raise ConfigError(
                        f"{source}: {section}.{key}: secrets may come only from the environment; "
                        f"remove it from the file and set {env}"
                    )
    from_env = _apply_env(data, environ)
    for table in data.values():
        for key, value in table.items():
            if isinstance(value, list):
                table[key] = tuple(value)  # TOML arrays -> the frozen tuples the model holds
    try:
        overrides = tuple(f"{section}.{key}" for section, key in from_env)
        return Config.model_validate({**data, "source": source, "from_env": overrides})
    except ValidationError as exc:
        raise ConfigError(_first_error(source, exc, data, from_env)) from None


def _first_error(
    source: str, exc: ValidationError, data: dict[str, Any], from_env: Mapping[tuple[str, str], str]
) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc[:2]) if loc else "?"
    section_name = loc[0] if loc else ""
    variable = from_env.get((section_name, loc[1])) if len(loc) >= 2 else None
    where = f"{source}: {key}" if variable is None else f"environment {variable}"  # not the file's fault
    if error["type"] == "extra_forbidden":
        section = _SECTIONS.get(section_name)
        known = ", ".join(section.model_fields) if section is not None else ""
        return f"{where}: unknown key; expected one of: {known}"
    found = "missing" if error["type"] == "missing" else _describe(error.get("input"))
    if len(loc) >= 2 and isinstance(data.get(section_name), dict):
        found = _describe(data[section_name].get(loc[1], error.get("input")))
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{where}: {message}; found {found}"
