"""Building the Docker sandbox image without ever letting a build step reach a registry or PyPI.

Two pieces, used by `lemur-agent-server sandbox build` and by `scripts/build-sandbox-image.sh` (CI):

* `ensure_local_base(tag)`: a base image made from Debian packages (`mmdebstrap`, or `debootstrap`
  when mmdebstrap is missing) plus the torch + torchvision wheels, imported with `docker import`. It is
  the registry-free stand-in for the production base (an official CUDA PyTorch image): Debian's
  python3 with torch, torchvision and numpy in its system site-packages, `.pyc` files precompiled with
  `--invalidation-mode unchecked-hash` (the sandbox root is read-only, so stale `.pyc` files would be
  recompiled in memory on every start, ~1 s per `import torch`). Reused when the tag exists.
* `build_image(tag, base, context)`: builds the top-level `Dockerfile` on BASE. It asks the base which
  Python it runs and which distributions it already has, installs the missing ones (optuna,
  safetensors, ... and torch/torchvision on a bare Python base) on the host with
  `pip install --target pydeps/ --only-binary=:all: --python-version <base's>` (the host's pip config
  decides where wheels come from: a local wheel folder, a mirror or PyPI), and sends a small staged
  context (Dockerfile, the runner sources, pydeps/) to `docker build`. Nothing inside the build has
  network access to anything it needs. The image is labelled with a digest of its inputs, so a
  second build with unchanged inputs returns at once.

Why the torch wheels go into the *base* and not into a Dockerfile layer (measured on this project's
2-core CI VM, busy with other jobs; torch 2.14.1 is the CUDA build: 2.9 GB of wheels, 5.4 GB installed
with its nvidia-* and triton wheels. The CPU build torch 2.13.0+cpu is small, but PyPI's torchvision
links libtorch_cuda and cannot import with it, and LEMUR model files import torchvision):

    wheels in the context, multi-stage pip install in the image ....... 281 s, 5.97 GB
    site-packages tree (host pip --target, 31 s) as context, one COPY .. +92 s docker build, 5.95 GB
    this module: rootfs || wheels + .pyc 63 s, tar | docker import 41 s, Dockerfile 14 s:
        134 s from nothing (base 5.91 GB, image 5.98 GB); 0.2 s when up to date; ~30 s after a
        runner change (only the small top layers are rebuilt)

`docker build` has to ship a 5.6 GB context through the API and then commit the copied layer (and a
multi-stage copy writes it twice); a `docker import` stream is written once. The Dockerfile path is
the same for production: its base (an official PyTorch image) already has torch, like the local base.

Requirements on the host: a Docker engine and the `docker` CLI; for the local base also root (for
mmdebstrap/chroot), `mmdebstrap` or `debootstrap`, `tar`, and pip for the server's Python.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

Log = Callable[[str], None]

DEFAULT_TAG = "lemur-agent-server-sandbox:latest"
LOCAL_BASE = "local"  # `build_image(base="local")`: build on ensure_local_base()
DEBIAN_SUITE = os.environ.get("LEMUR_SANDBOX_DEBIAN_SUITE", "bookworm")
DEBIAN_MIRROR = os.environ.get("LEMUR_SANDBOX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Debian bookworm's python3 is 3.11, matching the cp311 wheels below.
DEBIAN_PACKAGES = ("python3", "libstdc++6", "libgomp1")
# (python, glibc) of a suite's python3, so the wheels can be installed while the rootfs is made
# (checked against the rootfs afterwards); other suites are probed first and built step by step.
_SUITE_PYTHON = {"bookworm": ("3.11", "2.36"), "trixie": ("3.13", "2.41")}
# What the local base carries (the production base, an official PyTorch image, has these already).
# Overridable (whitespace-separated pip requirement specifiers) for other torch pairs.
BASE_REQUIREMENTS = tuple(os.environ.get("LEMUR_SANDBOX_TORCH", "torch==2.14.1 torchvision==0.29.1 numpy").split())
# What the runner imports; the Dockerfile installs whichever of these the base lacks.
RUNNER_REQUIREMENTS = ("numpy", "torch", "torchvision", "optuna", "safetensors", "onnx", "onnxscript")
_LOCAL_BASE_VERSION = "1"  # bump when the recipe below changes (part of the default local base tag)
_DIGEST_LABEL = "lemur-agent-server.build-digest"
_TORCH_NAMES = {"torch", "torchvision"}
_PROBE = r"""
import importlib.metadata as md, json, platform, sys, sysconfig
dists = {}
for d in md.distributions():
    name = d.metadata["Name"]
    if name:
        dists[name] = d.version
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "abi": sys.implementation.cache_tag,
                  "machine": platform.machine(), "libc": platform.libc_ver(), "dists": dists,
                  "purelib": sysconfig.get_paths()["purelib"]}))
