"""A GPU node's NVMe instance store as its activation cache's disk (docs/cluster.md).

The pythia-70m preset's cache is 411 GB: more than a default gp3 root volume should hold
and, at gp3's 125 MB/s, slower to write than the GPU harvests it. g5 nodes carry a local
NVMe SSD (the instance store; emptied when the instance stops or ends, which a cache,
rebuilt by any new node, can afford; checkpoints go to S3). cluster.yaml's worker setup runs
this file with the system Python (standard library only, before the project is installed):

    python3 raysae/cluster/instance_store.py

It finds the instance-store disk (lsblk's model name), formats it once (never a disk that
already has a file system) and mounts it, or takes the mount the AMI already made (AWS's
Deep Learning AMIs may mount it at /opt/dlami/nvme); makes a folder there owned by this user and
writes its path to ~/.raysae/cache_dir, which ~/.raysae/env.sh exports as RAYSAE_CACHE_DIR.
Run again, it changes nothing. A node without an instance store keeps ~/.cache/raysae.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path

MODEL = "Amazon EC2 NVMe Instance Storage"
"""The model name an EC2 instance-store NVMe disk reports (EBS volumes report "Amazon
Elastic Block Store")."""
MOUNT = "/mnt/raysae"
"""Where an unmounted instance store is mounted."""
CACHE_DIR_FILE = Path.home() / ".raysae" / "cache_dir"
"""The folder this set up, read by ~/.raysae/env.sh into RAYSAE_CACHE_DIR."""
LSBLK = ["lsblk", "--json", "-o", "NAME,PATH,TYPE,MODEL,FSTYPE,MOUNTPOINT"]


def instance_store_disks(devices: list[dict]) -> list[dict]:
    """The whole disks of ``lsblk --json``'s ``blockdevices`` that are instance stores."""
    return [d for d in devices
            if d.get("type") == "disk" and (d.get("model") or "").strip() == MODEL]


def mounted_at(device: dict) -> str | None:
    """Where the disk, or a partition or RAID array on it, is mounted (None: nowhere)."""
    if device.get("mountpoint"):
        return device["mountpoint"]
    return next((m for c in device.get("children") or [] if (m := mounted_at(c))), None)


def plan(devices: list[dict], target: str = MOUNT) -> tuple[list[list[str]], str] | None:
    """(root commands to run, the mount point) for the first instance-store disk: none when
    it is mounted already; mount only when it has a file system; format, then mount, when
    it has none. None when the node has no instance store."""
    disks = instance_store_disks(devices)
    if not disks:
        return None
    for disk in disks:
        where = mounted_at(disk)
        if where:
            return [], where
    disk = disks[0]
    commands = []
    if not disk.get("fstype") and not disk.get("children"):
        # -m 0: no blocks reserved for root; -T largefile: one inode per MiB (the cache is
        # 64 MiB shards), so the file system's own tables take almost none of the disk
        commands.append(["mkfs.ext4", "-q", "-F", "-m", "0", "-T", "largefile", "-L", "raysae",
                         disk["path"]])
    commands += [["mkdir", "-p", target], ["mount", "-o", "noatime", disk["path"], target]]
    return commands, target


def main() -> int:
    devices = json.loads(subprocess.run(LSBLK, check=True, capture_output=True,
                                        text=True).stdout).get("blockdevices", [])
    found = plan(devices)
    if found is None:
        print("raysae: no NVMe instance store on this node; the activation cache stays in "
              "~/.cache/raysae on the root volume", file=sys.stderr)
        CACHE_DIR_FILE.unlink(missing_ok=True)
        return 0
    commands, where = found
    for command in commands:
        subprocess.run(["sudo", *command], check=True)
    folder = f"{where.rstrip('/')}/raysae"
    user = getpass.getuser()
    subprocess.run(["sudo", "mkdir", "-p", folder], check=True)
    subprocess.run(["sudo", "chown", f"{user}:", folder], check=True)
    CACHE_DIR_FILE.parent.mkdir(parents=True, exist_ok=True)
    CACHE_DIR_FILE.write_text(folder + "\n")
    print(f"raysae: activation cache on the instance store: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
