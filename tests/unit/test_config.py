from pathlib import Path

import pytest

from blip2_service.config import ConfigError, Settings, load_settings


def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(__import__("os").environ):
        if key in {f.upper() for f in Settings.model_fields}:
            monkeypatch.delenv(key)


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    s = load_settings()
    assert (s.port, s.private, s.api_key, s.cors_origins) == (7777, False, "", [])
    assert s.model == "Salesforce/blip2-opt-2.7b"
    assert (s.device, s.dtype, s.num_beams, s.max_new_tokens, s.min_new_tokens) == ("auto", "auto", 5, 30, 1)
    assert (s.batch_max_size, s.batch_max_wait_ms) == (16, 10)
    assert s.database_url == "sqlite:///./data/blip2.db"
    assert (s.broker_url, s.queue_name, s.results_exchange, s.prefetch) == (
        "",
        "blip2.images",
        "blip2.results",
        32,
    )
    assert (s.watch_dirs, s.watch_recursive, s.watch_polling, s.watch_settle_seconds, s.watch_mode) == (
        [],
        True,
        False,
        1.0,
        "caption",
    )
    assert (s.allow_private_urls, s.url_timeout, s.max_file_size, s.max_image_pixels) == (
        False,
        10,
        33554432,
        89478485,
    )
    assert (s.auto_update, s.emoji_mappings_url, s.log_level, s.log_format) == (True, "", "INFO", "text")
    assert s.host == "0.0.0.0"


def test_environment_and_dotenv_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    (tmp_path / ".env").write_text("PORT=8080\nWATCH_DIRS=/a:/b\n")
    monkeypatch.setenv("PRIVATE", "true")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("log_level", "debug")
    s = load_settings()
    assert s.port == 8080
    assert s.watch_dirs == [Path("/a"), Path("/b")]
    assert s.host == "127.0.0.1"
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.log_level == "DEBUG"
    # FILE_ROOTS defaults to the watch folders
    assert s.allowed_file_roots == [Path("/a").resolve(), Path("/b").resolve()]


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("PORT", "70000", "PORT='70000'"),
        ("DEVICE", "gpu", "allowed: auto, cpu, cuda, cuda:N"),
        ("DTYPE", "int8", "DTYPE='int8'"),
        ("PRIVATE", "maybe", "PRIVATE='maybe'"),
        ("DATABASE_URL", "mysql://x", "allowed: sqlite:///PATH"),
        ("WATCH_MODE", "copy", "WATCH_MODE='copy'"),
        ("BATCH_MAX_SIZE", "0", "BATCH_MAX_SIZE='0'"),
    ],
)
def test_a_bad_value_is_one_line_naming_variable_value_and_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str, value: str, expected: str
) -> None:
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_min_tokens_over_max_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MIN_NEW_TOKENS", "50")
    with pytest.raises(ConfigError, match="MIN_NEW_TOKENS=50 exceeds MAX_NEW_TOKENS=30"):
        load_settings()


def test_prepare_workers_scale_with_cores_beside_a_gpu_and_stay_few_beside_a_cpu_model() -> None:
    from blip2_service.pipeline import auto_prepare_workers

    # Beside a GPU the cores are idle: all but two (event loop, inference thread).
    assert [auto_prepare_workers(on_gpu=True, cpus=n) for n in (2, 4, 16, 64)] == [2, 2, 14, 32]
    # Beside a model on the CPU, torch wants the cores.
    assert [auto_prepare_workers(on_gpu=False, cpus=n) for n in (2, 4, 16, 64)] == [2, 2, 4, 4]


def test_prepare_workers_setting_reaches_the_pipeline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from blip2_service.pipeline import auto_prepare_workers
    from blip2_service.runtime import Runtime

    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/p.db")
    monkeypatch.setenv("AUTO_UPDATE", "false")
    monkeypatch.setenv("DEVICE", "cpu")
    assert Runtime(load_settings()).pipeline.limits.prepare_workers == auto_prepare_workers(on_gpu=False)
    monkeypatch.setenv("PREPARE_WORKERS", "7")
    assert Runtime(load_settings()).pipeline.limits.prepare_workers == 7
