"""The share of the node's CPU each stage of the pipeline takes, sampled by py-spy from the running process.

py-spy samples the stacks of the threads that are on a CPU (not those that wait); each sample is given to the
stage of the first of its functions, from the stack's root, that names one, or else to the stage its thread's
name tells. pynetdicom runs
each association's network reading and writing in threads of its own (``run_reactor``), the same for both
directions: their samples are a stage of their own.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
STAGES = (  # (stage, markers of its functions, markers of its threads' names)
    ("receive (SCP, ingest)", ("StorageSCP", "Ingestor"), ("AcceptorThread", "AcceptorServer")),
    ("inference", ("InferenceJobs",), ("prepare_", "onnxruntime")),
    ("outputs (SC, maps, SR)", ("OutputJobs",), ()),
    ("delivery (SCU)", ("DeliverySender",), ("RequestorThread", "delivery")),
    ("MLflow tracking", ("InferenceTracker",), ("tracking", "MLflow")),
    ("association I/O threads (both directions)", (), ("run_reactor",)),
)
_THREAD = re.compile(r"^thread \(\d+\): ([^;]*)")


class StageProfile:
    """``py-spy record`` of process ``pid`` from :meth:`start` to :meth:`stop`; :meth:`shares` reads it."""

    def __init__(self, pid: int, out: Path, rate: int = 50) -> None:
        self.command = [str(PY_SPY), "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out)]
        self.command += ["--threads", "--nonblocking"]
        self.out = out
        self.process: subprocess.Popen | None = None
        self.missing: str | None = None

    def start(self) -> None:
        if PY_SPY.exists():
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            self.missing = f"{PY_SPY} is not installed (make install-test)"

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
        _, error = self.process.communicate(timeout=60)
        if not self.out.exists():  # e.g. not allowed to trace the node (ptrace)
            self.missing = f"py-spy wrote no profile: {error.decode(errors='replace').strip()[-200:]}"

    def shares(self) -> dict[str, float]:
        """Each stage's share of the samples (and "other": start-up, the web server, the Python runtime); none
        when py-spy could not sample (:attr:`missing` says why)."""
        if self.missing is not None:
            return {}
        samples: Counter[str] = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples[_stage(stack)] += int(count)
        total = sum(samples.values())
        return {stage: samples[stage] / total for stage in [*(name for name, _, _ in STAGES), "other"]}


def _stage(stack: str) -> str:
    match = _THREAD.match(stack)
    thread = match.group(1) if match else ""
    functions = [frame.split(" (")[0] for frame in stack.split(";")[1:]]
    for function in functions:
        for stage, markers, _ in STAGES:
            if any(marker in function for marker in markers):
                return stage
    for stage, _, markers in STAGES:
        if any(marker in thread for marker in markers):
            return stage
    return "other"
