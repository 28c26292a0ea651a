"""Builds the pilotfish image (the top-level Dockerfile) with no network inside the build:
`make image` and the container test (tests/deploy/test_image.py) both call `build()`.

What it makes sure of, in order, each step skipped when already so (docs/image.md):
1. a Docker engine answers: else, as root, Debian's `docker.io` is installed with apt when
   `dockerd` is missing, and one `dockerd` is started in the background (a lock keeps two
   callers from starting two), waited for with a deadline;
2. the base image exists: the default, pilotfish-base:bookworm, is Debian bookworm made with
   `debootstrap --variant=minbase` from the mirror apt on this machine uses, with the image's
   runtime packages included (so the Dockerfile installs nothing over the network), then
   `docker import`ed; any other BASE (debian:bookworm-slim where a registry serves it) is used
   as it is;
3. a wheelhouse on the host (.build/image/wheelhouse): `pip wheel` of pilotfish[envoy] and its
   dependencies, plus pip's own wheel to install them with, their shared libraries stripped
   (strip_wheel); the Dockerfile copies it in.

With --vm it also builds the VM image (deploy/vm/Dockerfile, docs/vm.md "Under systemd"): a
second debootstrapped base with systemd as init, and the image's virtualenv copied onto it, also
with no network inside the build; tests/deploy/test_vm_systemd.py boots it.

Standard library only: it runs before any virtualenv exists in the image, and `make image`
runs it with the project's .venv (whose pip builds the wheels).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / ".build" / "image"
DEFAULT_IMAGE = "pilotfish:dev"
DEFAULT_BASE = "pilotfish-base:bookworm"
SUITE = "bookworm"
# What the image runs beside the venv: the interpreter, both iptables backends (the iptables
# package carries iptables-legacy and iptables-nft), iproute2 (`ip rule`/`ip route` for TPROXY).
# setpriv (Envoy's launcher) is util-linux, part of every Debian base.
RUNTIME_PACKAGES = ("python3", "iptables", "iproute2")
# A VM's base: the same, and systemd as /sbin/init (systemd-sysv pulls in systemd itself).
VM_PACKAGES = (*RUNTIME_PACKAGES, "systemd-sysv")
DEFAULT_VM_IMAGE = "pilotfish-vm:dev"
DEFAULT_VM_BASE = "pilotfish-vm-base:bookworm"
VM_DOCKERFILE = REPO / "deploy" / "vm" / "Dockerfile"
DOCKERD_LOG = Path("/var/log/pilotfish-dockerd.log")
DOCKERD_LOCK = Path("/run/pilotfish-dockerd.lock")
ENGINE_DEADLINE = 60.0


class Unavailable(Exception):
    """No Docker engine can be had here (not root, apt failed, dockerd did not come up): the
    container test skips with this message."""


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A command that must succeed; its output goes to ours (a build is long and shows progress)."""
    log("$ " + " ".join(argv))
    return subprocess.run(list(argv), check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.returncode == 0


def apt_install(packages: Sequence[str]) -> None:
    """Debian packages with apt-get, as the Makefile's system-deps does (root only)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update", "-q"], env=env, stdout=sys.stderr)
        run(["apt-get", "install", "-y", "-q", *packages], env=env, stdout=sys.stderr)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        raise Unavailable(f"apt-get install {' '.join(packages)} failed: {err}") from None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_engine(deadline: float = ENGINE_DEADLINE) -> None:
    """A Docker engine that answers `docker info`: the running one, else one started here."""
    if engine_answers():
        return
    if os.geteuid() != 0:
        raise Unavailable("no Docker engine answers and starting one needs root")
    with locked(DOCKERD_LOCK):
        if engine_answers():  # another caller started it while we waited for the lock
            return
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            apt_install(["docker.io"])
        log(f"starting dockerd (log: {DOCKERD_LOG})")
        with open(DOCKERD_LOG, "ab") as out:
            proc = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # outlives this process: later builds reuse it
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if engine_answers():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = DOCKERD_LOG.read_text(errors="replace")[-1500:]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise Unavailable(f"dockerd did not answer within {deadline:.0f}s (exit {proc.returncode}):\n{tail}")


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False).returncode == 0


def base_recipe(name: str) -> str:
    """The BASE_RECIPE an image of ensure_base() was made with ("" for an older one)."""
    done = subprocess.run(["docker", "image", "inspect", "--format",
                           f'{{{{index .Config.Labels "{BASE_RECIPE_LABEL}"}}}}', name],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


_ONE_LINE = re.compile(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$")


def apt_mirror(sources: Sequence[Path] = ()) -> str:
    """The Debian archive apt on this machine uses for the bookworm suite (not its security
    archive), from sources.list's one-line entries or the deb822 .sources files."""
    files = list(sources) or [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                match = _ONE_LINE.match(line.strip())
                if match and match.group(2) == SUITE:
                    return match.group(1)
    raise SystemExit(f"image: no apt source for Debian {SUITE} in {', '.join(map(str, files))}: "
                     "debootstrap needs the mirror apt uses (or pass --base IMAGE)")


# What debian:bookworm-slim leaves out (its dpkg path-excludes), written into the base so
# that a later `apt-get install` in it leaves them out too: ~50 MB of the 170 MB minbase.
SLIM_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


# What a runtime on the base never reads, beyond what debian:bookworm-slim drops (docs/image.md
# "Where the size goes"): glibc's iconv modules (Python has its own codecs; ip and iptables
# convert nothing), the interpreter's test package and pydoc's help topics, shell completion and
# lintian's overrides. apt, dpkg and perl-base stay: an image built FROM this one can still
# `apt-get install`.
RUNTIME_UNREAD = ("usr/lib/x86_64-linux-gnu/gconv", "usr/lib/python3.11/test", "usr/lib/python3.11/pydoc_data",
                  "usr/share/bash-completion", "usr/share/lintian")
# Bumped whenever slim() drops something else: ensure_base() rebuilds a base of another recipe.
BASE_RECIPE = "2"
BASE_RECIPE_LABEL = "io.pilotfish.base-recipe"


def slim(root: Path) -> None:
    """Drops from a debootstrapped root what no container reads (docs, manuals, translations,
    apt's downloads and lists), as debian:bookworm-slim does, and RUNTIME_UNREAD."""
    for relative in RUNTIME_UNREAD:
        shutil.rmtree(root / relative, ignore_errors=True)
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_EXCLUDES)
    for pattern in ("usr/share/man/*", "usr/share/info/*", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*",
                    "var/cache/debconf/*-old", "var/lib/dpkg/*-old"):
        for item in root.glob(pattern):
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    for item in (root / "usr/share/locale").glob("*"):
        if item.name != "locale.alias":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for doc in (root / "usr/share/doc").glob("*"):
        for item in ([doc] if not doc.is_dir() or doc.is_symlink() else doc.iterdir()):
            if item.name != "copyright":
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def ensure_base(name: str = DEFAULT_BASE, packages: Sequence[str] = RUNTIME_PACKAGES) -> None:
    """A debootstrapped base with `packages`, built once: an existing image of that name is kept
    when slim() made it as it does now (BASE_RECIPE)."""
    if image_exists(name) and base_recipe(name) == BASE_RECIPE:
        return
    if shutil.which("debootstrap") is None:
        apt_install(["debootstrap"])
    mirror = apt_mirror()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), mirror],
            stdout=sys.stderr)
        slim(root)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "--change", "CMD [\"/bin/bash\"]", "--change", f"LABEL {BASE_RECIPE_LABEL}={BASE_RECIPE}",
             "-", name], stdin=tar.stdout, stdout=sys.stderr)
        if tar.wait() != 0:
            raise SystemExit(f"image: tar of the base's root exited {tar.returncode}")


