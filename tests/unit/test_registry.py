import os
from pathlib import Path

import pytest
from support import require

from tracer.kernel import cgroups
from tracer.registry import Registry, RegistryError, parse_labels, validate_id


@pytest.mark.parametrize("good", ["a", "ep-1", "run.7:step_3", "A" * 128])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "a" * 129, "ep/1", "ep 1", "ep\n", "../x", "é"])
def test_invalid_ids_are_one_line_errors(bad):
    with pytest.raises(RegistryError) as e:
        validate_id(bad)
    assert "\n" not in str(e.value) and "A-Z" in str(e.value)


def test_labels():
    assert parse_labels(["team=rl", "run.kind=ppo=x"]) == {"team": "rl", "run.kind": "ppo=x"}
    for bad in (["novalue"], ["=x"], ["episode_id=x"], ["bad key=x"]):
        with pytest.raises(RegistryError):
            parse_labels(bad)


@pytest.fixture
def some_cgroup():
    """A cgroup below the cgroup2 root (the root itself is refused): one that exists, or one made here."""
    mount = cgroups.cgroup2_mount()
    found = next((p for p in sorted(mount.iterdir()) if (p / "cgroup.procs").exists()), None)
    if found:
        yield found
        return
    require(os.geteuid() == 0, "no cgroup below the cgroup2 root, and making one needs root")
    made = mount / f"eptrace-unit-{os.getpid()}"
    made.mkdir()
    yield made
    made.rmdir()


def test_add_list_remove_round_trip(tmp_path, some_cgroup):
    reg = Registry(tmp_path)
    root = some_cgroup
    added = reg.add("ep-1", str(root), {"team": "rl"})
    assert added.cgroup == str(root)
    assert [r.id for r in reg.list()] == ["ep-1"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("ep-1", str(root), {})
    with pytest.raises(RegistryError, match="already registered as episode 'ep-1'"):
        reg.add("ep-2", str(root), {})
    reg.remove("ep-1")
    assert reg.list() == []
    with pytest.raises(RegistryError, match="not registered"):
        reg.remove("ep-1")


def test_add_rejects_missing_and_non_cgroup2_paths(tmp_path):
    reg = Registry(tmp_path / "state")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.add("ep-1", "/sys/fs/cgroup/unified/no-such-cgroup-here", {})
    with pytest.raises(RegistryError, match="not a cgroup v2"):
        reg.add("ep-1", str(tmp_path), {})
    assert reg.list() == []
    assert not list(Path(tmp_path / "state").rglob("*.tmp"))