"""


# compileall that tolerates files it cannot compile (torch ships test files in newer Python syntax);
# processes when the platform allows, threads of one process otherwise.
# argv: DIR [DDIR] (DDIR: the path the sources will have at run time, for tracebacks).
COMPILE_ALL = (
    "import compileall, py_compile, sys\n"
    "mode = py_compile.PycInvalidationMode.UNCHECKED_HASH\n"
    "d, dd = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)\n"
    "try:\n"
    "    compileall.compile_dir(d, ddir=dd, quiet=2, workers=0, invalidation_mode=mode)\n"
    "except (OSError, NotImplementedError, ImportError):\n"
    "    compileall.compile_dir(d, ddir=dd, quiet=2, workers=1, invalidation_mode=mode)\n"
)


class BuildError(RuntimeError):
    """A step of the image build failed; the message says which and how to fix it."""


class RegistryUnreachable(BuildError):
    """The base image had to come from a registry, and no registry could be reached (or it refused).

    Why a class of its own: on a machine without a registry (CI, air-gapped hosts) the engine's error is
    a DNS or TCP message about registry-1.docker.io that does not say what to do; this one does."""

    def __init__(self, base: str, reason: str) -> None:
        self.base, self.reason = base, reason
        super().__init__(f"no registry reachable to pull the base image {base} ({reason}): build with `--base local` "
                         "(the base made from Debian packages, no registry needed)")


# What the engine says when a pull cannot reach its registry, or the registry refuses the name
# (from `docker pull` on a host without one: `Error response from daemon: Get
# "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io on 10.255.255.53:53: no such host`).
_REGISTRY_FAILURES = (
    ("name resolution failed", re.compile(r"no such host|server misbehaving|temporary failure in name resolution|"
                                          r"name or service not known|dial tcp: lookup ", re.I)),
    ("no connection", re.compile(r"connection refused|network is unreachable|no route to host|i/o timeout|"
                                 r"tls handshake timeout|client\.timeout exceeded|"
                                 r"request canceled while waiting for connection|context deadline exceeded", re.I)),
    ("access denied or no such repository", re.compile(r"pull access denied|repository does not exist|"
                                                       r"unauthorized: |denied: requested access", re.I)),
)


def registry_failure(output: str) -> str | None:
    """Why a `docker pull` (or a build pulling its base) could not get the image from a registry, or
    None when its output shows some other failure."""
    for reason, pattern in _REGISTRY_FAILURES:
        if pattern.search(output):
            return reason
    return None


# --- small helpers ------------------------------------------------------------------------------------
def _run(argv: Sequence[str], log: Log, what: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run a command, stream nothing, raise BuildError with its output tail on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv[:6])} ...\n{tail}")
    return proc


_NOISE = re.compile(r"\s*(---> |Removing intermediate container|Sending build context|DEPRECATED: The legacy|"
                    r"Install the buildx|https://docs.docker.com/go/buildx)")


def _stream(argv: Sequence[str], log: Log, what: str, env: dict[str, str] | None = None) -> None:
    """Run a command and pass its output lines to `log`."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line and not _NOISE.match(line):
            log(f"  {line}")
            tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _docker_cli() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise BuildError("the `docker` command line is missing (Debian: apt-get install docker.io)")
    return exe


