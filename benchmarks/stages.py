"""The node's CPU time by stage of the pipeline, sampled by py-spy from the running process.

py-spy samples the stacks of the threads that are on a CPU (not those that wait); each sample is given to the
stage of the first of its functions, from the stack's root, that names one, or else to the stage its thread's
name tells. pynetdicom runs
each association's network reading and writing in threads of its own (``run_reactor``), the same for both
directions: their samples are a stage of their own. Where threads contend for the cores and the GIL, py-spy's
samples add up to more than the process's CPU time (measured: 889 against 645 ms per image), so the stages' shares
of the samples, applied to the CPU time read from ``/proc`` (:func:`process_cpu_seconds`), give each stage's.
"""

from __future__ import annotations

import os
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
        self.rate = rate
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

    def sampled_seconds(self) -> dict[str, float]:
        """Each stage's seconds of samples (and "other": start-up, the web server, the Python runtime); none when
        py-spy could not sample (:attr:`missing` says why)."""
        if self.missing is not None:
            return {}
        samples: Counter[str] = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples[_stage(stack)] += int(count)
        return {stage: samples[stage] / self.rate for stage in [*(name for name, _, _ in STAGES), "other"]}


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far, all its threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


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
