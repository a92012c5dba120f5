"""Test hosts: systemd-nspawn machines in network namespaces on a private bridge.

Each host boots a real systemd as PID 1 from its own overlayfs copy of a cached,
debootstrapped Debian bookworm root. It lives in its own network namespace that
is joined to a host bridge by a veth pair. The namespaces get no default route
and the host keeps ``ip_forward`` as it is, so test traffic stays on this machine.
Data disks are sparse files on loop devices that are bound into the machine.

Everything here needs root, ``debootstrap``, ``systemd-nspawn`` (Debian package
``systemd-container``), ``iproute2``, ``util-linux`` and overlayfs, loop and
veth support in the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
MIRROR = os.environ.get("TILED_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE_ROOT = Path(os.environ.get("TILED_TEST_CACHE", "/var/cache/tiled-test"))

# Installed by debootstrap. python3-apt lets the apt module run without a network,
# and the rest gives a bootable systemd machine reachable over SSH.
BASE_PACKAGES = (
    "python3",
    "python3-apt",
    "openssh-server",
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "ca-certificates",
)

# Downloaded into the apt cache of the base (with their recommends, because the
# apt module installs recommends by default) so the roles install them offline.
NODE_DEBS = (
    "python3-venv",
    "python3-pip",
    "python3-packaging",
    "xfsprogs",
    "parted",
    "prometheus-node-exporter",
    "prometheus",
    "haproxy",
    "curl",
    "python3-yaml",
)

BRIDGE = "br-tiledt"
SUBNET_PREFIX = "10.77.0"
BRIDGE_ADDRESS = f"{SUBNET_PREFIX}.1"


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command and raise with its output when it fails."""
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"command failed with exit code {result.returncode}: {' '.join(args)}\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def base_key() -> str:
    """Return the cache key of the base root: a hash of what goes into it."""
    spec = {
        "suite": SUITE,
        "mirror": MIRROR,
        "base": BASE_PACKAGES,
        "debs": NODE_DEBS,
        "layout": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base_root() -> Path:
    """Return the cached bookworm root, building it first if it is missing.

    A first build takes about two minutes (debootstrap plus a download of the
    node packages). A lock file serialises concurrent builds, and the root only
    takes its final name once complete, so an interrupted build is redone.
    """
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    base = CACHE_ROOT / f"{SUITE}-{base_key()}"
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / ".complete").exists():
            return base
        partial = base.with_name(base.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        started = time.monotonic()
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            SUITE,
            str(partial),
            MIRROR,
        )
        # The chroot needs name resolution for the download only. The nodes get
        # an empty resolv.conf so that nothing in them waits on DNS time-outs.
        shutil.copy("/etc/resolv.conf", partial / "etc/resolv.conf")
        run("chroot", str(partial), "apt-get", "update", "-q")
        run(
            "chroot",
            str(partial),
            "apt-get",
            "install",
            "-y",
            "-q",
            "--download-only",
            *NODE_DEBS,
        )
        (partial / "etc/resolv.conf").write_text("# test host: no DNS\n")
        # Starting a getty on the container console only adds noise to the log.
        for unit in ("getty@tty1.service", "console-getty.service"):
            link = partial / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        (partial / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        partial.rename(base)
        log.info("built %s in %.0f s", base, time.monotonic() - started)
        return base


@dataclasses.dataclass
class Host:
    """One booted test host and the resources it holds."""

    name: str
    address: str
    workdir: Path
    disk_size_bytes: int = 0
    loop_device: str = ""
    process: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nspawn.log"

    def shell(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command inside the machine, as root, through nsenter."""
        leader = self.leader_pid()
        return run(
            "nsenter",
            "-t",
            str(leader),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            "/bin/sh",
            "-c",
            command,
            check=check,
        )

    def leader_pid(self) -> int:
        """Return the PID of the machine's init, the only child of nspawn."""
        assert self.process is not None, f"{self.name} is not running"
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        pids = children.read_text().split()
        if not pids:
            raise RuntimeError(f"{self.name}: systemd-nspawn has no child process")
        return int(pids[0])


class Cluster:
    """Bridge, namespaces, overlays, loop devices and machines of one test run.

    ``close()`` releases everything that was set up, in reverse order, and keeps
    going past errors so that one stuck resource does not leak the others.
    """

    def __init__(self, workdir: Path, public_key: str) -> None:
        self.workdir = workdir
        self.public_key = public_key
        self.base = ensure_base_root()
        self.hosts: dict[str, Host] = {}
        self._cleanups: list[tuple[str, object]] = []

    # -- setup -------------------------------------------------------------

    def create_bridge(self) -> None:
        remove_bridge()
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._cleanups.append(("bridge", BRIDGE))
        run("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")

    def add_host(self, name: str, index: int, disk_size_bytes: int = 0) -> Host:
        """Create and boot one machine; ``disk_size_bytes`` > 0 adds a data disk."""
        host = Host(
            name=name,
            address=f"{SUBNET_PREFIX}.{10 + index}",
            workdir=self.workdir / name,
            disk_size_bytes=disk_size_bytes,
        )
        self.hosts[name] = host
        host.workdir.mkdir(parents=True)
        self._create_netns(host)
        self._mount_root(host)
        if disk_size_bytes:
            self._attach_disk(host)
        self._boot(host)
        return host

    def _create_netns(self, host: Host) -> None:
        netns = f"tiledt-{host.name}"
        veth = f"vt-{host.name}"[:15]
        run("ip", "netns", "del", netns, check=False)
        run("ip", "link", "del", veth, check=False)
        run("ip", "netns", "add", netns)
        self._cleanups.append(("netns", netns))
        run(
            "ip",
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        run("ip", "link", "set", veth, "master", BRIDGE, "up")
        run("ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "link", "set", "lo", "up")

    def _mount_root(self, host: Host) -> None:
        for part in ("upper", "work", "root"):
            (host.workdir / part).mkdir()
        options = (
            f"lowerdir={self.base},upperdir={host.workdir / 'upper'},"
            f"workdir={host.workdir / 'work'}"
        )
        run("mount", "-t", "overlay", "overlay", "-o", options, str(host.root))
        self._cleanups.append(("mount", str(host.root)))
        (host.root / "etc/hostname").write_text(host.name + "\n")
        hosts_file = host.root / "etc/hosts"
        hosts_file.write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
        ssh_dir = host.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.public_key)
        (ssh_dir / "authorized_keys").chmod(0o600)

    def _attach_disk(self, host: Host) -> None:
        image = host.workdir / "data.img"
        with open(image, "wb") as handle:
            handle.truncate(host.disk_size_bytes)
        host.loop_device = run(
            "losetup", "-f", "-P", "--show", str(image)
        ).stdout.strip()
        self._cleanups.append(("loop", host.loop_device))

    def _boot(self, host: Host) -> None:
        args = [
            "systemd-nspawn",
            # There is no host systemd or D-Bus to register the machine with.
            "--register=no",
            "--keep-unit",
            "-q",
            "-D",
            str(host.root),
            "-M",
            host.name,
            f"--network-namespace-path=/run/netns/tiledt-{host.name}",
            # Lets the role create the partition's device node: the container's
            # /dev is a private tmpfs without udev.
            "--capability=CAP_MKNOD",
            "--resolv-conf=off",
            "--timezone=off",
        ]
        if host.loop_device:
            args.append(f"--bind={host.loop_device}")
        args.append("-b")
        with open(host.log_path, "wb") as out:
            host.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._cleanups.append(("machine", host))

    def wait_for_ssh(self, timeout_seconds: float = 60) -> None:
        deadline = time.monotonic() + timeout_seconds
        for host in self.hosts.values():
            while True:
                if host.process and host.process.poll() is not None:
                    raise RuntimeError(
                        f"{host.name}: systemd-nspawn exited with "
                        f"{host.process.returncode}:\n{host.log_path.read_text()[-3000:]}"
                    )
                if port_open(host.address, 22):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{host.name}: no SSH on {host.address}:22")
                time.sleep(0.3)

    # -- teardown ----------------------------------------------------------

    def stop_host(self, host: Host, timeout_seconds: float = 30) -> None:
        """Power the machine off (SIGTERM to nspawn), killing it after a time-out."""
        process = host.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            log.warning("%s did not power off; killing its process group", host.name)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def close(self) -> list[str]:
        """Release everything in reverse order; return the errors it hit."""
        errors: list[str] = []
        while self._cleanups:
            kind, item = self._cleanups.pop()
            try:
                if kind == "machine":
                    self.stop_host(item)
                elif kind == "mount":
                    release_mount(item)
                elif kind == "loop":
                    release_loop(item)
                elif kind == "netns":
                    run("ip", "netns", "del", item)
                elif kind == "bridge":
                    remove_bridge()
            except Exception as error:  # noqa: BLE001 - keep releasing the rest
                errors.append(f"{kind} {item}: {error}")
        return errors


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def release_mount(path: str) -> None:
    """Unmount ``path`` and anything left mounted below it."""
    for _ in range(10):
        if run("mountpoint", "-q", path, check=False).returncode != 0:
            return
        if run("umount", "-R", path, check=False).returncode == 0:
            continue
        time.sleep(0.5)
    run("umount", "-R", "-l", path)


def release_loop(device: str) -> None:
    # Without kernel partition parsers the partitions were added through BLKPG,
    # so they are deleted the same way before the device is detached.
    run("partx", "-d", device, check=False)
    run("losetup", "-d", device)


def remove_bridge() -> None:
    run("ip", "link", "del", BRIDGE, check=False)


def make_ssh_key(directory: Path) -> tuple[Path, str]:
    """Create an ed25519 key pair; return the private key path and public key."""
    key = directory / "id_ed25519"
    run(
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "tiled-test",
        "-f",
        str(key),
    )
    return key, (directory / "id_ed25519.pub").read_text()


def netns_exec(
    host: Host, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a host binary inside the host's network namespace."""
    return run("ip", "netns", "exec", f"tiledt-{host.name}", *args, check=check)


@contextlib.contextmanager
def cluster(workdir: Path, public_key: str) -> Iterator[Cluster]:
    """Yield a Cluster and release it however the block ends."""
    nodes = Cluster(workdir, public_key)
    try:
        nodes.create_bridge()
        yield nodes
    finally:
        errors = nodes.close()
        if errors:
            raise RuntimeError("teardown left resources behind:\n" + "\n".join(errors))


def leftovers(workdir: Path) -> list[str]:
    """List resources of a test run under ``workdir`` that are still held."""
    found = []
    netns = run("ip", "netns", "list", check=False).stdout.split()
    found += [f"netns {name}" for name in netns if name.startswith("tiledt-")]
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    prefix = str(workdir.resolve())
    for line in run(
        "losetup", "-n", "-O", "NAME,BACK-FILE", check=False
    ).stdout.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(prefix):
            found.append(f"loop {name} ({backing.strip()})")
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = line.split()[4]
            if mount_point.startswith(prefix):
                found.append(f"mount {mount_point}")
    return found