def image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image, or None when there is no such image (or no engine)."""
    proc = subprocess.run([_docker_cli(), "image", "inspect", "--format", "{{json .Config.Labels}}", tag],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout) or {}
    except ValueError:
        return {}


def image_exists(tag: str) -> bool:
    return image_labels(tag) is not None


def _image_id(tag: str) -> str:
    return _run([_docker_cli(), "image", "inspect", "--format", "{{.Id}}", tag], print, "docker image inspect"
                ).stdout.strip()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(spec: str) -> str:
    return _normalize(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])


def _platform_args(libc: tuple[str, str] | list[str] | None, machine: str) -> list[str]:
    """pip `--platform` tags for a glibc base: every manylinux tag up to the base's glibc."""
    machine = machine or "x86_64"
    major, minor = 2, 17
    if libc and libc[0] == "glibc" and re.fullmatch(r"\d+\.\d+", libc[1] or ""):
        major, minor = (int(x) for x in libc[1].split("."))
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    tags += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    args: list[str] = []
    for t in tags:
        args += ["--platform", t]
    return args


def pip_install_target(target: Path, requirements: Iterable[str], python: str, abi: str,
                       libc: tuple[str, str] | list[str] | None, machine: str, log: Log) -> None:
    """Install wheels (with dependencies) for another interpreter into `target` on the host.

    `--only-binary=:all:` with an explicit interpreter and platform: pip never builds anything and
    never runs code from the packages; the wheels come from wherever the host's pip config points.
    """
    reqs = list(requirements)
    if not reqs:
        target.mkdir(parents=True, exist_ok=True)
        return
    abis = ["--abi", abi.replace("cpython-", "cp"), "--abi", "abi3", "--abi", "none"]
    argv = [sys.executable, "-m", "pip", "install", "--target", str(target), "--only-binary=:all:",
            "--no-compile", "--no-warn-script-location", "--disable-pip-version-check", "--quiet",
            "--python-version", python, "--implementation", "cp", *abis, *_platform_args(libc, machine), *reqs]
    t0 = time.monotonic()
    _run(argv, log, "pip install --target (on the host)")
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with the host's shebang
    log(f"  pip install --target {target.name}: {' '.join(reqs)} ({time.monotonic() - t0:.1f} s)")


def _remove_dists(target: Path, names: set[str]) -> list[str]:
    """Delete the distributions `names` (normalised) from a --target tree, file by file (RECORD)."""
    removed = []
    for info in sorted(target.glob("*.dist-info")):
        meta = info / "METADATA"
        try:
            name = next(line.split(":", 1)[1].strip() for line in meta.read_text(errors="replace").splitlines()
                        if line.startswith("Name:"))
        except (OSError, StopIteration):
            continue
        if _normalize(name) not in names:
            continue
        record = info / "RECORD"
        dirs: set[Path] = set()
        if record.is_file():
            for row in record.read_text(errors="replace").splitlines():
                rel = row.split(",", 1)[0]
                p = (target / rel).resolve()
                if not str(p).startswith(str(target.resolve()) + os.sep):
                    continue
                with contextlib.suppress(OSError):
                    p.unlink()
                dirs.update(p.parents)
        shutil.rmtree(info, ignore_errors=True)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            if str(d).startswith(str(target.resolve()) + os.sep):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
        removed.append(name)
    return removed


# --- the local base -------------------------------------------------------------------------------------
def default_local_base_tag() -> str:
    key = json.dumps([_LOCAL_BASE_VERSION, DEBIAN_SUITE, DEBIAN_PACKAGES, BASE_REQUIREMENTS])
    return f"lemur-sbx-base:{DEBIAN_SUITE}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _bootstrap_rootfs(rootfs: Path, log: Log) -> None:
    """A minimal Debian rootfs with python3 in `rootfs` (mmdebstrap, else debootstrap)."""
    excludes = ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
                "/usr/share/lintian/*"]
    if shutil.which("mmdebstrap"):
        argv = ["mmdebstrap", "--quiet", "--mode=root", "--variant=essential",
                "--include=" + ",".join(DEBIAN_PACKAGES)]
        argv += [f"--dpkgopt=path-exclude={e}" for e in excludes]
        argv += [DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR]
    elif shutil.which("debootstrap"):
        argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES), DEBIAN_SUITE,
                str(rootfs), DEBIAN_MIRROR]
    else:
        raise BuildError("neither mmdebstrap nor debootstrap is installed (apt-get install mmdebstrap)")
    t0 = time.monotonic()
    _run(argv, log, argv[0])
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        d = rootfs / sub
        if d.is_dir():
            for child in d.iterdir():
                if child.is_file() and child.name not in ("lock",):
                    child.unlink()
    log(f"  {argv[0]} {DEBIAN_SUITE} ({', '.join(DEBIAN_PACKAGES)}): {time.monotonic() - t0:.1f} s")


