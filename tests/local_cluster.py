"""A multi-node Ray cluster on one machine for the spot tests, and a driver process to run jobs on it.

Every node is its own `ray start --block` process group, so a test can drain a node (`ray drain-node`,
what a spot reclaim notice looks like to Ray), kill it, or add a new one. The cluster never uses
`ray stop`, which would stop every Ray on the machine (the test session's own included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, free_port

RAY = str(Path(sys.executable).parent / "ray")

# What makes a one-machine cluster react at test speed: Ray Train's preemption watcher polls drains every
# 0.5 s (default 5), the GCS declares a silent node dead after ~3 s (default ~30), a worker group that
# cannot be placed is retried after 30 s (default 60). And what keeps it patient on a loaded CI host:
# a raylet may take a minute to register (default 10 s). And a node keeps idle worker processes for Ray Data's
# tasks (data.loader: ray): Ray's soft limit of one process per CPU counts the node's training worker, so on a
# 1-CPU node every ingest task would otherwise start (and import torch in) a fresh Python process, 3-5 s each
# on a loaded host.
FAST_CLUSTER_ENV = {
    "RAY_num_workers_soft_limit": "4",
    "RAY_raylet_start_wait_time_s": "60",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    node_id: str = ""


class LocalCluster:
    """A head and worker nodes on 127.0.0.1, one CPU each, with `env` in every Ray process."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port, self.dashboard = free_port(), free_port()
        self.temp = Path("/tmp") / f"raysp{self.port}"  # short: Ray's socket paths have a length limit
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": str(REPO / "platform"),
                    # Ray's processes find their own cluster by this, not by guessing among the machine's Rays
                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}",
                    **FAST_CLUSTER_ENV, **env}
        self.head: Node | None = None
        self.workers: list[Node] = []
        self.drivers: list[subprocess.Popen] = []  # ended with the cluster if a failed test left one running
        self._count = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], num_cpus: int = 1, resources: dict | None = None) -> Node:
        log = open(self.root / f"{name}.log", "w")
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--disable-usage-stats",
                  "--object-store-memory", str(200 * 1024**2),
                  "--resources", json.dumps({f"node_{name}": 1, **(resources or {})}),
                  "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                  "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                  "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        proc = subprocess.Popen([RAY, "start", *args, *common], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return Node(name, proc)

    def start(self, num_cpus: int = 1) -> LocalCluster:
        self.head = self._start("head", [
            "--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(self.dashboard), "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.temp)], num_cpus)
        self._wait_alive(self.head)
        return self

    def add_node(self, num_cpus: int = 1, resources: dict | None = None) -> Node:
        """A worker node with `num_cpus` CPUs and `resources` besides its own `node_<name>` resource."""
        self._count += 1
        node = self._start(f"worker{self._count}", ["--address", self.address], num_cpus, resources)
        self._wait_alive(node)
        self.workers.append(node)
        return node

    def tasks(self) -> list[dict]:
        """Every task the cluster ran (name, node_id, state, ...), from Ray's state API."""
        return self._state_api("tasks")

    def _state_api(self, what: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.dashboard}/api/v0/{what}?limit=10000&detail=1"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return self._state_api("nodes")

    def training_nodes(self) -> list[Node]:
        """The worker nodes (not the head) where a Ray Train worker runs now."""
        busy = {a["node_id"] for a in self._state_api("actors")
                if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"}
        return [w for w in self.workers if w.node_id in busy]

    def state(self, node: Node) -> str:
        found = [n for n in self.nodes() if f"node_{node.name}" in n["resources_total"]]
        return found[-1]["state"] if found else "UNKNOWN"

    def _wait_alive(self, node: Node, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while True:
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node {node.name} did not start: "
                                   f"{(self.root / f'{node.name}.log').read_text()[-2000:]}")
            try:
                alive = [n for n in self.nodes() if f"node_{node.name}" in n["resources_total"]
                         and n["state"] == "ALIVE"]
            except OSError:
                alive = []
            if alive:
                node.node_id = alive[0]["node_id"]
                return
            time.sleep(1)

    def live_workers(self) -> list[Node]:
        return [w for w in self.workers if w.proc.poll() is None and self.state(w) == "ALIVE"]

    def ensure_workers(self, count: int) -> None:
        """At least `count` live worker nodes besides the head (a previous test may have taken one away)."""
        while len(self.live_workers()) < count:
            self.add_node()

    def drain_for_preemption(self, node: Node, deadline_s: int) -> None:
        """What a spot reclaim notice is to Ray: the node is drained, and will be gone after `deadline_s`."""
        subprocess.run([RAY, "drain-node", "--address", self.address, "--node-id", node.node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", str(deadline_s)],
                       env=self.env, check=True, capture_output=True, timeout=60)

    def kill(self, node: Node) -> None:
        """The node dies at once, without notice (its raylet, agents and workers)."""
        _kill_group(node.proc, signal.SIGKILL)

    def wait_dead(self, node: Node, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.state(node) == "ALIVE":
            if time.time() > deadline:
                raise RuntimeError(f"ray node {node.name} still alive after {timeout:.0f} s")
            time.sleep(0.5)

    def shutdown(self) -> None:
        for proc in self.drivers:
            if proc.poll() is None:
                _kill_group(proc, signal.SIGKILL)
        for node in [*self.workers, *([self.head] if self.head else [])]:
            _kill_group(node.proc, signal.SIGTERM)
        deadline = time.time() + 5  # the cluster is thrown away: a short grace, then SIGKILL
        for node in [*self.workers, *([self.head] if self.head else [])]:
            try:
                node.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                _kill_group(node.proc, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Driver:
    """`tests/cluster_driver.py` in its own process: one pretraining run on the cluster (see that file)."""

    def __init__(self, cluster: LocalCluster, log: Path, overrides: list[str], faults: dict | None = None,
                 resume: bool = False, env: dict[str, str] | None = None, recipe: str | None = None) -> None:
        spec = {"address": cluster.address, "recipe": recipe, "overrides": overrides, "faults": faults or {},
                "resume": resume}
        self.log = log
        out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cluster_driver.py")),
                                      json.dumps(spec)], env={**cluster.env, **(env or {})}, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        cluster.drivers.append(self.proc)

    def result(self, timeout: float = 600) -> dict:
        """The run's PretrainResult as a dict (fails the test, with the driver's log, if the run failed)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc, signal.SIGKILL)
            raise AssertionError(f"the driver did not finish in {timeout:.0f} s: {self.log.read_text()[-4000:]}") from None
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("RESULT ")]
        assert lines, f"the run failed (exit {self.proc.returncode}): {self.log.read_text()[-6000:]}"
        return json.loads(lines[-1][len("RESULT "):])
