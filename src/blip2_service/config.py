"""Settings: the only place environment variables (and `.env`) are read.

Everything else receives a `Settings` object from `runtime.py`, so tests can
build their own without touching the process environment.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .domain import GenerationSettings

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda|cuda:\d+)$")


class ConfigError(Exception):
    """A bad configuration value; the message is one line fit for a terminal."""


def _split_paths(value: Any) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [Path(part).expanduser() for part in value.split(":") if part.strip()]
    if isinstance(value, list | tuple):
        return [Path(str(part)).expanduser() for part in value]
    raise ValueError("expected folders separated by ':'")


def _split_csv(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


class Settings(BaseSettings):
    """Every knob of CONTRACT §5, plus a few documented extras (README, "Configuration")."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # HTTP
    port: int = Field(7777, ge=1, le=65535)
    # `consume` and `watch` serve no API: with this set they answer /health and /metrics on it,
    # so a fleet of workers can be probed and scraped like the HTTP service (0: off).
    health_port: int = Field(0, ge=0, le=65535)
    private: bool = False
    api_key: str = ""
    # No CORS headers by default, as the legacy service: any web page could otherwise read
    # /captions through a visitor's browser.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    health_details: bool = False
    request_timeout: float = Field(60, gt=0, le=3600)
    max_connections: int = Field(0, ge=0, le=10_000_000)  # 0: half the open-file limit, at most 10,000

    # Model
    model: str = "Salesforce/blip2-opt-2.7b"
    model_dir: Path | None = None
    model_download: bool = True
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    num_beams: int = Field(5, ge=1, le=16)
    max_new_tokens: int = Field(30, ge=1, le=512)
    min_new_tokens: int = Field(1, ge=0, le=512)
    torch_threads: int = Field(0, ge=0, le=1024)
    prepare_workers: int = Field(0, ge=0, le=256)  # 0: by cores and device (pipeline.auto_prepare_workers)
    inference: Literal["local", "queue"] = "local"
    gateway_timeout: float = Field(30, gt=0, le=3600)
    load_wait_seconds: float = Field(300, ge=0, le=86_400)
    startup_timeout: float = Field(60, ge=0, le=86_400)
    listen_after_load: bool = False
    compile: Literal["auto", "on", "off"] = "auto"
    compile_buckets: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])

    # Batching
    batch_max_size: int = Field(16, ge=1, le=256)
    batch_max_wait_ms: float = Field(10, ge=0, le=10_000)
    max_pending: int = Field(256, ge=1, le=100_000)

    # Store
    data_dir: Path = Path("./data")
    database_url: str = "sqlite:///./data/blip2.db"
    db_schema: str = Field("blip2", min_length=1, max_length=63, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    # Queue
    broker_url: str = ""
    queue_name: str = Field("blip2.images", min_length=1)
    results_exchange: str = Field("blip2.results", min_length=1)
    prefetch: int = Field(32, ge=1, le=10_000)

    # Watcher
    watch_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    watch_recursive: bool = True
    watch_polling: bool = False
    watch_settle_seconds: float = Field(1.0, ge=0, le=3600)
    watch_mode: Literal["caption", "publish"] = "caption"
    watch_follow_symlinks: bool = False

    # Inputs and their guards
    file_roots: Annotated[list[Path], NoDecode] | None = None
    allow_private_urls: bool = False
    url_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    url_timeout: float = Field(10, gt=0, le=600)
    max_file_size: int = Field(33_554_432, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)

    # Emoji table refresh
    auto_update: bool = True
    emoji_mappings_url: str = ""

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("watch_dirs", mode="before")
    @classmethod
    def _watch_dirs(cls, value: Any) -> list[Path]:
        return _split_paths(value)

    @field_validator("file_roots", mode="before")
    @classmethod
    def _file_roots(cls, value: Any) -> list[Path] | None:
        if value is None:
            return None
        return _split_paths(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _cors(cls, value: Any) -> list[str]:
        return _split_csv(value)

    @field_validator("url_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> list[str]:
        networks = _split_csv(value)
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network; use CIDRs such as 10.20.0.0/16,fd00::/8") from None
        return networks

    @field_validator("compile_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> list[int]:
        parts = _split_csv(value)
        try:
            sizes = sorted({int(part) for part in parts})
        except ValueError:
            raise ValueError("expected batch sizes separated by ',', e.g. 1,2,4,8,16") from None
        if not sizes or sizes[0] < 1 or sizes[-1] > 1024:
            raise ValueError("expected batch sizes from 1 to 1024 separated by ','")
        return sizes

    @field_validator("compile", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("allowed: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value and not re.match(r"^(amqps?|pyamqp|memory)://", value):
            raise ValueError("allowed: empty (no consumer) or amqp://USER:PASS@HOST:5672//")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.inference == "queue" and not self.broker_url:
            raise ValueError("INFERENCE=queue (gateway mode) needs BROKER_URL: the queue the workers consume")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"MIN_NEW_TOKENS={self.min_new_tokens} exceeds MAX_NEW_TOKENS={self.max_new_tokens}")
        return self

    def generation(self) -> GenerationSettings:
        """The configured generation settings (every door starts from these)."""
        return GenerationSettings(self.num_beams, self.max_new_tokens, self.min_new_tokens)

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.private else "0.0.0.0"

    @property
    def allowed_file_roots(self) -> list[Path]:
        """`?file=` roots, resolved once; the watch folders unless FILE_ROOTS says otherwise."""
        roots = self.file_roots if self.file_roots is not None else self.watch_dirs
        return [Path(root).expanduser().resolve() for root in roots]


def default(name: str) -> Any:
    """A setting's default, for the classes that take it as an argument: defaults live here only."""
    return Settings.model_fields[name].default


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "configuration"
            value = err.get("input")
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}={value!r} is not valid: {msg}")
        raise ConfigError("; ".join(lines)) from None
