"""The GPU worker's instance-store setup (raysae/cluster/instance_store.py), on lsblk
outputs as an EC2 node shows them: it formats only a disk with no file system, takes a mount
that already exists, and run twice does nothing the second time."""

import json

from raysae.cluster import instance_store as store

EBS = {"name": "nvme0n1", "path": "/dev/nvme0n1", "type": "disk",
       "model": "Amazon Elastic Block Store", "fstype": None, "mountpoint": None,
       "children": [{"name": "nvme0n1p1", "path": "/dev/nvme0n1p1", "type": "part",
                     "model": None, "fstype": "ext4", "mountpoint": "/"}]}


def nvme(fstype=None, mountpoint=None, children=None) -> dict:
    return {"name": "nvme1n1", "path": "/dev/nvme1n1", "type": "disk",
            "model": "Amazon EC2 NVMe Instance Storage        ", "fstype": fstype,
            "mountpoint": mountpoint, **({"children": children} if children else {})}


def test_a_node_without_an_instance_store_keeps_the_home_cache():
    assert store.plan([EBS]) is None


def test_a_blank_instance_store_is_formatted_then_mounted():
    commands, where = store.plan([EBS, nvme()])
    assert where == store.MOUNT
    assert [c[0] for c in commands] == ["mkfs.ext4", "mkdir", "mount"]
    assert commands[0][-1] == "/dev/nvme1n1" and commands[-1][-2:] == ["/dev/nvme1n1",
                                                                      store.MOUNT]


def test_a_disk_with_a_file_system_is_never_formatted():
    commands, _ = store.plan([EBS, nvme(fstype="ext4")])
    assert [c[0] for c in commands] == ["mkdir", "mount"]


def test_a_mount_the_ami_made_is_used_as_it_is():
    assert store.plan([EBS, nvme("ext4", "/opt/dlami/nvme")]) == ([], "/opt/dlami/nvme")
    raid = [{"name": "md0", "type": "raid0", "fstype": "ext4", "mountpoint": "/opt/dlami/nvme"}]
    assert store.plan([EBS, nvme("linux_raid_member", None, raid)]) == ([], "/opt/dlami/nvme")


def test_main_twice_formats_once_and_writes_the_folder(tmp_path, monkeypatch, capsys):
    """main() against a simulated node: the first run formats and mounts, the second finds
    the mount and runs no root command; both leave the folder in ~/.raysae/cache_dir."""
    state = {"fstype": None, "mountpoint": None}
    ran = []

    class Done:
        def __init__(self, stdout=""):
            self.stdout = stdout

    def fake_run(command, **kwargs):
        if command[0] == "lsblk":
            return Done(json.dumps({"blockdevices": [EBS, nvme(**state)]}))
        ran.append(command[1:])
        if command[1] == "mkfs.ext4":
            state["fstype"] = "ext4"
        if command[1] == "mount":
            state["mountpoint"] = command[-1]
        return Done()

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    monkeypatch.setattr(store, "CACHE_DIR_FILE", tmp_path / ".raysae" / "cache_dir")
    assert store.main() == 0
    first = [c[0] for c in ran]
    ran.clear()
    assert store.main() == 0
    assert first == ["mkfs.ext4", "mkdir", "mount", "mkdir", "chown"]
    assert [c[0] for c in ran] == ["mkdir", "chown"]  # the cache folder, idempotent
    assert store.CACHE_DIR_FILE.read_text() == f"{store.MOUNT}/raysae\n"
    assert "instance store" in capsys.readouterr().out