def _chroot_python(rootfs: Path, code_or_args: list[str], log: Log, what: str) -> str:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": "/root"}
    return _run(["chroot", str(rootfs), "/usr/bin/python3", *code_or_args], log, what, env=env).stdout


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _prepare_site(site: Path, python: str, glibc: str, machine: str, log: Log) -> bool:
    """pip install --target the base's wheels; precompile with the host's Python when it is the same
    version (unchecked-hash .pyc files do not depend on the compiling patch release). True if compiled."""
    abi = "cp" + python.replace(".", "")
    pip_install_target(site, BASE_REQUIREMENTS, python, abi, ("glibc", glibc), machine, log)
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != python:
        return False
    t0 = time.monotonic()
    purelib = f"/usr/local/lib/python{python}/dist-packages"
    _run([sys.executable, "-c", COMPILE_ALL, str(site), purelib], log, "compileall (host python)")
    log(f"  compileall (unchecked-hash, host python): {time.monotonic() - t0:.1f} s")
    return True


def ensure_local_base(tag: str | None = None, log: Log = print, force: bool = False) -> str:
    """Make (once) a registry-free base image from Debian packages plus the torch wheels; return its tag.

    Recipe: mmdebstrap --variant=essential bookworm + python3 -> `pip install --target
    /usr/local/lib/python3.X/dist-packages` of BASE_REQUIREMENTS from the host (wheels only) ->
    `compileall --invalidation-mode unchecked-hash` inside the rootfs (chroot) -> `tar | docker import`.
    Needs root. Returns at once when the tag exists (unless `force`).
    """
    tag = tag or default_local_base_tag()
    if not force and image_exists(tag):
        log(f"local base {tag}: present")
        return tag
    if os.geteuid() != 0:
        raise BuildError("building the local base needs root (mmdebstrap/debootstrap and chroot)")
    docker = _docker_cli()
    t_all = time.monotonic()
    log(f"local base {tag}: building from Debian {DEBIAN_SUITE} packages + {' '.join(BASE_REQUIREMENTS)}")
    work = Path(tempfile.mkdtemp(prefix="lemur-sbx-rootfs-", dir=os.environ.get("LEMUR_SANDBOX_BUILD_TMP")))
    rootfs, site = work / "rootfs", work / "site"
    expected = _SUITE_PYTHON.get(DEBIAN_SUITE)
    machine = platform.machine()
    try:
        compiled = False
        if expected is not None:  # wheels (and .pyc with a same-version host Python) while mmdebstrap runs
            py, glibc = expected
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                job = pool.submit(_prepare_site, site, py, glibc, machine, log)
                _bootstrap_rootfs(rootfs, log)
                compiled = job.result()
            log(f"  rootfs and wheels (in parallel): {time.monotonic() - t0:.1f} s")
            info = json.loads(_chroot_python(rootfs, ["-c", _PROBE], log, "probing the rootfs python"))
            if info["python"] != py or info["machine"] != machine:
                raise BuildError(f"{DEBIAN_SUITE} has python {info['python']} on {info['machine']}, expected "
                                 f"{py} on {machine}: fix _SUITE_PYTHON in sandbox/image.py")
        else:
            _bootstrap_rootfs(rootfs, log)
            info = json.loads(_chroot_python(rootfs, ["-c", _PROBE], log, "probing the rootfs python"))
            pip_install_target(site, BASE_REQUIREMENTS, info["python"], info["abi"], info["libc"], machine, log)
        purelib = info["purelib"]
        target = rootfs / purelib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmdir()  # an empty dist-packages of the fresh rootfs
        os.rename(site, target)
        log(f"  size of the rootfs: {_du(rootfs) / 1e9:.2f} GB")
        t0 = time.monotonic()
        if not compiled:
            _chroot_python(rootfs, ["-c", COMPILE_ALL, purelib], log, "compileall")
        _chroot_python(rootfs, ["-c", "import numpy, torch, torchvision"], log, "import check in the rootfs")
        log(f"  {'' if compiled else 'compileall + '}import check in the rootfs: {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   'CMD ["/usr/bin/python3"]', f"LABEL lemur-agent-server.local-base={_LOCAL_BASE_VERSION}"]
        tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        try:
            argv = [docker, "import"]
            for c in changes:
                argv += ["--change", c]
            imp = subprocess.run([*argv, "-", tag], stdin=tar.stdout, capture_output=True, text=True, check=False)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar_rc = tar.wait()
        if imp.returncode != 0 or tar_rc != 0:
            raise BuildError(f"docker import failed (tar exit {tar_rc}): {imp.stderr[-2000:]}")
        log(f"  tar | docker import: {time.monotonic() - t0:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"local base {tag}: built in {time.monotonic() - t_all:.1f} s")
    return tag


# --- the sandbox image ----------------------------------------------------------------------------------
def dockerfile_default_base(dockerfile: Path) -> str:
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*ARG\s+BASE=(\S+)", line)
        if m:
            return m.group(1)
    raise BuildError(f"{dockerfile} has no `ARG BASE=...` line")


def probe_base(base: str, log: Log = print) -> dict:  # type: ignore[type-arg]
    """Ask the base image (no network, no privileges) about its Python and installed distributions."""
    argv = [_docker_cli(), "run", "--rm", "--network", "none", "--user", "0:0", "--entrypoint", "python3", base,
            "-c", _PROBE]
    proc = _run(argv, log, f"probing the base image {base} (it needs python3)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _runner_files(source_root: Path) -> list[Path]:
    """The sources that go into the image, relative to `source_root` (no caches)."""
    files = [Path("sandbox/__init__.py"), Path("sandbox/protocol.py")]
    runner = source_root / "sandbox" / "runner"
    if not (runner / "__main__.py").is_file():
        raise BuildError(f"{runner} holds no runner (__main__.py)")
    for p in sorted(runner.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            files.append(p.relative_to(source_root))
    return files


def _resolve_base(base: str | None, dockerfile: Path, log: Log) -> str:
    """The base image's reference, made (`local`) or pulled when it is not here yet."""
    if base == LOCAL_BASE:
        return ensure_local_base(None, log=log)
    base = base or dockerfile_default_base(dockerfile)
    if not image_exists(base):
        pull_base(base, log)
    return base


def pull_base(base: str, log: Log = print) -> None:
    """`docker pull base`; RegistryUnreachable when no registry answers (the message says what to do)."""
    log(f"pulling {base} (needs a registry)")

    def progress(line: str) -> None:  # the engine's own error is not shown: ours says what to do
        if not line.lstrip().startswith("Error response from daemon"):
            log(line)

    try:
        _stream([_docker_cli(), "pull", base], progress, f"docker pull {base}")
    except BuildError as exc:
        reason = registry_failure(str(exc))
        if reason is not None:
            raise RegistryUnreachable(base, reason) from exc
        raise


def _inputs_digest(base: str, dockerfile: Path, source_root: Path, files: list[Path]) -> str:
    """A digest of everything the image is made from (the label that makes a rebuild a no-op)."""
    digest = hashlib.sha256()
    for part in (_image_id(base).encode(), dockerfile.read_bytes(), json.dumps(RUNNER_REQUIREMENTS).encode(),
                 json.dumps(BASE_REQUIREMENTS).encode()):
        digest.update(part)
    for rel in files:
        digest.update(str(rel).encode() + b"\0" + (source_root / rel).read_bytes())
    return digest.hexdigest()[:20]


def _missing_requirements(have: set[str], log: Log) -> list[str]:
    """What the runner needs that the base lacks (torch from the pinned pair on a bare Python base)."""
    missing = [r for r in RUNNER_REQUIREMENTS if _req_name(r) not in have]
    if any(_req_name(r) in _TORCH_NAMES for r in missing):
        missing = [r for r in missing if _req_name(r) not in _TORCH_NAMES]
        missing += [r for r in BASE_REQUIREMENTS if _req_name(r) in _TORCH_NAMES]
        log("  the base has no torch/torchvision: installing them into the image (slow: GBs of wheels)")
    return missing


def _stage_context(ctx: Path, dockerfile: Path, source_root: Path, files: list[Path], info: dict,  # type: ignore[type-arg]
                   log: Log) -> None:
    """The small build context: the Dockerfile, the runner sources and pydeps/ (what the base lacks)."""
    shutil.copy2(dockerfile, ctx / "Dockerfile")
    for rel in files:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_root / rel, ctx / rel)
    have = {_normalize(n) for n in info["dists"]}
    pydeps = ctx / "pydeps"
    pip_install_target(pydeps, _missing_requirements(have, log), info["python"], info["abi"], info["libc"],
                       info["machine"], log)
    dropped = _remove_dists(pydeps, have)  # the base's copy wins: never shadow its numpy etc.
    if dropped:
        log(f"  kept the base's own {', '.join(sorted(dropped))}")


def build_image(tag: str, base: str | None, context: Path | None = None, log: Log = print,
                force: bool = False) -> None:
    """Build the sandbox image `tag` from the top-level Dockerfile in `context` (the source checkout).

    `base`: None -> the Dockerfile's default (an official CUDA PyTorch image, pulled by the engine;
    RegistryUnreachable without a registry); "local" -> `ensure_local_base()` (Debian packages + torch
    wheels, no registry); anything else -> that image. Returns at once when `tag` exists and was built
    from the same inputs (unless `force`).
    """
    t_all = time.monotonic()
    source_root = Path(context) if context is not None else Path(__file__).resolve().parent.parent
    dockerfile = source_root / "Dockerfile"
    if not dockerfile.is_file():
        raise BuildError(f"no Dockerfile in {source_root}: build from a source checkout of lemur-agent-server")
    files = _runner_files(source_root)
    base = _resolve_base(base, dockerfile, log)
    key = _inputs_digest(base, dockerfile, source_root, files)
    labels = image_labels(tag)
    if not force and labels is not None and labels.get(_DIGEST_LABEL) == key:
        log(f"{tag}: up to date (base {base}, inputs {key})")
        return

    log(f"building {tag} on {base}")
    info = probe_base(base, log)
    with tempfile.TemporaryDirectory(prefix="lemur-sbx-context-",
                                     dir=os.environ.get("LEMUR_SANDBOX_BUILD_TMP")) as tmp:
        _stage_context(Path(tmp), dockerfile, source_root, files, info, log)
        t0 = time.monotonic()
        _stream([_docker_cli(), "build", "--build-arg", f"BASE={base}", "--label", f"{_DIGEST_LABEL}={key}",
                 "--label", f"lemur-agent-server.base={base}", "-t", tag, tmp], log, "docker build",
                env={**os.environ})
        log(f"  docker build: {time.monotonic() - t0:.1f} s")
    _prune_dangling(log)
    log(f"{tag}: built in {time.monotonic() - t_all:.1f} s")


def _prune_dangling(log: Log) -> None:
    """Remove the untagged images an earlier build of the same tag left behind (by id)."""
    proc = subprocess.run([_docker_cli(), "images", "-q", "--filter", "dangling=true",
                           "--filter", f"label={_DIGEST_LABEL}"], capture_output=True, text=True, check=False)
    for image_id in set(proc.stdout.split()):
        subprocess.run([_docker_cli(), "rmi", image_id], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.image", description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default=os.environ.get("LEMUR_SANDBOX_IMAGE", DEFAULT_TAG))
    parser.add_argument("--base", default=None,
                        help="base image; 'local' = Debian packages + torch wheels (no registry); "
                             "default: the Dockerfile's CUDA PyTorch image")
    parser.add_argument("--context", type=Path, default=None, help="source checkout (default: this one)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--base-only", action="store_true", help="only make the local base; print its tag")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.base_only:
            print(ensure_local_base(None, log=log, force=args.force))
        else:
            build_image(args.tag, args.base, args.context, log=log, force=args.force)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
