import pytest

from tracer.config import Config, ConfigError, load


def write(tmp_path, text):
    path = tmp_path / "eptrace.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    config = load(None)
    assert config == Config()
    assert config.flows.long_flow_seconds == 600 and "169.254.169.254" in config.cloud_metadata.addresses


def test_values_are_read_and_typed(tmp_path):
    config = load(write(tmp_path, """
[flows]
long_flow_seconds = 120
update_interval_seconds = 5
[allowlist]
cidrs = ["10.0.0.0/8"]
ports = [443]
executables = ["/usr/bin/pip"]
"""))
    assert config.flows.long_flow_seconds == 120.0 and isinstance(config.flows.long_flow_seconds, float)
    assert config.allows_destination("10.1.2.3", 80) and config.allows_destination("1.2.3.4", 443)
    assert not config.allows_destination("11.0.0.1", 80)
    assert config.allows_executable("/usr/bin/pip") and not config.allows_executable("/usr/bin/ssh")


@pytest.mark.parametrize("text, words", [
    ("[flows]\nlong_flow_secs = 1\n", "unknown config key flows.long_flow_secs"),
    ("[flow]\n", "unknown config key flow"),
    ("[flows]\nlong_flow_seconds = -1\n", "flows.long_flow_seconds must be a positive number"),
    ("[flows]\nlong_flow_seconds = \"ten\"\n", "flows.long_flow_seconds must be a positive number"),
    ("[allowlist]\nports = [70000]\n", "not a port"),
    ("[allowlist]\ncidrs = [\"10.0.0.0/33\"]\n", "not an IP address or CIDR"),
    ("[allowlist]\ncidrs = \"10.0.0.0/8\"\n", "must be a list"),
    ("flows = 3\n", "must be a table"),
    ("[flows\n", "not valid TOML"),
])
def test_bad_files_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "nope.toml")


def test_outputs_from_the_config(tmp_path):
    config = load(write(tmp_path, '[output]\nspecs = ["-", "file:/tmp/x.ndjson"]\nspool_mb = 64\n'))
    assert config.output.specs == ("-", "file:/tmp/x.ndjson") and config.output.spool_mb == 64.0
    with pytest.raises(ConfigError, match="output.specs"):
        load(write(tmp_path, '[output]\nspecs = [""]\n'))


def test_metrics_per_episode_from_the_config(tmp_path):
    assert load(None).metrics.per_episode is True
    assert load(write(tmp_path, "[metrics]\nper_episode = false\n")).metrics.per_episode is False
    with pytest.raises(ConfigError, match="metrics.per_episode must be true or false"):
        load(write(tmp_path, '[metrics]\nper_episode = "no"\n'))