def wheelhouse(python: str = sys.executable) -> Path:
    """`pip wheel` of pilotfish[envoy] and what it needs, split in two: deps/ (changes rarely:
    a docker layer of its own) and app/ (pilotfish's own wheel, rebuilt every time)."""
    house = BUILD_DIR / "wheelhouse"
    deps, app = house / "deps", house / "app"
    shutil.rmtree(app, ignore_errors=True)
    deps.mkdir(parents=True, exist_ok=True)
    app.mkdir(parents=True)
    for old in deps.glob("pilotfish-*.whl"):
        old.unlink()
    run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(deps), f"{REPO}[envoy]", "pip"], stdout=sys.stderr)
    for wheel in deps.glob("pilotfish-*.whl"):
        wheel.rename(app / wheel.name)
    if shutil.which("strip") is None:
        log("no strip (binutils) here: the wheels' libraries go in with their symbols")
    else:
        for wheel in sorted(deps.glob("*.whl")):
            strip_wheel(wheel)
    return house


def strip_wheel(wheel: Path) -> None:
    """Rewrites `wheel` with its shared libraries stripped of symbols and debug sections, which
    no run reads (cryptography's Rust library and PyYAML's extension ship them: ~5 MB), and its
    RECORD saying so. The members keep their zip headers, so the same wheel gives the same bytes
    and the image's dependency layer stays cached."""
    with zipfile.ZipFile(wheel) as zin:
        members = [(info, zin.read(info)) for info in zin.infolist()]
    stripped: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="strip-") as tmp:
        for info, data in members:
            if not re.search(r"\.so(\.|$)", info.filename):
                continue
            lib = Path(tmp) / "lib.so"
            lib.write_bytes(data)
            if subprocess.run(["strip", "--strip-unneeded", str(lib)], capture_output=True, check=False).returncode:
                continue  # not an ELF file strip knows: left as it is
            if len(smaller := lib.read_bytes()) < len(data):
                stripped[info.filename] = smaller
    if not stripped:
        return
    log(f"{wheel.name}: stripped {', '.join(stripped)}")
    tmp_wheel = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp_wheel, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in members:
            data = stripped.get(info.filename, data)
            if info.filename.endswith(".dist-info/RECORD"):
                data = record_with(data.decode(), stripped).encode()
            zout.writestr(info, data)
    tmp_wheel.replace(wheel)


