"""A Ray head started by a test with ``ray start --head --block``, on free ports and its own temp dir.

Why not ``ray stop --force`` (or ``ray.cluster_utils.AutoscalingCluster``, which calls it): it kills every
Ray process of the machine, including other users' clusters. This head runs in its own process group;
``stop`` ends that group and then any process whose command line names this head's temp dir (raylets of
fake autoscaled nodes, job drivers), by process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


def base_env(temp_root: str) -> dict[str, str]:
    """This process's environment for Ray commands: venv first on PATH, auth off, no cluster address, no
    AWS credentials (the tests pass those through the job's runtime env), Ray's temp dir under ``temp_root``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=temp_root, PYTHONUNBUFFERED="1")
    return env


@dataclass
class Head:
    """A running head."""

    proc: subprocess.Popen[bytes]
    temp_root: str
    gcs_address: str
    dashboard_url: str | None
    env: dict[str, str]
    log_path: str
    started_s: float = field(default=0.0)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of ``ray start``'s output (for failure messages)."""
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        return ""


def start_head(num_cpus: int, *, dashboard: bool, autoscaling_config: dict[str, Any] | None = None,
               timeout_s: float = 180.0) -> Head:
    """Start a head and wait until it serves (the dashboard's job API when ``dashboard``).

    With ``autoscaling_config`` (a fake-provider cluster config) the head runs Ray's autoscaler with the
    fake multi-node provider, which starts worker raylets on this machine (``RAY_FAKE_CLUSTER=1``).
    """
    temp_root = tempfile.mkdtemp(prefix="secu-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    (gcs, dash, agent_http, agent_grpc, client, metrics, env_agent, node_mgr, obj_mgr) = free_ports(9)
    env = base_env(temp_root)
    extra_args = []
    if autoscaling_config is not None:
        config = json.loads(json.dumps(autoscaling_config))
        config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # the provider's default is port 6379
        path = os.path.join(temp_root, "autoscaling.json")
        Path(path).write_text(json.dumps(config))
        extra_args.append(f"--autoscaling-config={path}")
        env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    args = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
            f"--port={gcs}", f"--temp-dir={temp_root}/ray", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    args += (["--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1"]
             if dashboard else ["--include-dashboard=false"])
    log_path = os.path.join(temp_root, "ray-start.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*args, *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = Head(proc, temp_root, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}" if dashboard else None, env,
                log_path, time.monotonic())
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{head.log_tail()}")
            if _ready(head):
                return head
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up in {timeout_s:.0f} s:\n{head.log_tail()}")
            time.sleep(1.0)
    except BaseException:
        stop_head(head)
        raise


def _ready(head: Head) -> bool:
    if head.dashboard_url is not None:
        try:
            with urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False
    probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{head.gcs_address}'); "
                            "print(ray.cluster_resources())"], env=head.env, capture_output=True, timeout=120)
    return probe.returncode == 0


def _own_pids(temp_root: str) -> list[int]:
    """Processes whose command line or environment (``RAY_TMPDIR``, inherited by everything the head
    starts) names this head's unique temp dir: ours, by construction."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{entry}/cmdline").read_bytes() + Path(f"/proc/{entry}/environ").read_bytes()
            if temp_root.encode() in text:
                pids.append(int(entry))
    return pids


def stop_head(head: Head, grace_s: float = 5.0) -> None:
    """End the head's process group, then any leftover process of this head; remove its temp dir."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.proc.pid, signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.proc.pid, signal.SIGKILL)
    for _ in range(3):
        leftovers = _own_pids(head.temp_root)
        if not leftovers:
            break
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
    shutil.rmtree(head.temp_root, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout_s: float = 600.0, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run ``ray <args>`` against this head (text output, both streams)."""
    return subprocess.run([RAY, *args], env=head.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
