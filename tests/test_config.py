from pathlib import Path

import pytest

from deposium.worker.config import ConfigError, load_settings, mask_url


def test_defaults_without_environment():
    s = load_settings({})
    assert s.redis_url is None
    assert s.token_budget == 128
    assert s.visibility_timeout_s > s.task_time_limit_s > s.task_soft_time_limit_s


def test_environment_overrides_and_paths(tmp_path):
    s = load_settings({"REDIS_URL": "redis://h:1/2", "DEPOSIUM_TOKEN_BUDGET": "2048",
                       "DEPOSIUM_CACHE_DIR": str(tmp_path), "DEPOSIUM_ORT_ARENA": "yes"})
    assert s.redis_url == "redis://h:1/2"
    assert s.token_budget == 2048
    assert s.ort_arena is True
    assert s.artifact_dir == Path(tmp_path) / "artifacts" / "all-MiniLM-L6-v2"


@pytest.mark.parametrize("env, fragment", [
    ({"DEPOSIUM_TOKEN_BUDGET": "lots"}, "not an integer"),
    ({"DEPOSIUM_ORT_ARENA": "maybe"}, "not a boolean"),
    ({"DEPOSIUM_TASK_TIME_LIMIT": "10", "DEPOSIUM_TASK_SOFT_TIME_LIMIT": "20"}, "greater than"),
    ({"DEPOSIUM_VISIBILITY_TIMEOUT": "100"}, "redelivers"),
])
def test_bad_values_are_rejected_with_the_variable_name(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env)


def test_zero_connect_timeout_means_fail_fast_and_negative_is_refused():
    assert load_settings({"DEPOSIUM_REDIS_CONNECT_TIMEOUT": "0"}).redis_connect_timeout_s == 0
    with pytest.raises(ConfigError, match=">= 0"):
        load_settings({"DEPOSIUM_REDIS_CONNECT_TIMEOUT": "-1"})


def test_mask_url_hides_passwords_only():
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("postgresql://bob:pw@db/x?table=t") == "postgresql://bob:***@db/x?table=t"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_allocator_thresholds_are_applied_once_per_process():
    from deposium.worker.memory import fix_mmap_threshold, fix_trim_threshold

    assert fix_mmap_threshold(0) is False and fix_trim_threshold(0) is False  # 0 = leave glibc alone
    assert fix_mmap_threshold(1 << 20) is True and fix_trim_threshold(32 << 20) is True  # glibc here
    settings = load_settings({"DEPOSIUM_MALLOC_MMAP_THRESHOLD": "0", "DEPOSIUM_MALLOC_TRIM_THRESHOLD": "1024"})
    assert settings.malloc_mmap_threshold == 0 and settings.malloc_trim_threshold == 1024


def test_guide_configuration_table_matches_the_config_module():
    from deposium.worker.config import ENVIRONMENT, configuration_table

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    assert configuration_table() in guide, "docs/guide.md is stale: paste `python -m deposium.worker.config` output"
    for var in ENVIRONMENT:
        assert f"`{var}`" in guide
