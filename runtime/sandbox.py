"""Where tenant code runs: a bubblewrap sandbox, one long-lived child per replica (docs/security.md).

The replica actor is platform code; the function's code never runs in it. The actor starts
`python -m cocoon_faas.runtime.sandbox_child` under bubblewrap (`bwrap`) and talks to it over a Unix socket pair
with the frame protocol (cocoon_faas/protocol.py), plus a second socket pair (SOCK_SEQPACKET) over which the actor
hands the child gateway connections it has authenticated (the gateway's direct path for plain calls,
runtime/sandbox_link.py `hand_off`). Inside the sandbox the child sees:

* a read-only view of /usr, a few files of /etc, the Python installation and its site-packages, and the
  cocoon_faas package; read-only the converted model cache (COCOON_MODELS_DIR) when there is one;
* a private, empty, writable /tmp and working directory (tmpfs: gone with the sandbox, never on the node's disk);
* its own PID namespace (no other process visible; /proc is the sandbox's), IPC and UTS namespaces, and its own
  network namespace (only a down loopback) unless the spec says `network=True`;
* no capabilities, a scrubbed environment (only PATH, HOME, LANG, thread counts, the node's LLM engine settings
  COCOON_LLM_PRECISION / COCOON_LLM_THREADS and the spec's `env`), no
  COCOON_HOME of any party, no Ray session directory, socket or token;
* limits: address space (RLIMIT_AS) = the spec's `memory` (set by the child before any tenant code is loaded,
  hard limit too, so the tenant cannot raise it), and a pids limit through a pids cgroup when this node lets us
  create one (else RLIMIT_NPROC, which Linux does not enforce on root).

`COCOON_SANDBOX=off` runs the same child without bubblewrap (development on machines without user namespaces):
the code still stays out of the Ray worker, but it sees everything the worker sees. It is loud about it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cocoon_faas.errors import CocoonError
from cocoon_faas.runtime.beacon import Beacon

log = logging.getLogger("cocoon.sandbox")

ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "localtime", "hosts",
             "resolv.conf", "nsswitch.conf", "passwd", "group", "alternatives", "mime.types", "gai.conf",
             "host.conf", "protocols", "services")
WORKDIR = "/fn"
PIDS_LIMIT = 512
INSECURE_WARNING = ("COCOON_SANDBOX=off: tenant code runs WITHOUT a sandbox and can read this node's files, "
                    "environment and network. Use this only for development on machines without user namespaces.")


class SandboxUnavailable(CocoonError):
    """Raised when bubblewrap is missing or cannot create namespaces here, and the sandbox is not turned off."""

    status = 503
    type = "sandbox_unavailable"


@dataclass(frozen=True)
class SandboxConfig:
    """What one replica's sandbox allows: from the function's spec plus the node's settings."""

    memory: int
    network: bool = False
    env: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    threads: int = 1
    enabled: bool = True
    models_dir: str | None = None
    pids: int = PIDS_LIMIT
    node: str = ""  # the provider node the replica runs on (COCOON_NODE in the sandbox; "" locally)


def bwrap_problem() -> str | None:
    """None when bubblewrap can build a sandbox here, else what is wrong and how to fix it."""
    path = shutil.which("bwrap")
    if path is None:
        return ("bubblewrap is not installed; install it (`apt-get install bubblewrap`) or, for development only, "
                "set COCOON_SANDBOX=off")
    try:
        r = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--die-with-parent",
                            "--", "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap failed to run ({exc}); fix it or, for development only, set COCOON_SANDBOX=off"
    if r.returncode != 0:
        return (f"bubblewrap cannot create namespaces here ({r.stderr.strip()[:300]}); enable unprivileged user "
                "namespaces (sysctl kernel.unprivileged_userns_clone=1) or, for development only, set "
                "COCOON_SANDBOX=off")
    return None


def _python_paths() -> list[str]:
    """Directories the child's Python needs: the installation, the venv(s), site-packages and our package."""
    import importlib.util

    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths = set(prefixes) | {sys.prefix}
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        # only the Python installation and package directories: a Ray worker's sys.path also holds the driver's
        # working directory (the operator's checkout), which must stay out of reach
        if any(real.startswith(pre + os.sep) for pre in prefixes) or Path(real).name in ("site-packages",
                                                                                           "dist-packages"):
            paths.add(p)
            paths.add(real)
    for name in ("cocoon_faas", "cocoon_faas.runtime", "cocoon_faas.kernels"):  # found, not imported (torch)
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            paths.update(os.path.realpath(p) for p in found.submodule_search_locations)
    exe = os.path.realpath(sys.executable)
    paths.add(os.path.dirname(exe))
    # a parent and its child both bound is harmless; sorted so parents mount first
    return sorted(p for p in paths if os.path.isdir(p) and not p.startswith("/usr/"))