def record_with(record: str, files: dict[str, bytes]) -> str:
    """A wheel's RECORD (path,sha256=<urlsafe b64>,size lines) with `files`' hashes and sizes."""
    lines = []
    for line in record.splitlines():
        path = line.split(",", 1)[0]
        if path in files:
            digest = base64.urlsafe_b64encode(hashlib.sha256(files[path]).digest()).rstrip(b"=").decode()
            line = f"{path},sha256={digest},{len(files[path])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def revision() -> str:
    """The commit the image is built from (with -dirty when the tree has changes), for its label."""
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


BUILD_LABEL = "io.pilotfish.build=1"  # set in the Dockerfile's first stage


def build(image: str = DEFAULT_IMAGE, base: str = DEFAULT_BASE, python: str = sys.executable) -> str:
    """The image, built from the Dockerfile with the wheelhouse copied in; returns its name."""
    ensure_engine()
    if base == DEFAULT_BASE:
        ensure_base(base)
    house = wheelhouse(python)
    log(f"wheelhouse: {house}")
    # the debootstrapped base has every package already: its build runs with no network at all;
    # another base may need its runtime packages from apt (the Dockerfile installs what is missing)
    network = ["--network", "none"] if base == DEFAULT_BASE else []
    labels = [f"--build-arg=BASE={base}", f"--build-arg=VERSION={version()}", f"--build-arg=REVISION={revision()}"]
    run(["docker", "build", *network, *labels, "-t", image, str(REPO)], stdout=sys.stderr)
    prune()
    return image


def prune() -> None:
    """Every stage carries BUILD_LABEL: the images a rebuild left untagged (the last build's, its
    build stage) go, and not a byte of anyone else's."""
    run(["docker", "image", "prune", "--force", "--filter", f"label={BUILD_LABEL}"], stdout=sys.stderr)


def build_vm(image: str = DEFAULT_VM_IMAGE, app: str = DEFAULT_IMAGE, base: str = DEFAULT_VM_BASE) -> str:
    """The VM image (deploy/vm/Dockerfile) from the already built `app` image and the VM base
    (debootstrapped with VM_PACKAGES when it is the default); no network inside the build."""
    ensure_engine()
    if base == DEFAULT_VM_BASE:
        ensure_base(base, VM_PACKAGES)
    run(["docker", "build", "--network", "none", f"--build-arg=APP={app}", f"--build-arg=BASE={base}", "-t", image,
         "-f", str(VM_DOCKERFILE), str(VM_DOCKERFILE.parent)], stdout=sys.stderr)
    prune()
    return image


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"the name to tag (default {DEFAULT_IMAGE})")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"the base image (default {DEFAULT_BASE}, debootstrapped here when missing)")
    parser.add_argument("--engine-only", action="store_true", help="only make sure a Docker engine answers")
    parser.add_argument("--vm", metavar="IMAGE", nargs="?", const=DEFAULT_VM_IMAGE,
                        help=f"then build the VM image (deploy/vm/Dockerfile, systemd as PID 1) on top, tagged IMAGE "
                             f"(default {DEFAULT_VM_IMAGE})")
    args = parser.parse_args(argv)
    try:
        if args.engine_only:
            ensure_engine()
        else:
            build(args.image, args.base or DEFAULT_BASE)
            if args.vm:
                build_vm(args.vm, args.image)
    except Unavailable as err:
        log(str(err))
        return 1
    except subprocess.CalledProcessError as err:
        log(f"failed: {' '.join(map(str, err.cmd))} exited {err.returncode}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