_LLM_SETTINGS = ("COCOON_LLM_PRECISION", "COCOON_LLM_THREADS")


def child_env(cfg: SandboxConfig) -> dict[str, str]:
    """The whole environment of the child: nothing inherited from the Ray worker or the gateway."""
    threads = str(max(1, cfg.threads))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false"}
    # the node's LLM engine knobs (settings `llm_precision`, `llm_threads`): scrubbed like the rest, they used
    # to stop at the sandbox, so `COCOON_LLM_PRECISION=gguf` on a node changed nothing inside its replicas
    for name in _LLM_SETTINGS:
        if os.environ.get(name):
            env[name] = os.environ[name]
    if cfg.models_dir:
        env["COCOON_MODELS_DIR"] = cfg.models_dir
    if cfg.node:
        env["COCOON_NODE"] = cfg.node
    if cfg.gpu and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPUs Ray gave this replica
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    env.update(cfg.env)
    return env


def bwrap_argv(cfg: SandboxConfig, python_args: list[str]) -> list[str]:
    """The bubblewrap command line for one replica's child (see the module docstring for what it allows)."""
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--cap-drop", "ALL", "--hostname", "cocoon-sandbox", "--clearenv",
            "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin", "lib32"):
        target = Path("/") / name
        if target.is_symlink():
            argv += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            argv += ["--ro-bind", str(target), str(target)]
    for name in ETC_FILES:
        p = Path("/etc") / name
        if p.exists():
            argv += ["--ro-bind", str(p), str(p)]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", WORKDIR, "--chdir", WORKDIR]
    if not cfg.network:
        argv.append("--unshare-net")
    for path in _python_paths():
        argv += ["--ro-bind", path, path]
    if cfg.models_dir and os.path.isdir(cfg.models_dir):
        argv += ["--ro-bind", cfg.models_dir, cfg.models_dir]
    if cfg.gpu:
        for node in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri"), Path("/dev/kfd")]:
            if node.exists():
                argv += ["--dev-bind", str(node), str(node)]
    for k, v in child_env(cfg).items():
        argv += ["--setenv", k, v]
    return argv + ["--", *python_args]


class PidsCgroup:
    """A pids cgroup for one sandbox, when this node lets us make one (cgroup v2 with pids delegated, or v1)."""

    def __init__(self, name: str, limit: int) -> None:
        self.path: Path | None = None
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids")):
            ctl = root / "cgroup.subtree_control"
            is_v2 = ctl.exists()
            if is_v2 and "pids" not in ctl.read_text(errors="replace").split():
                continue
            if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
                continue
            path = root / "cocoon" / name
            try:
                path.mkdir(parents=True, exist_ok=True)
                (path / "pids.max").write_text(str(limit))
            except OSError:
                continue
            self.path = path
            break

    def wrap(self, argv: list[str]) -> list[str]:
        """Prefix `argv` so the process joins the cgroup before it execs (its children are born inside)."""
        if self.path is None:
            return argv
        return ["/bin/sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "cocoon-sandbox", *argv]

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


class SandboxProcess:
    """One running child: the process, and the actor's end of the socket pair."""

    def __init__(self, cfg: SandboxConfig, name: str) -> None:
        self.cfg = cfg
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        # connections handed to the child (SCM_RIGHTS): one message per connection; never blocks the actor
        self.handoff, handoff_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handoff.setblocking(False)
        # the child's watchdog keeps this page current; the actor ends a child whose every thread is stuck
        self.beacon = Beacon.create()
        python_args = [sys.executable, "-I", "-m", "cocoon_faas.runtime.sandbox_child", str(child.fileno()),
                       str(cfg.memory if not cfg.gpu else 0), str(cfg.pids), str(handoff_child.fileno()),
                       str(self.beacon.fd)]
        self.cgroup: PidsCgroup | None = None
        if cfg.enabled:
            self.cgroup = PidsCgroup(name, cfg.pids)
            argv = self.cgroup.wrap(bwrap_argv(cfg, python_args))
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        else:
            log.warning(INSECURE_WARNING)
            argv = python_args
            env = {**os.environ, **child_env(cfg), "HOME": os.environ.get("HOME", "/tmp")}
        try:
            # stdout/stderr to /dev/null: what the code prints during a call travels in frames (and is dropped
            # for sealed calls); nothing reaches the Ray worker's log files on this node's disk
            self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(), handoff_child.fileno(), self.beacon.fd),
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, close_fds=True)
        finally:
            child.close()
            handoff_child.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sock in (self.sock, self.handoff):
            try:
                sock.close()
            except OSError:
                pass
        if self.cgroup is not None:
            self.cgroup.remove()
        self.beacon.close()


__all__ = ["INSECURE_WARNING", "SandboxConfig", "SandboxProcess", "SandboxUnavailable", "bwrap_argv",
           "bwrap_problem", "child_env"]
